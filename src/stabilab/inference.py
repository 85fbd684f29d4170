"""A finished run's model, used again: its validation loss on any token shards, and text sampled
from it with the run's own tokenizer and its own normalizer (softmax or StableMax).

A run folder holds `config.json` and, with `runtime.keep_weights` (the default), `model.pt`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from .config import RunConfig, load_run_config
from .device import autocast, pick_device
from .errors import UserError
from .layout import tokenizer_beside
from .losses import normalized_logits
from .model import GPT
from .shards import eval_batches, open_shards
from .tokenizer import load as load_tokenizer
from .train.checkpoint import load_weights


def load_run(run_dir: str | Path, device: str = "auto"):
    """(run config, model in eval mode, device) of a finished run folder."""
    dev = pick_device(device)  # a bad --device is refused before the run folder is read
    run_dir = Path(run_dir)
    config = run_dir / "config.json"
    if not config.exists():
        raise UserError(f"not a run folder: {config} is missing")
    saved = load_weights(run_dir, dev)
    cfg = load_run_config(json.loads(config.read_text()))
    if saved["config"] != cfg.to_dict():
        raise UserError(f"{run_dir}: model.pt was made by another config than config.json (re-train the run)")
    model = GPT(cfg.model).to(dev)
    model.load_state_dict(saved["model"])
    return cfg, model.eval(), dev


def tokenizer_file(cfg: RunConfig) -> str:
    """The run's tokenizer: data.tokenizer_file, else the one beside its shards."""
    return cfg.data.tokenizer_file or tokenizer_beside(cfg.data.shards)


@torch.no_grad()
def evaluate(run_dir: str | Path, shards: str | Path | None = None, split: str = "val", batches: int | None = None,
             device: str = "auto") -> dict:
    """Mean cross-entropy of the run's model (its own normalizer) on `batches` batches of a split
    of token shards (default: the run's own shards, the run's eval_batches), windows spread evenly
    over the split; shards made with another tokenizer are refused. With `model.mask_unseen_tokens`
    the run's own mask (in model.pt) applies, as in training's validation loss."""
    if batches is not None and batches < 1:  # 0 is not "the default": `or` would have taken it so
        raise UserError(f"--batches must be at least 1 (got {batches})")
    cfg, model, dev = load_run(run_dir, device)
    shard_dir = Path(shards) if shards else Path(cfg.data.shards)
    made_with = tokenizer_beside(shard_dir) if shards else cfg.data.tokenizer_file or None  # checked against the meta
    _, data = open_shards(shard_dir, cfg.data.tokenizer, cfg.model.vocab_size, made_with)
    if split not in data:
        raise UserError(f"unknown split '{split}' (train or val)")
    n = batches or cfg.train.eval_batches
    total = torch.zeros((), device=dev, dtype=torch.float64)
    windows = eval_batches(data[split], n, cfg.train.batch_size, cfg.model.block_size)
    for x, y in windows:
        with autocast(dev, cfg.train.dtype):
            total += model(x.to(dev), y.to(dev), cfg.loss)[1].double()
    loss = float(total / len(windows))
    return {"run": str(run_dir), "shards": str(shard_dir), "split": split, "batches": len(windows),
            "tokens": len(windows) * cfg.train.batch_size * cfg.model.block_size, "loss": loss,
            "ppl": math.exp(loss) if loss < 700 else None, "normalizer": cfg.loss.kind}


def check_sampling(tokens: int, temperature: float, top_k: int, seed: int) -> None:
    """A UserError naming the first sampling argument out of its range (0 tokens would print the prompt alone)."""
    if tokens < 1:
        raise UserError(f"--tokens must be at least 1 (got {tokens})")
    if not (math.isfinite(temperature) and temperature > 0):
        raise UserError(f"--temperature must be a finite number > 0 (got {temperature:g})")
    if top_k < 0:
        raise UserError(f"--top-k must be >= 0 (0: all tokens; got {top_k})")
    if not 0 <= seed < 2**64:  # torch.Generator's range; a negative seed would alias a positive one
        raise UserError(f"--seed must be in [0, 2^64) (got {seed})")


@torch.no_grad()
def sample(run_dir: str | Path, prompt: str, tokens: int = 50, temperature: float = 1.0, top_k: int = 0,
           seed: int = 0, device: str = "auto") -> str:
    """`prompt` continued by `tokens` tokens drawn from the model's distribution (softmax or
    StableMax of the logits / temperature, the top_k most likely if top_k > 0), decoded with the
    run's tokenizer."""
    check_sampling(tokens, temperature, top_k, seed)
    cfg, model, dev = load_run(run_dir, device)
    tok = load_tokenizer(tokenizer_file(cfg))
    ids = tok.encode(prompt) or [tok.eot_id]
    gen = torch.Generator(device=dev).manual_seed(seed)
    idx = torch.tensor([ids], device=dev)
    for _ in range(tokens):
        window = idx[:, -cfg.model.block_size:]
        with autocast(dev, cfg.train.dtype):
            logits = model(window)[0, -1].float()  # (V,)
        z = normalized_logits(logits / temperature, cfg.loss.kind)  # softmax(z) is the model's distribution
        if model.vocab_mask_real() is not None:  # model.mask_unseen_tokens: masked ids have probability 0
            z = z.masked_fill(~model.vocab_mask_real(), float("-inf"))
        if top_k > 0:
            z = torch.where(z >= torch.topk(z, min(top_k, z.numel())).values[-1], z, float("-inf"))
        nxt = torch.multinomial(torch.softmax(z, dim=-1), 1, generator=gen)
        idx = torch.cat([idx, nxt[None]], dim=1)
    return tok.decode(idx[0].tolist())
