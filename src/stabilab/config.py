"""Typed run configuration, strict loading, and variant overlays.

A *run* is (study, variant, depth, learning rate, seed). Its config is the experiment's base
sections, overlaid by the study's `overrides`, then by the variant's overlays, then by depth/LR/seed.
Overlays are nested dicts; each section they touch says what they change:

- `model`      the network (MLRA attention, logit soft-capping, tying)
- `loss`       the training objective (StableMax, z-loss, mu-loss)
- `optim`      the optimizer (AdamW or SPAM, perpGrad wrapper, clipping, schedule)
- `post_step`  what runs after each optimizer step (mu-centering)
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .errors import UserError

SECTIONS = ("model", "loss", "optim", "post_step", "train")


@dataclass
class MLRAConfig:
    enabled: bool = False
    rank: int | None = None  # per-head rank r; None means d_head // 2 (choice, METHODS.md §2)
    targets: list[str] = field(default_factory=lambda: ["q", "k", "v"])


@dataclass
class ModelConfig:
    vocab_size: int = 0  # set from the token shards' meta; padded up to a multiple of 64
    block_size: int = 64
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 64
    bias: bool = False
    dropout: float = 0.0
    tie_embeddings: bool = True
    logit_softcap: float | None = None  # Gemma 2 soft-capping c; None disables
    mlra: MLRAConfig = field(default_factory=MLRAConfig)


@dataclass
class LossConfig:
    kind: Literal["softmax", "stablemax"] = "softmax"
    z_loss: float = 0.0  # PaLM z-loss weight
    mu_loss: float = 0.0  # OEC mu-loss weight


@dataclass
class SPAMConfig:
    threshold: float = 5000.0  # theta
    reset_interval: int = 500  # Delta T
    warmup: int = 150  # N, cosine LR-multiplier warmup after each moment reset
    grace: int = 20  # no spike clipping for this many steps after start and after each reset
    warmup_at_start: bool = False  # official code: the multiplier only follows resets (choice)


@dataclass
class OptimConfig:
    name: Literal["adamw", "spam"] = "adamw"
    lr: float = 3e-3
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float | None = 1.0  # global grad-norm clip; None disables
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    perpgrad: bool = False  # wrap the optimizer with perpGrad (OrthoGrad)
    spam: SPAMConfig = field(default_factory=SPAMConfig)


@dataclass
class PostStepConfig:
    mu_centering: bool = False  # OEC: subtract the mean output-embedding row after each step


@dataclass
class DivergenceConfig:
    margin: float = 1.0  # nats above the initial loss that count as "far above"
    patience: int = 50  # consecutive steps (checked at log steps) above the margin


@dataclass
class TrainConfig:
    steps: int = 200
    batch_size: int = 16
    grad_accum: int = 1  # micro-batches per step; a multiple of `processes`
    processes: int = 1  # data-parallel processes (torchrun); the global batch stays batch_size * grad_accum
    eval_every: int = 50
    eval_batches: int = 4
    log_every: int = 10
    metrics_every: int = 25  # stability metrics (METHODS.md §3) on a fixed batch
    metrics_batch: int = 8  # sequences of that fixed batch (the first of the validation set)
    grad_var_window: int = 50  # window of the grad-norm variance
    spike_factor: float = 50.0  # GSS threshold of a gradient-norm spike (SPAM paper)
    checkpoint_every: int = 100
    keep_checkpoint: bool = False  # keep ckpt.pt after a finished run (e.g. to sample from it)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # auto: bf16 autocast on CUDA
    compile: bool = False
    tensorboard: bool = False
    divergence: DivergenceConfig = field(default_factory=DivergenceConfig)


@dataclass
class DataConfig:
    shards: str = ""  # folder with train.bin, val.bin, meta.json
    tokenizer: str = "bpe"  # tokenizer kind the shards must have been made with
    vocab_size: int = 0  # tokenizer vocab size the shards must have (0: any)


@dataclass
class RunConfig:
    study: str = "default"
    variant: str = "baseline"
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    post_step: PostStepConfig = field(default_factory=PostStepConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")


# ----------------------------------------------------------------------------- strict loading


def _type_ok(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if tp is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, t) for t in typing.get_args(tp))
    if origin is Literal:
        return value in typing.get_args(tp)
    if origin is list:
        (item,) = typing.get_args(tp)
        return isinstance(value, list) and all(_type_ok(v, item) for v in value)
    if tp is type(None):
        return value is None
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp)


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(t) for t in typing.get_args(tp))
    if origin is list:
        return f"a list of {_describe(typing.get_args(tp)[0])}"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def from_dict(cls: type, data: dict, path: str = "") -> Any:
    """Build dataclass `cls` from `data`, rejecting unknown keys and ill-typed values."""
    if not isinstance(data, dict):
        raise UserError(f"config key '{path or cls.__name__}' must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        where = f"{path}.{key}" if path else key
        if key not in names:
            raise UserError(f"unknown config key '{where}' (allowed: {', '.join(names)})")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = from_dict(tp, value, where)
            continue
        if not _type_ok(value, tp):
            raise UserError(f"bad value for config key '{where}': {value!r} (expected {_describe(tp)})")
        kwargs[key] = float(value) if tp is float else value
    return cls(**kwargs)


def load_run_config(data: dict) -> RunConfig:
    cfg = from_dict(RunConfig, data)
    check_run_config(cfg)
    return cfg


def check_run_config(cfg: RunConfig) -> None:
    """Semantic checks and the composition rules that the types alone cannot express."""
    m, o, t = cfg.model, cfg.optim, cfg.train
    positive = {
        "model.n_layer": m.n_layer, "model.n_head": m.n_head, "model.n_embd": m.n_embd,
        "model.block_size": m.block_size, "train.steps": t.steps, "train.batch_size": t.batch_size,
        "train.grad_accum": t.grad_accum, "train.processes": t.processes, "train.eval_every": t.eval_every,
        "train.eval_batches": t.eval_batches, "train.log_every": t.log_every,
        "train.metrics_every": t.metrics_every, "train.metrics_batch": t.metrics_batch, "train.checkpoint_every": t.checkpoint_every,
        "optim.spam.reset_interval": o.spam.reset_interval,
    }
    for key, value in positive.items():
        if value <= 0:
            raise UserError(f"bad value for config key '{key}': {value} (expected a positive number)")
    if t.grad_accum % t.processes:
        raise UserError(f"train.grad_accum ({t.grad_accum}) must be a multiple of train.processes ({t.processes})")
    if not (o.lr > 0 and math.isfinite(o.lr)):
        raise UserError(f"bad value for config key 'optim.lr': {o.lr} (expected a positive number)")
    if m.n_embd % m.n_head:
        raise UserError(f"model.n_embd ({m.n_embd}) must be divisible by model.n_head ({m.n_head})")
    if len(o.betas) != 2 or not all(0 <= b < 1 for b in o.betas):
        raise UserError(f"bad value for config key 'optim.betas': {o.betas} (expected two numbers in [0, 1))")
    d_head = m.n_embd // m.n_head
    if m.mlra.enabled:
        bad = sorted(set(m.mlra.targets) - {"q", "k", "v", "o"})
        if bad or not m.mlra.targets:
            raise UserError(f"bad value for config key 'model.mlra.targets': {m.mlra.targets} "
                            "(allowed: a non-empty list of 'q', 'k', 'v', 'o')")
        rank = m.mlra.rank if m.mlra.rank is not None else d_head // 2
        if not 1 <= rank < d_head:
            raise UserError(f"bad value for config key 'model.mlra.rank': {rank} "
                            f"(expected 1 <= rank < d_head = {d_head})")
    if m.logit_softcap is not None and m.logit_softcap <= 0:
        raise UserError(f"bad value for config key 'model.logit_softcap': {m.logit_softcap} (expected > 0 or null)")
    if cfg.loss.kind == "stablemax" and cfg.loss.z_loss > 0:
        raise UserError("variants cannot combine loss.kind=stablemax with loss.z_loss: z-loss penalizes "
                        "the softmax normalizer logsumexp, which StableMax does not have")
    if cfg.loss.z_loss < 0 or cfg.loss.mu_loss < 0:
        raise UserError("loss.z_loss and loss.mu_loss must be >= 0")


# ----------------------------------------------------------------------------- overlays


def deep_merge(base: dict, overlay: dict) -> dict:
    """Return `base` updated by `overlay`, recursing into nested mappings."""
    out = copy.deepcopy(base)
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _leaves(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in d.items():
        where = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict) and value:
            out.update(_leaves(value, where))
        else:
            out[where] = value
    return out


def variant_overlay(name: str, variants: dict[str, dict]) -> dict:
    """The overlay of a variant name; `a+b` composes registered variants `a` and `b`.

    Composition is refused when two parts set the same key to different values, because the
    result would depend on the order they are listed in.
    """
    if name in variants:
        return copy.deepcopy(variants[name] or {})
    parts = name.split("+")
    unknown = [p for p in parts if p not in variants]
    if len(parts) == 1 or unknown:
        raise UserError(f"unknown variant '{(unknown or [name])[0]}' (defined: {', '.join(sorted(variants))})")
    merged: dict = {}
    owner: dict[str, tuple[str, Any]] = {}
    for part in parts:
        overlay = variants[part] or {}
        for key, value in _leaves(overlay).items():
            if key in owner and owner[key][1] != value:
                raise UserError(f"variants '{owner[key][0]}' and '{part}' cannot be combined in '{name}': "
                                f"both set {key} ({owner[key][1]!r} vs {value!r})")
            owner[key] = (part, value)
        merged = deep_merge(merged, overlay)
    return merged


def format_lr(lr: float) -> str:
    """Learning rate as it appears in run folder names: 0.003 -> '0.003', 3e-05 -> '3e-05'."""
    return f"{lr:g}"


def resolve_run(experiment: dict, study: str, variant: str, depth: int, lr: float, seed: int,
                shards: str) -> dict:
    """The resolved config dict of one run (validated later by `load_run_config`)."""
    studies = experiment.get("studies", {})
    if study not in studies:
        raise UserError(f"unknown study '{study}' (defined: {', '.join(sorted(studies))})")
    base = {key: experiment.get(key, {}) for key in SECTIONS}
    run = deep_merge(base, studies[study].get("overrides", {}))
    run = deep_merge(run, variant_overlay(variant, experiment.get("variants", {})))
    run = deep_merge(run, {"model": {"n_layer": int(depth)}, "optim": {"lr": float(lr)}})
    tok = experiment.get("tokenizer", {})
    run["data"] = {"shards": shards, "tokenizer": tok.get("kind", "bpe"),
                   "vocab_size": int(tok.get("vocab_size", 0)) if tok.get("kind", "bpe") == "bpe" else 0}
    run.update(study=study, variant=variant, seed=int(seed))
    return run
