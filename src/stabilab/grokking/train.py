"""Training one grokking run: full-batch AdamW (or ⊥AdamW), evaluated every `eval_every` epochs."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
from torch import nn

from ..device import pick_device, provenance
from ..io import atomic_write, write_json
from ..metrics import collapse_fractions
from .config import TARGET_ACC, RunSpec
from .data import Split, make_split
from .model import build_model, build_optimizer, loss_per_sample


def weight_norm(model: nn.Module) -> float:
    """L2 norm of all parameters together."""
    return float(torch.sqrt(sum(p.detach().double().square().sum() for p in model.parameters())))


@torch.no_grad()
def evaluate(model: nn.Module, data: Split, spec: RunSpec, epoch: int) -> dict:
    """One metrics record. Collapse fractions are measured on the training set (where the loss
    gradient comes from), as in the official code: in the precision the variant computes its
    loss, and in float32 (`collapse_frac_fp32`)."""
    kind, dtype = spec.loss_kind, getattr(torch, spec.loss_dtype)
    model.eval()
    train_logits = model(data.x_train).to(dtype)  # (n_train, p)
    test_logits = model(data.x_test).to(dtype)  # (n_test, p)
    model.train()
    native = collapse_fractions(train_logits, data.y_train, kind)
    fp32 = collapse_fractions(train_logits.float(), data.y_train, kind)
    return {
        "epoch": epoch,
        "train_acc": float((train_logits.argmax(-1) == data.y_train).double().mean()),
        "test_acc": float((test_logits.argmax(-1) == data.y_test).double().mean()),
        "train_loss": float(loss_per_sample(train_logits, data.y_train, kind).mean()),
        "test_loss": float(loss_per_sample(test_logits, data.y_test, kind).mean()),
        "collapse_frac": float(native["collapse_frac"]),
        "zero_loss_frac": float(native["zero_loss_frac"]),
        "collapse_frac_fp32": float(fp32["collapse_frac"]),
        "weight_norm": weight_norm(model),
    }


def first_epoch_at(records: list[dict], key: str, threshold: float = TARGET_ACC) -> int | None:
    """First evaluated epoch with records[key] >= threshold, None if never."""
    return next((r["epoch"] for r in records if r[key] >= threshold), None)


def write_metrics(out: Path, records: list[dict]) -> None:
    atomic_write(out / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in records))


def make_summary(spec: RunSpec, records: list[dict], epochs_run: int, diverged_at: int | None,
                 wall_s: float, device: torch.device) -> dict:
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
        "device": str(device),
        "provenance": provenance(device),
    }


def train_step(model: nn.Module, optimizer, data: Split, spec: RunSpec) -> None:
    """One full-batch step (one epoch)."""
    optimizer.zero_grad(set_to_none=True)
    logits = model(data.x_train).to(getattr(torch, spec.loss_dtype))  # (n_train, p)
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
    summary = make_summary(spec, records, epoch, diverged_at, time.time() - start, dev)
    write_json(out / "summary.json", summary)  # last: marks the run done
    return summary
