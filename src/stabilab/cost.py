"""What a grid costs before it runs: runs, training tokens and model FLOPs per study, and a rough
time from measured throughput.

Model FLOPs per token are the trainer's own (`GPT.flops_per_token`: 6 N + 12 L H Q T), from the
model built on torch's meta device (no memory, no init); tokens per run are steps x batch_size x
grad_accum x block_size (the trainer's `tokens_per_step`; src/stabilab/train/ is not imported
here). The time is the grid's FLOPs over the FLOP/s that whole grids achieved on the same kind of
device (CALIBRATION, built only from measurements committed in this repository): the range over
this preset's own grids where there are some, else over all of that device's. Small models and
grids of few runs sit near the low end of what a device achieves, so the range is rough.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from .config import load_run_config
from .experiment import grokking_runs, run_config, runs, shards_dir

CALIBRATION = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "calibration.csv"
# the device kind a config's runtime.device runs on, for the estimate: presets meant for a GPU say
# cuda and were measured on an H200; auto is the default config's CPU job
DEVICE_KIND = {"cuda": "h200", "cpu": "cpu", "auto": "cpu"}
DEVICE_NAME = {"h200": "one H200", "cpu": "a 2-core CPU"}


@cache
def _flops_per_token(model_json: str) -> int:
    import torch

    from .config import ModelConfig
    from .model import GPT

    with torch.device("meta"):
        return GPT(ModelConfig.model_validate(json.loads(model_json))).flops_per_token()


def vocab_size(config: dict) -> int:
    """The vocabulary the runs will train with: the BPE's size, or GPT-2's."""
    from .tokenizer import GPT2_VOCAB

    tok = config.get("tokenizer") or {}
    return GPT2_VOCAB if tok.get("kind") == "gpt2" else int(tok.get("vocab_size", 2048))


@dataclass
class Cost:
    runs: int = 0
    tokens: int = 0
    flops: float = 0.0

    def add(self, other: Cost) -> None:
        self.runs, self.tokens, self.flops = (self.runs + other.runs, self.tokens + other.tokens,
                                              self.flops + other.flops)


def grid_cost(config: dict) -> dict[str, Cost]:
    """Per study of a prepared config (`experiment.prepare`): its runs, training tokens and model
    FLOPs, if no run stops early."""
    vocab, shards, out = vocab_size(config), shards_dir(config), {}
    for run in runs(config):
        cfg = load_run_config(run_config(config, run, shards)).with_vocab(vocab)
        t = cfg.train
        tokens = t.steps * t.batch_size * t.grad_accum * cfg.model.block_size
        flops = _flops_per_token(json.dumps(cfg.model.to_dict(), sort_keys=True)) * tokens
        out.setdefault(run.study, Cost()).add(Cost(1, tokens, flops))
    return out


def calibration(path: str | Path = CALIBRATION) -> list[dict]:
    """The measured grids: device, preset, runs, model_pflop, wall_s, source (one row each)."""
    path = Path(path)
    if not path.exists():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def time_range(flops: float, device: str, preset: str = "", rows: list[dict] | None = None):
    """Seconds the FLOPs take on `device` (a DEVICE_NAME kind) at the highest and lowest FLOP/s
    measured there (this preset's grids where there are some), and where those come from; None
    without a measurement."""
    rows = [r for r in (calibration() if rows is None else rows) if r["device"] == device]
    own = [r for r in rows if r["preset"] == preset]
    rows = own or rows
    if not rows or flops <= 0:
        return None
    speeds = [float(r["model_pflop"]) * 1e15 / float(r["wall_s"]) for r in rows]
    grids = f"{len(rows)} grid{'s' * (len(rows) > 1)}"
    which = f"measured for '{preset}' in {grids}" if own else f"the range of {grids} measured there"
    return flops / max(speeds), flops / min(speeds), f"at {_span(min(speeds), max(speeds), 'FLOP/s')}, {which}"


def _si(x: float, unit: str) -> str:
    """1.23 PFLOP, 2.75B (tokens: B, not G)."""
    prefixes = ((1e18, "E"), (1e15, "P"), (1e12, "T"), (1e9, "G" if unit else "B"), (1e6, "M"), (1e3, "k"))
    scale, prefix = next(((s, p) for s, p in prefixes if x >= s), (1, ""))
    return f"{x / scale:.3g}{' ' if unit else ''}{prefix}{unit}"


def _span(low: float, high: float, unit: str) -> str:
    a, b = _si(low, unit), _si(high, unit)
    if a == b:
        return a
    return f"{a.split(' ')[0]}-{b}" if a.split(" ")[-1] == b.split(" ")[-1] else f"{a} to {b}"


def rough_duration(seconds: float) -> str:
    """Two significant digits: 45 s, 6.4 min, 40 min, 1.3 h, 140 days."""
    for unit, size, up_to in (("s", 1, 90), ("min", 60, 90 * 60), ("h", 3600, 48 * 3600), ("days", 86400, None)):
        if up_to is None or seconds < up_to:
            return f"{float(f'{seconds / size:.2g}'):g} {unit}"
    raise AssertionError


def summary_lines(config: dict) -> list[str]:
    """check-config's account of a prepared config: runs, tokens and model FLOPs per study, and
    roughly how long the grid trains."""
    costs, total = grid_cost(config), Cost()
    width = max([len(s) for s in costs] + [len("grokking"), len("total")])
    lines = []
    for study, c in costs.items():
        total.add(c)
        lines.append(f"  {study:<{width}} {c.runs:>4} runs  {_si(c.tokens, ''):>6} tokens  {_si(c.flops, 'FLOP')}")
    if len(costs) > 1:
        lines.append(f"  {'total':<{width}} {total.runs:>4} runs  {_si(total.tokens, ''):>6} tokens  "
                     f"{_si(total.flops, 'FLOP')}")
    if lines:
        lines[-1] += " (model FLOPs, 6N + attention, if no run stops early)"
    if grok := grokking_runs(config):
        epochs = max(spec.epochs for spec in grok)
        lines.append(f"  {'grokking':<{width}} {len(grok):>4} runs  (MLPs, up to {epochs} epochs; not in the FLOPs)")
    device = DEVICE_KIND[(config.get("runtime") or {}).get("device", "auto")]
    if estimate := time_range(total.flops, device, config["name"]):
        low, high, which = estimate
        a, b = rough_duration(low), rough_duration(high)
        span = a if a == b else f"{a.split(' ')[0]} to {b}" if a.split(" ")[1] == b.split(" ")[1] else f"{a} to {b}"
        lines.append(f"  time: roughly {span} on {DEVICE_NAME[device]} ({which}; "
                     f"{CALIBRATION.relative_to(CALIBRATION.parents[2])})")
    return lines
