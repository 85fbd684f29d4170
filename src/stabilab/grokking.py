"""Grokking study of the StableMax paper (arXiv 2501.04697, METHODS.md §2–§4).

A [200, 200] ReLU MLP without biases learns (a + b) mod p or (a * b) mod p from one-hot inputs,
trained full-batch with AdamW and no weight decay, in four variants:

- ``softmax_fp32``  softmax cross-entropy, float32 (expected: Softmax Collapse, no grokking)
- ``softmax_fp64``  the same with the whole model, inputs and loss in float64
- ``stablemax``     StableMax cross-entropy of the float32 logits, computed in float32 or, as in the
                    official code, in float64 (``stablemax_dtype``); expected: grokking without
                    regularization
- ``perpgrad``      softmax cross-entropy, float32, with the ⊥Grad projection before each AdamW step

One run = (variant, operation, seed) -> ``metrics.jsonl`` + ``summary.json`` in its own folder;
``report`` turns a set of run folders into the study's tables and figures. The command line
subcommands ``grok-train`` and ``grok-report`` are added by :func:`register`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from .config import from_dict
from .errors import UserError
from .losses import normalized_logits, stablemax_transform
from .metrics import collapse_fractions

VARIANTS = ("softmax_fp32", "softmax_fp64", "stablemax", "perpgrad")
OPERATIONS = ("add", "mul")
TARGET_ACC = 0.95  # "epochs to 95 % test accuracy"

# ============================================================================ configuration


@dataclass
class Overrides:
    """Per-variant hyperparameters; null keeps the study-wide value."""

    lr: float | None = None
    beta2: float | None = None
    eps: float | None = None
    epochs: int | None = None
    eval_every: int | None = None


@dataclass
class VariantOverrides:
    softmax_fp32: Overrides = field(default_factory=Overrides)
    softmax_fp64: Overrides = field(default_factory=Overrides)
    stablemax: Overrides = field(default_factory=Overrides)
    perpgrad: Overrides = field(default_factory=Overrides)


@dataclass
class GrokkingConfig:
    """The ``grokking:`` section of the experiment config (defaults = the short CPU preset)."""

    operations: list[Literal["add", "mul"]] = field(default_factory=lambda: ["add"])
    modulus: int = 113
    train_fraction: float = 0.4
    variants: list[Literal["softmax_fp32", "softmax_fp64", "stablemax", "perpgrad"]] = field(
        default_factory=lambda: list(VARIANTS))
    seeds: list[int] = field(default_factory=lambda: [0])
    epochs: int = 200
    lr: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.99
    eps: float = 1e-25  # the official code's AdamW epsilon
    hidden: list[int] = field(default_factory=lambda: [200, 200])
    init_scale: float = 1.0  # multiplies PyTorch's default init; the paper's MLP runs use 1
    # dtype the StableMax loss is computed in (float32 model either way); official code: float64
    stablemax_dtype: Literal["float32", "float64"] = "float32"
    eval_every: int = 10
    overrides: VariantOverrides = field(default_factory=VariantOverrides)


@dataclass
class RunSpec:
    """One fully resolved run: what `grok-train --spec` receives as JSON."""

    variant: Literal["softmax_fp32", "softmax_fp64", "stablemax", "perpgrad"]
    operation: Literal["add", "mul"] = "add"
    seed: int = 0
    modulus: int = 113
    train_fraction: float = 0.4
    epochs: int = 200
    lr: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.99
    eps: float = 1e-25
    hidden: list[int] = field(default_factory=lambda: [200, 200])
    init_scale: float = 1.0
    eval_every: int = 10
    stablemax_dtype: Literal["float32", "float64"] = "float32"

    @property
    def dtype(self) -> torch.dtype:
        """dtype of the model and its inputs."""
        return torch.float64 if self.variant == "softmax_fp64" else torch.float32

    @property
    def loss_dtype(self) -> torch.dtype:
        """dtype the loss (and the Softmax-Collapse test) is computed in."""
        if self.variant == "stablemax":
            return getattr(torch, self.stablemax_dtype)
        return self.dtype

    @property
    def loss_kind(self) -> str:
        return "stablemax" if self.variant == "stablemax" else "softmax"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise UserError(message)


def check_spec(spec: RunSpec) -> RunSpec:
    _check(spec.modulus >= 2, f"grokking: modulus must be >= 2, got {spec.modulus}")
    _check(0.0 < spec.train_fraction < 1.0,
           f"grokking: train_fraction must be in (0, 1), got {spec.train_fraction}")
    n_train = round(spec.train_fraction * spec.modulus**2)
    _check(0 < n_train < spec.modulus**2,
           f"grokking: train_fraction {spec.train_fraction} leaves an empty train or test set "
           f"for modulus {spec.modulus}")
    _check(spec.epochs >= 1, f"grokking: epochs must be >= 1, got {spec.epochs}")
    _check(spec.eval_every >= 1, f"grokking: eval_every must be >= 1, got {spec.eval_every}")
    _check(spec.lr > 0, f"grokking: lr must be > 0, got {spec.lr}")
    _check(0 <= spec.beta1 < 1 and 0 <= spec.beta2 < 1, "grokking: betas must be in [0, 1)")
    _check(spec.eps >= 0, f"grokking: eps must be >= 0, got {spec.eps}")
    _check(len(spec.hidden) >= 1 and all(h >= 1 for h in spec.hidden),
           f"grokking: hidden must be a non-empty list of positive widths, got {spec.hidden}")
    _check(spec.init_scale > 0, f"grokking: init_scale must be > 0, got {spec.init_scale}")
    return spec


def load_config(section: dict | None) -> GrokkingConfig:
    """Strictly parse the ``grokking:`` config section (unknown keys -> UserError)."""
    cfg = from_dict(GrokkingConfig, section or {}, "grokking")
    _check(len(set(cfg.seeds)) == len(cfg.seeds), f"grokking.seeds has duplicates: {cfg.seeds}")
    return cfg


def run_specs(section: dict | None) -> list[RunSpec]:
    """Every run of the study (variant x operation x seed), resolved and checked.
    An empty ``variants`` (or ``operations`` or ``seeds``) list gives no runs: the study is off."""
    cfg = load_config(section)
    shared = {k: getattr(cfg, k) for k in ("modulus", "train_fraction", "epochs", "lr", "beta1",
                                           "beta2", "eps", "hidden", "init_scale", "eval_every",
                                           "stablemax_dtype")}
    specs = []
    for operation in cfg.operations:
        for variant in cfg.variants:
            extra = {k: v for k, v in dataclasses.asdict(getattr(cfg.overrides, variant)).items()
                     if v is not None}
            for seed in cfg.seeds:
                specs.append(check_spec(RunSpec(variant=variant, operation=operation, seed=seed,
                                                **{**shared, **extra})))
    return specs


def parse_spec(data: dict) -> RunSpec:
    return check_spec(from_dict(RunSpec, data, "spec"))


def run_subdir(spec: RunSpec) -> str:
    """Relative folder of a run inside the study folder (matches the Snakemake rule)."""
    return f"{spec.operation}/{spec.variant}/s{spec.seed}"


# ============================================================================ data


def make_pairs(p: int, operation: str) -> tuple[torch.Tensor, torch.Tensor]:
    """All (a, b) in [0, p)^2 in row-major order (index a * p + b) and their labels.
    Returns pairs (p², 2) int64 and labels (p²,) int64."""
    a, b = torch.meshgrid(torch.arange(p), torch.arange(p), indexing="ij")
    a, b = a.reshape(-1), b.reshape(-1)
    if operation == "add":
        labels = (a + b) % p
    elif operation == "mul":
        labels = (a * b) % p
    else:
        raise UserError(f"grokking: unknown operation {operation!r} (allowed: {', '.join(OPERATIONS)})")
    return torch.stack([a, b], dim=1), labels


def split_indices(n: int, train_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exactly round(train_fraction * n) training indices from a permutation seeded by `seed`;
    the rest is the test set. Both sorted, disjoint, covering range(n)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_train = round(train_fraction * n)
    return perm[:n_train].sort().values, perm[n_train:].sort().values


def one_hot_inputs(pairs: torch.Tensor, p: int, dtype: torch.dtype) -> torch.Tensor:
    """(N, 2) pairs -> (N, 2p) concatenation of one-hot(a) and one-hot(b)."""
    return torch.cat([F.one_hot(pairs[:, 0], p), F.one_hot(pairs[:, 1], p)], dim=1).to(dtype)


@dataclass
class Split:
    x_train: torch.Tensor  # (n_train, 2p)
    y_train: torch.Tensor  # (n_train,)
    x_test: torch.Tensor  # (n_test, 2p)
    y_test: torch.Tensor  # (n_test,)


def make_split(spec: RunSpec, device: torch.device | str = "cpu") -> Split:
    pairs, labels = make_pairs(spec.modulus, spec.operation)
    train_idx, test_idx = split_indices(len(labels), spec.train_fraction, spec.seed)
    x = one_hot_inputs(pairs, spec.modulus, spec.dtype).to(device)
    labels = labels.to(device)
    return Split(x[train_idx], labels[train_idx], x[test_idx], labels[test_idx])


# ============================================================================ model and loss


def build_mlp(in_dim: int, hidden: list[int], out_dim: int, init_scale: float = 1.0) -> nn.Sequential:
    """Linear(in, h1), ReLU, ..., Linear(h_k, out), all without biases, PyTorch's default init
    (as the official code) times `init_scale`."""
    widths = [in_dim, *hidden]
    layers: list[nn.Module] = []
    for w_in, w_out in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(w_in, w_out, bias=False), nn.ReLU()]
    layers.append(nn.Linear(widths[-1], out_dim, bias=False))
    model = nn.Sequential(*layers)
    if init_scale != 1.0:
        with torch.no_grad():
            for param in model.parameters():
                param.mul_(init_scale)
    return model


def build_model(spec: RunSpec) -> nn.Sequential:
    torch.manual_seed(spec.seed)  # same initial weights for every variant of a seed
    model = build_mlp(2 * spec.modulus, spec.hidden, spec.modulus, spec.init_scale)
    return model.to(spec.dtype)  # float64 variant: the float32 init, cast


def loss_per_sample(logits: torch.Tensor, targets: torch.Tensor, kind: str) -> torch.Tensor:
    """(N, p) logits, (N,) targets -> (N,) cross-entropy of softmax or StableMax, in the logits'
    dtype."""
    z = stablemax_transform(logits) if kind == "stablemax" else logits
    return F.cross_entropy(z, targets, reduction="none")


def build_optimizer(model: nn.Module, spec: RunSpec):
    params = list(model.parameters())
    adamw = torch.optim.AdamW(params, lr=spec.lr, betas=(spec.beta1, spec.beta2), eps=spec.eps,
                              weight_decay=0.0)
    if spec.variant != "perpgrad":
        return adamw
    from .optim import PerpGrad  # ⊥AdamW: project every gradient before the AdamW step
    return PerpGrad(adamw)


# ============================================================================ metrics


def collapse_native(logits: torch.Tensor, targets: torch.Tensor, kind: str) -> dict[str, float]:
    """Softmax Collapse and zero-loss fractions in the precision the variant computes its loss:
    the shared float32 measure for float32 runs, the same test in float64 for the float64 run."""
    if logits.dtype != torch.float64:
        out = collapse_fractions(logits, targets, kind)
        return {k: float(v) for k, v in out.items()}
    z = normalized_logits(logits, kind)
    denom = torch.exp(z - z.amax(dim=-1, keepdim=True)).sum(dim=-1)  # (N,)
    losses = F.cross_entropy(z, targets, reduction="none")  # (N,)
    return {"collapse_frac": float((denom == 1.0).double().mean()),
            "zero_loss_frac": float((losses == 0.0).double().mean())}


def weight_norm(model: nn.Module) -> float:
    """L2 norm of all parameters together."""
    return float(torch.sqrt(sum(p.detach().double().square().sum() for p in model.parameters())))


@torch.no_grad()
def evaluate(model: nn.Module, data: Split, spec: RunSpec, epoch: int) -> dict:
    """One metrics record. Collapse fractions are measured on the training set (where the loss
    gradient comes from), as in the official code."""
    kind = spec.loss_kind
    model.eval()
    train_logits = model(data.x_train).to(spec.loss_dtype)  # (n_train, p)
    test_logits = model(data.x_test).to(spec.loss_dtype)  # (n_test, p)
    model.train()
    native = collapse_native(train_logits, data.y_train, kind)
    fp32 = collapse_fractions(train_logits, data.y_train, kind)
    return {
        "epoch": epoch,
        "train_acc": float((train_logits.argmax(-1) == data.y_train).double().mean()),
        "test_acc": float((test_logits.argmax(-1) == data.y_test).double().mean()),
        "train_loss": float(loss_per_sample(train_logits, data.y_train, kind).mean()),
        "test_loss": float(loss_per_sample(test_logits, data.y_test, kind).mean()),
        "collapse_frac": native["collapse_frac"],
        "zero_loss_frac": native["zero_loss_frac"],
        "collapse_frac_fp32": float(fp32["collapse_frac"]),
        "weight_norm": weight_norm(model),
    }


def first_epoch_at(records: list[dict], key: str, threshold: float = TARGET_ACC) -> int | None:
    """First evaluated epoch with records[key] >= threshold, None if never."""
    return next((r["epoch"] for r in records if r[key] >= threshold), None)


# ============================================================================ training


def atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_metrics(out: Path, records: list[dict]) -> None:
    atomic_write(out / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in records))


def make_summary(spec: RunSpec, records: list[dict], epochs_run: int, diverged_at: int | None,
                 wall_s: float, device: str = "cpu") -> dict:
    final = records[-1]
    return {
        "spec": spec.to_dict(),
        "epochs_run": epochs_run,
        "epochs_to_95": first_epoch_at(records, "test_acc"),  # null = never reached
        "train_epochs_to_95": first_epoch_at(records, "train_acc"),
        "final_train_acc": final["train_acc"],
        "final_test_acc": final["test_acc"],
        "best_test_acc": max(r["test_acc"] for r in records),
        "final_collapse_frac": final["collapse_frac"],
        "max_collapse_frac": max(r["collapse_frac"] for r in records),
        "final_zero_loss_frac": final["zero_loss_frac"],
        "final_weight_norm": final["weight_norm"],
        "diverged_at": diverged_at,
        "wall_s": round(wall_s, 2),
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "device": device,
    }


def pick_device(name: str) -> torch.device:
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"grok-train: device {name!r} requested but CUDA is not available")
    try:
        return torch.device(name)
    except RuntimeError:
        raise UserError(f"grok-train: unknown device {name!r}") from None


def train_step(model: nn.Module, optimizer, data: Split, spec: RunSpec) -> None:
    """One full-batch step (one epoch)."""
    optimizer.zero_grad(set_to_none=True)
    logits = model(data.x_train).to(spec.loss_dtype)  # (n_train, p)
    loss_per_sample(logits, data.y_train, spec.loss_kind).mean().backward()
    optimizer.step()


def train_run(spec: RunSpec, out_dir: str | Path, threads: int | None = None, device: str = "cpu",
              flush_s: float = 30.0, log=print) -> dict:
    """Train one run; writes out/metrics.jsonl (rewritten atomically every `flush_s` seconds and
    at the end) and then out/summary.json, whose presence marks a finished run. Returns the
    summary."""
    if threads:
        torch.set_num_threads(threads)
    dev = pick_device(device)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").unlink(missing_ok=True)  # a stale one would mark this run done
    data = make_split(spec, dev)
    model = build_model(spec).to(dev)
    optimizer = build_optimizer(model, spec)
    start = last_flush = time.time()
    records = [evaluate(model, data, spec, 0)]
    diverged_at = None
    epoch = 0
    for epoch in range(1, spec.epochs + 1):
        train_step(model, optimizer, data, spec)
        if epoch % spec.eval_every == 0 or epoch == spec.epochs:
            records.append(evaluate(model, data, spec, epoch))
            if not math.isfinite(records[-1]["train_loss"]):  # NaN weights stay NaN
                diverged_at = epoch
            if time.time() - last_flush > flush_s:
                write_metrics(out, records)
                last_flush = time.time()
                r = records[-1]
                log(f"[{spec.variant} {spec.operation} s{spec.seed}] epoch {epoch}: "
                    f"train_acc {r['train_acc']:.3f} test_acc {r['test_acc']:.3f} "
                    f"collapse {r['collapse_frac']:.3f} |w| {r['weight_norm']:.1f}")
        if diverged_at:
            log(f"[{spec.variant}] non-finite loss at epoch {epoch}: stopped")
            break
    write_metrics(out, records)
    summary = make_summary(spec, records, epoch, diverged_at, time.time() - start, str(dev))
    atomic_write(out / "summary.json", json.dumps(summary, indent=2) + "\n")  # last: marks done
    return summary


# ============================================================================ tables


def find_run_dirs(paths: list[str | Path]) -> list[Path]:
    """Run folders (holding summary.json) among `paths` or anywhere below them."""
    found: list[Path] = []
    for p in map(Path, paths):
        if (p / "summary.json").is_file():
            found.append(p)
        elif p.is_dir():
            found += sorted(s.parent for s in p.rglob("summary.json"))
        else:
            raise UserError(f"grok-report: no such run folder: {p}")
    if not found:
        raise UserError(f"grok-report: no summary.json under {', '.join(map(str, paths))}")
    return sorted(set(found))


def load_run(run_dir: Path) -> tuple[dict, list[dict]]:
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
        return summary, [json.loads(line) for line in lines if line.strip()]
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"grok-report: unreadable run {run_dir}: {exc}") from None


KEYS = ["operation", "variant", "seed"]
SUMMARY_COLUMNS = ["final_test_acc", "best_test_acc", "final_train_acc", "final_collapse_frac",
                   "max_collapse_frac", "final_zero_loss_frac", "final_weight_norm", "epochs_run",
                   "diverged_at", "wall_s", "device"]


def _never(epoch) -> int | str:
    return "never" if epoch is None else int(epoch)


def _run_key(spec: RunSpec) -> dict:
    return {"operation": spec.operation, "variant": spec.variant, "seed": spec.seed,
            "modulus": spec.modulus, "loss_dtype": str(spec.loss_dtype).removeprefix("torch.")}


def _sorted(df):
    order = {v: i for i, v in enumerate(VARIANTS)}
    by = KEYS + ["epoch"] if "epoch" in df else KEYS
    return df.sort_values(by, key=lambda c: c.map(order) if c.name == "variant" else c,
                          kind="stable").reset_index(drop=True)


def build_tables(run_dirs: list[Path]):
    """(steps, summary) DataFrames: one row per run and eval epoch; one row per run."""
    import pandas as pd

    steps, rows = [], []
    for run_dir in run_dirs:
        summary, records = load_run(run_dir)
        spec = parse_spec(summary["spec"])
        key = _run_key(spec)
        steps += [{**key, **r} for r in records]
        rows.append({**key, "epochs_to_95": _never(summary["epochs_to_95"]),
                     "train_epochs_to_95": _never(summary["train_epochs_to_95"]),
                     **{c: summary.get(c) for c in SUMMARY_COLUMNS},
                     "lr": spec.lr, "beta2": spec.beta2})
    return _sorted(pd.DataFrame(steps)), _sorted(pd.DataFrame(rows))


# ============================================================================ figures

OP_SYMBOL = {"add": "+", "mul": "*"}
# legend label per (variant, loss dtype) and its colour, in legend order
PALETTE = {
    ("softmax_fp32", "float32"): ("softmax, float32", "#d62728"),
    ("softmax_fp64", "float64"): ("softmax, float64", "#ff7f0e"),
    ("stablemax", "float32"): ("StableMax, float32", "#9467bd"),
    ("stablemax", "float64"): ("StableMax, float64 loss", "#1f77b4"),
    ("perpgrad", "float32"): ("⊥AdamW, float32", "#2ca02c"),
}


def _use_log_x(steps) -> bool:
    positive = steps.loc[steps["epoch"] > 0, "epoch"]
    return len(positive) > 0 and positive.max() / positive.min() >= 100


def _line_figure(steps, y: str, ylabel: str, title: str, path_stem: Path, *, style: str | None = None,
                 logy: bool = False, ylim=None) -> list[Path]:
    """One panel per operation: y vs epoch, colour = variant, line style = `style` column."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    data = steps.copy()
    data["variant"] = [PALETTE[(v, d)][0] for v, d in zip(data["variant"], data["loss_dtype"])]
    data["operation"] = [f"(a {OP_SYMBOL[op]} b) mod {p}" for op, p in zip(data["operation"], data["modulus"])]
    present = set(data["variant"])
    log_x = _use_log_x(data)
    if log_x:
        data = data[data["epoch"] > 0]  # epoch 0 has no place on a log axis
    operations = sorted(set(data["operation"]))
    sns.set_theme(style="whitegrid", context="talk")
    order = [label for label, _ in PALETTE.values() if label in present]
    # nested widths (first variant widest): curves that coincide, e.g. float32 and float64
    # softmax before collapse, stay visible one inside the other
    widths = {label: 1.6 + 1.4 * (len(order) - 1 - i) for i, label in enumerate(order)}
    grid = sns.relplot(data=data, x="epoch", y=y, hue="variant", size="variant", sizes=widths,
                       style=style, col="operation", col_order=operations, kind="line", units="seed",
                       estimator=None, palette={label: c for label, c in PALETTE.values()},
                       hue_order=order, size_order=order, height=5.5, aspect=1.35,
                       facet_kws={"sharey": True})
    for ax in grid.axes.flat:
        if log_x:
            ax.set_xscale("log")
        if logy:
            ax.set_yscale("log")
        if ylim is not None:
            ax.set_ylim(*ylim)
    grid.set_axis_labels("epoch (full-batch step)" + (", log scale" if log_x else ""), ylabel)
    grid.set_titles(col_template="{col_name}")
    grid.figure.suptitle(title, y=1.03)
    paths = []
    for ext in ("png", "pdf"):
        path = path_stem.with_suffix(f".{ext}")
        grid.figure.savefig(path, dpi=150, bbox_inches="tight")
        paths.append(path)
    plt.close(grid.figure)
    return paths


FIGURES = {
    "grokking_test_accuracy": "test accuracy (solid) and train accuracy (dashed) vs epoch",
    "grokking_collapse": "Softmax-Collapse fraction of the training set vs epoch",
    "grokking_weight_norm": "L2 norm of all weights vs epoch",
}


def make_figures(steps, fig_dir: Path) -> list[Path]:
    import pandas as pd

    fig_dir.mkdir(parents=True, exist_ok=True)
    acc = pd.concat([steps.assign(split="test", accuracy=steps["test_acc"]),
                     steps.assign(split="train", accuracy=steps["train_acc"])], ignore_index=True)
    paths = _line_figure(acc, "accuracy", "accuracy", "Grokking: accuracy per variant",
                         fig_dir / "grokking_test_accuracy", style="split", ylim=(-0.02, 1.02))
    paths += _line_figure(steps, "collapse_frac", "fraction of train samples in SC",
                          "Softmax Collapse (sum exp(z - max z) == 1)",
                          fig_dir / "grokking_collapse", ylim=(-0.02, 1.02))
    paths += _line_figure(steps, "weight_norm", "‖θ‖₂ (all weights)", "Weight norm",
                          fig_dir / "grokking_weight_norm", logy=True)
    return paths


def report(runs: list[str | Path], tables_dir: str | Path, figures_dir: str | Path) -> dict:
    """Tables (CSV) and figures (PNG + PDF) of a set of runs."""
    run_dirs = find_run_dirs(runs)
    steps, summary = build_tables(run_dirs)
    tables = Path(tables_dir)
    tables.mkdir(parents=True, exist_ok=True)
    steps.to_csv(tables / "grokking_steps.csv", index=False)
    summary.to_csv(tables / "grokking_summary.csv", index=False)
    figures = make_figures(steps, Path(figures_dir))
    return {"runs": len(run_dirs), "tables": [str(tables / "grokking_steps.csv"),
                                              str(tables / "grokking_summary.csv")],
            "figures": [str(p) for p in figures]}


def figures_from_tables(tables_dir: str | Path, figures_dir: str | Path) -> list[Path]:
    """Redraw the figures from a grokking_steps.csv alone (no run folders, no training)."""
    import pandas as pd

    path = Path(tables_dir) / "grokking_steps.csv"
    if not path.exists():
        raise UserError(f"table missing: {path}")
    return make_figures(pd.read_csv(path), Path(figures_dir))


# ============================================================================ command line


def _parse_spec_arg(text: str) -> RunSpec:
    if text.startswith("@"):
        try:
            text = Path(text[1:]).read_text()
        except OSError as exc:
            raise UserError(f"grok-train: cannot read spec file {text[1:]}: {exc.strerror}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"grok-train: --spec is not valid JSON ({exc.msg} at char {exc.pos})") from None
    return parse_spec(data)


def cmd_train(args: argparse.Namespace) -> int:
    spec = _parse_spec_arg(args.spec)
    summary = train_run(spec, args.out, threads=args.threads, device=args.device)
    e95 = summary["epochs_to_95"]
    print(f"{spec.variant} {spec.operation} s{spec.seed}: final test acc "
          f"{summary['final_test_acc']:.4f}, epochs to 95% {'never' if e95 is None else e95}, "
          f"{summary['wall_s']:.1f} s")
    return 0


def cmd_figures(args: argparse.Namespace) -> int:
    print(f"grok-figures: {len(figures_from_tables(args.tables, args.figures))} figure files -> {args.figures}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    out = report(args.runs, args.tables, args.figures)
    print(f"grok-report: {out['runs']} runs -> {len(out['tables'])} tables, "
          f"{len(out['figures'])} figure files")
    return 0


def register(subparsers) -> None:
    """Add `grok-train` and `grok-report` to an argparse subparsers object; each sets
    `func(args) -> exit code`."""
    train = subparsers.add_parser(
        "grok-train", help="train one grokking run (StableMax paper, modular arithmetic MLP)",
        description="Train one grokking run; writes metrics.jsonl and summary.json into --out.")
    train.add_argument("--spec", required=True,
                       help="the resolved run as JSON (variant, operation, seed, hyperparameters), "
                            "or @FILE holding it")
    train.add_argument("--out", required=True, help="run folder to write")
    train.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    train.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:1, ...)")
    train.set_defaults(func=cmd_train)
    rep = subparsers.add_parser(
        "grok-report", help="tables and figures of grokking runs",
        description="Collect grokking runs into grokking_steps.csv / grokking_summary.csv and "
                    "draw the accuracy, Softmax-Collapse and weight-norm figures.")
    rep.add_argument("--runs", nargs="+", required=True,
                     help="run folders, or folders to search for */summary.json")
    rep.add_argument("--tables", required=True, help="folder for the CSV tables")
    rep.add_argument("--figures", required=True, help="folder for the PNG and PDF figures")
    rep.set_defaults(func=cmd_report)
    fig = subparsers.add_parser("grok-figures", help="redraw grokking figures from grokking_steps.csv (no training)")
    fig.add_argument("--tables", required=True, help="folder holding grokking_steps.csv")
    fig.add_argument("--figures", required=True, help="folder for the PNG and PDF figures")
    fig.set_defaults(func=cmd_figures)


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry point: ``python -m stabilab.grokking grok-train ...``."""
    parser = argparse.ArgumentParser(prog="python -m stabilab.grokking")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
