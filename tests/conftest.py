"""Shared fixtures: a tiny corpus, tokenizer and token shards made on the fly (no downloads)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

WORDS = ("the king queen lord lady sword crown night day love war peace heart blood fair foul "
         "speak hear see go come stay fly fall rise sing weep laugh").split()


def make_documents(n_docs: int = 24, n_words: int = 400, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(n_words)) + "." for _ in range(n_docs)]


def write_text_files(folder: Path, docs: list[str]) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, doc in enumerate(docs):
        path = folder / f"doc{i:03d}.txt"
        path.write_text(doc)
        paths.append(str(path))
    return paths


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny tensors: one intra-op thread is several times faster than two on a busy 2-core box."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def float64_default(one_torch_thread):
    """float64 as torch's default dtype for one test (exact comparisons of two computations)."""
    import torch

    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> dict:
    """Corpus split, a 300-token BPE and token shards of a small generated corpus."""
    from stabilab.corpus import read_split, write_split
    from stabilab.shards import write_shards
    from stabilab.tokenizer import train_bpe

    root = tmp_path_factory.mktemp("tiny")
    docs = make_documents()
    write_text_files(root / "text", docs)
    write_split({"source": "text", "paths": [str(root / "text")], "val_fraction": 0.2}, root / "corpus")
    tok = train_bpe(read_split(root / "corpus" / "train.jsonl.gz"), 300)
    tok.save(root / "tokenizer.json")
    split_files = {s: root / "corpus" / f"{s}.jsonl.gz" for s in ("train", "val")}
    meta = write_shards(tok, split_files, root / "shards")
    return {"root": root, "docs": docs, "tokenizer": tok, "shards": str(root / "shards"), "meta": meta}


def tiny_run(shards: str, **sections) -> dict:
    """A resolved run dict for a tiny model on `shards`; keyword sections overlay it."""
    from stabilab.config import deep_merge

    run = {
        "study": "test", "variant": "baseline", "seed": 0,
        "model": {"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 32},
        "optim": {"lr": 1e-2, "warmup_steps": 5},
        "train": {"steps": 40, "batch_size": 8, "eval_every": 20, "eval_batches": 2, "log_every": 5,
                  "metrics_every": 10, "checkpoint_every": 10},
        "data": {"shards": shards, "tokenizer": "bpe", "vocab_size": 300},
    }
    return deep_merge(run, sections)


LLAMA = {"norm": "rmsnorm", "position": "rope", "mlp": "swiglu", "rope_base": 500.0}  # the LLaMA family


def write_run(folder, tiny_data, loss: dict | None = None, tokenizer=None, edit=None, **model):
    """A run folder as the trainer leaves it (config.json, model.pt) with every parameter moved
    off its init (gains not 1, biases not 0), so that each must land in its place, then `edit`
    (a function of the model) if given; the tiny corpus's tokenizer unless `tokenizer` (a
    Tokenizer saved beside the run) is given."""
    import json

    import torch

    from stabilab.config import load_run_config
    from stabilab.model import GPT
    from stabilab.train.checkpoint import WEIGHTS, save_checked

    tok_file = tiny_data["root"] / "tokenizer.json"
    if tokenizer is not None:
        tok_file = folder.parent / "tokenizer.json"
        tokenizer.save(tok_file)
    run = tiny_run(tiny_data["shards"], model={"n_head": 2, "n_embd": 32, "block_size": 32, **model},
                   loss=loss or {}, data={"tokenizer_file": str(tok_file)})
    run["model"]["vocab_size"] = (tokenizer or tiny_data["tokenizer"]).vocab_size  # 300: padded to 320 rows
    cfg = load_run_config(run)
    torch.manual_seed(0)
    gpt = GPT(cfg.model)
    with torch.no_grad():
        for p in gpt.parameters():
            p.add_(0.1 * torch.randn_like(p))
        if edit is not None:
            edit(gpt)
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(cfg.to_dict()))
    save_checked({"model": gpt.state_dict(), "config": cfg.to_dict(), "step": 0}, folder / WEIGHTS)
    return gpt.eval()


class Killed(Exception):
    """Raised inside a run to stand for the process dying mid-training."""


def run_killed_at(trainer, step: int) -> None:
    """Run `trainer` until it is about to take step `step + 1`, then 'kill' it (raise Killed out of
    `run`), as a crash after the last checkpoint would: the steps since that checkpoint are lost."""
    original = trainer.train_step

    def train_step(measure):
        if trainer.step == step:
            raise Killed
        return original(measure)

    trainer.train_step = train_step
    with pytest.raises(Killed):
        trainer.run()
