"""What a grid costs before it runs: runs, training tokens and model FLOPs per study, GPU-hours on an
H100 and an H200, and a rough time from measured throughput.

Model FLOPs per token are the trainer's own (`GPT.flops_per_token`: 6 N + 12 L H Q T), from the
model built on torch's meta device (no memory, no init); tokens per run are steps x batch_size x
grad_accum x block_size (the trainer's `tokens_per_step`; src/stabilab/train/ is not imported
here). Both speeds come from CALIBRATION, built only from measurements committed in this repository:

- *grid* rows (model_pflop, wall_s): whole grids, several runs sharing one device. The time line
  is the grid's FLOPs over the FLOP/s such grids achieved on the same kind of device: the range over
  this preset's own grids where there are some, else over all of that device's.
- *shape* rows (gflop_per_token, tokens_per_s): one model alone on one GPU, its throughput measured
  (benchmarks/bench_throughput.py, benchmarks/paper_scale_smoke.py). GPU-hours: each run's FLOPs over
  the per-GPU FLOP/s of the rows of its own preset and study at its FLOPs per token; for a shape never
  measured, of the rows at the nearest measured FLOPs per token (on a log scale), on that GPU where
  it was measured there, else on the other (H100 and H200 share the dense bf16 peak of 989 TFLOP/s;
  at GPT-2 124M the H200 measured 5-9 % more tokens/s). A run on N GPUs costs N x its wall time:
  DDP's scaling is taken as perfect (90-95 % measured on two H200s, benchmarks/results/h200x2_ddp.md).
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

from .config import load_run_config
from .experiment import grokking_runs, run_config, runs, shards_dir

CALIBRATION = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "calibration.csv"
# the device kind a config's runtime.device runs on, for the estimate: presets meant for a GPU say
# cuda and were measured on an H200; auto is the default config's CPU job
DEVICE_KIND = {"cuda": "h200", "cpu": "cpu", "auto": "cpu"}
DEVICE_NAME = {"h200": "one H200", "h100": "one H100", "cpu": "a 2-core CPU"}
GPUS = {"h100": "H100", "h200": "H200"}  # the GPUs GPU-hours are estimated for
SAME_SHAPE = 0.01  # FLOPs per token within 1 %: the same shape


@cache
def _flops_per_token(model_json: str) -> int:
    import torch

    from .config import ModelConfig
    from .model import GPT

    with torch.device("meta"):
        return GPT(ModelConfig.model_validate(json.loads(model_json))).flops_per_token()


def vocab_size(config: dict) -> int:
    """The vocabulary the runs will train with: the BPE's or hf tokenizer's size, or GPT-2's."""
    from .tokenizer import GPT2_VOCAB

    tok = config.get("tokenizer") or {}
    return GPT2_VOCAB if tok.get("kind") == "gpt2" else int(tok.get("vocab_size", 2048))


def run_vocab(run: dict) -> int:
    """The vocabulary of a resolved run config: its model's, else its shards' tokenizer's."""
    from .tokenizer import GPT2_VOCAB

    data = run.get("data") or {}
    given = int((run.get("model") or {}).get("vocab_size") or 0)
    return given or (GPT2_VOCAB if data.get("tokenizer") == "gpt2" else int(data.get("vocab_size") or 2048))


@dataclass
class Cost:
    runs: int = 0
    tokens: int = 0
    flops: float = 0.0
    # GPU kind -> [GPU-seconds at the fastest, at the slowest speed assumed]
    gpu_s: dict[str, list[float]] = field(default_factory=dict)
    gflop: list[float] = field(default_factory=list)  # each run's model GFLOP per token
    processes: set[int] = field(default_factory=set)
    run_s: dict[str, list[float]] = field(default_factory=dict)  # GPU kind -> longest run's wall [low, high]
    # GPU kind -> where its runs' speeds came from -> those runs' GFLOP per token
    notes: dict[str, dict[str, list[float]]] = field(default_factory=dict)

    def add(self, other: Cost) -> None:
        self.runs, self.tokens, self.flops = (self.runs + other.runs, self.tokens + other.tokens,
                                              self.flops + other.flops)
        for gpu, (low, high) in other.gpu_s.items():
            mine = self.gpu_s.setdefault(gpu, [0.0, 0.0])
            mine[0], mine[1] = mine[0] + low, mine[1] + high
        for gpu, (low, high) in other.run_s.items():
            mine = self.run_s.setdefault(gpu, [0.0, 0.0])
            mine[0], mine[1] = max(mine[0], low), max(mine[1], high)
        self.gflop += other.gflop
        self.processes |= other.processes
        for gpu, notes in other.notes.items():
            for note, gflop in notes.items():
                self.notes.setdefault(gpu, {}).setdefault(note, []).extend(gflop)


def calibration(path: str | Path = CALIBRATION) -> list[dict]:
    """The measurements: device, preset, runs, at_once, model_pflop, wall_s, source, gflop_per_token,
    tokens_per_s (one row each; grid rows leave the last two empty, shape rows the two before)."""
    path = Path(path)
    if not path.exists():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def is_shape_row(row: dict) -> bool:
    return bool(row.get("gflop_per_token"))


def gpu_speed(gflop: float, gpu: str, key: str = "", rows: list[dict] | None = None):
    """(lowest, highest per-GPU FLOP/s, where they come from) for a model of `gflop` GFLOP per token
    on `gpu` (h100 or h200): the shape rows of preset `key` ('<preset>/<study>') at this FLOPs per
    token, else those at the nearest measured FLOPs per token, on `gpu` where measured there; None
    without any shape row."""
    rows = [r for r in (calibration() if rows is None else rows) if is_shape_row(r) and r["device"] in GPUS]
    if not rows or gflop <= 0:
        return None

    def same(r: dict, g: float) -> bool:
        return abs(float(r["gflop_per_token"]) / g - 1) < SAME_SHAPE

    own = [r for r in rows if key and r["preset"] == key and same(r, gflop)]
    if own:
        at, what = own, "measured at its shape"
    else:
        nearest = min(rows, key=lambda r: abs(math.log(float(r["gflop_per_token"]) / gflop)))
        g = float(nearest["gflop_per_token"])
        at = [r for r in rows if same(r, g)]
        what = ("measured at the same FLOPs per token ({labels}{where})" if abs(g / gflop - 1) < SAME_SHAPE else
                f"not measured: taken from the nearest measured FLOPs per token, {g:.3g} ({{labels}}{{where}})")
        if gflop > 1.5 * max(float(r["gflop_per_token"]) for r in rows):
            what += " (every measured model is smaller; larger ones usually run nearer the peak: this errs long)"
    here = [r for r in at if r["device"] == gpu]
    where = ""
    if not here:
        other = at[0]["device"]
        here, where = [r for r in at if r["device"] == other], f" on the {GPUS[other]}"
    what = what.format(labels=", ".join(sorted({r["preset"] for r in here})), where=where)
    speeds = [float(r["gflop_per_token"]) * 1e9 * float(r["tokens_per_s"]) for r in here]
    return min(speeds), max(speeds), f"{what}: {_span(min(speeds), max(speeds), 'FLOP/s')} " \
                                     f"({len(here)} measurement{'s' * (len(here) > 1)})"


def run_cost(run: dict, key: str = "", rows: list[dict] | None = None) -> Cost:
    """One resolved run config's tokens, model FLOPs and GPU-seconds on each GPU of GPUS (`key`:
    '<preset>/<study>', whose own shape rows come first)."""
    cfg = load_run_config(run).with_vocab(run_vocab(run))
    t = cfg.train
    tokens = t.steps * t.batch_size * t.grad_accum * cfg.model.block_size
    per_token = _flops_per_token(json.dumps(cfg.model.to_dict(), sort_keys=True))
    cost = Cost(1, tokens, per_token * tokens, gflop=[per_token / 1e9], processes={t.processes})
    for gpu in GPUS:
        if (speed := gpu_speed(per_token / 1e9, gpu, key, rows)) is not None:
            low, high, note = speed
            gpu_s = (per_token * tokens / high, per_token * tokens / low)
            cost.gpu_s[gpu] = list(gpu_s)
            cost.run_s[gpu] = [s / t.processes for s in gpu_s]
            cost.notes[gpu] = {note: [per_token / 1e9]}
    return cost


def grid_cost(config: dict, rows: list[dict] | None = None) -> dict[str, Cost]:
    """Per study of a prepared config (`experiment.prepare`): its runs, training tokens, model FLOPs
    and GPU-seconds, if no run stops early."""
    vocab, shards, out = vocab_size(config), shards_dir(config), {}
    for run in runs(config):
        resolved = run_config(config, run, shards)
        resolved["model"] = {**resolved["model"], "vocab_size": vocab}
        out.setdefault(run.study, Cost()).add(run_cost(resolved, f"{config['name']}/{run.study}", rows))
    return out


def time_range(flops: float, device: str, preset: str = "", rows: list[dict] | None = None):
    """Seconds the FLOPs take on `device` (a DEVICE_NAME kind) at the highest and lowest FLOP/s
    whole grids achieved there (this preset's grids where there are some), and where those come
    from; None without a measurement."""
    rows = [r for r in (calibration() if rows is None else rows) if r["device"] == device and not is_shape_row(r)]
    own = [r for r in rows if r["preset"] == preset]
    rows = own or rows
    if not rows or flops <= 0:
        return None
    speeds = [float(r["model_pflop"]) * 1e15 / float(r["wall_s"]) for r in rows]
    grids = f"{len(rows)} grid{'s' * (len(rows) > 1)}"
    which = f"measured for '{preset}' in {grids}" if own else f"the range of {grids} measured there"
    return flops / max(speeds), flops / min(speeds), f"at {_span(min(speeds), max(speeds), 'FLOP/s')}, {which}"


def _si(x: float, unit: str) -> str:
    """1.23 PFLOP, 2.75B (tokens: B, not G; T above)."""
    prefixes = ((1e21, "Z"), (1e18, "E"), (1e15, "P"), (1e12, "T"), (1e9, "G" if unit else "B"), (1e6, "M"), (1e3, "k"))
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


def gpu_hours(seconds: list[float]) -> str:
    """GPU-seconds [low, high] as GPU-hours, two significant digits: '1.2k-2.1k', '36', '0.5-0.8', '<0.01'."""
    def fmt(h: float) -> str:
        if h < 0.01:
            return "<0.01"
        if h >= 1000:
            return f"{float(f'{h / 1000:.2g}'):g}k"
        return f"{float(f'{h:.2g}'):g}"

    a, b = fmt(seconds[0] / 3600), fmt(seconds[1] / 3600)
    return a if a == b else f"{a}-{b}"


def _gflop(gflop: list[float]) -> str:
    low, high = min(gflop), max(gflop)
    return f"{low:.2g}" if f"{low:.2g}" == f"{high:.2g}" else f"{low:.2g}-{high:.2g}"


def _duration_span(low: float, high: float) -> str:
    a, b = rough_duration(low), rough_duration(high)
    return a if a == b else f"{a.split(' ')[0]} to {b}" if a.split(" ")[1] == b.split(" ")[1] else f"{a} to {b}"


def cost_lines(costs: dict[str, Cost], name: str, device: str, gpu_hours_too: bool = True) -> list[str]:
    """Per study: runs, tokens, model FLOPs and (`gpu_hours_too`) GPU-hours on an H100 and an H200;
    the total; where the GPU speeds come from; and for a device with grid measurements, roughly how
    long the grid trains there. `device`: a DEVICE_NAME kind."""
    total = Cost()
    width = max([len(s) for s in costs] + [len("grokking"), len("total")])
    show_gpus = gpu_hours_too and any(c.gpu_s for c in costs.values())

    def row(label: str, c: Cost) -> str:
        line = f"  {label:<{width}} {c.runs:>4} runs  {_si(c.tokens, ''):>6} tokens  {_si(c.flops, 'FLOP'):>10}"
        if show_gpus:
            line += "  GPU-h: " + ", ".join(f"{GPUS[g]} {gpu_hours(c.gpu_s[g])}" for g in GPUS if g in c.gpu_s)
        return line

    lines = []
    for study, c in costs.items():
        total.add(c)
        lines.append(row(study, c))
    if len(costs) > 1:
        lines.append(row("total", total))
    if lines:
        lines[-1] += " (model FLOPs, 6N + attention, if no run stops early)"
    if show_gpus:
        procs = sorted(total.processes)
        gpus = "1 GPU" if procs == [1] else f"{'/'.join(map(str, procs))} GPUs (train.processes)"
        longest = ", ".join(f"{_duration_span(*total.run_s[g])} on {GPUS[g]}s" for g in GPUS if g in total.run_s)
        lines.append(f"  GPU-hours: each run alone on {gpus}; the longest run {longest}; the model FLOPs over the "
                     "per-GPU speed of calibration.csv's shape rows, perfect DDP scaling assumed (stabilab.cost):")
        for gpu in GPUS:
            by_note: dict[str, list[str]] = {}
            for study, c in costs.items():
                for note, gflop in sorted(c.notes.get(gpu, {}).items(), key=lambda item: min(item[1])):
                    by_note.setdefault(note, []).append(f"{study} ({_gflop(gflop)} GFLOP/token)")
            for note, studies in by_note.items():
                lines.append(f"    {GPUS[gpu]}, {', '.join(studies)}: {note}")
    if max(total.processes, default=1) > 1:
        return lines  # runs on several GPUs: no grid of runs sharing one device was measured for them
    if estimate := time_range(total.flops, device, name):
        low, high, which = estimate
        lines.append(f"  time: roughly {_duration_span(low, high)} on {DEVICE_NAME[device]} ({which}; "
                     f"{CALIBRATION.relative_to(CALIBRATION.parents[2])})")
    return lines


def summary_lines(config: dict) -> list[str]:
    """check-config's account of a prepared config: runs, tokens and model FLOPs per study, GPU-hours
    on an H100 and an H200 (GPU presets), and roughly how long the grid trains."""
    runtime_device = (config.get("runtime") or {}).get("device", "auto")
    lines = cost_lines(grid_cost(config), config["name"], DEVICE_KIND[runtime_device],
                       gpu_hours_too=runtime_device == "cuda")
    if grok := grokking_runs(config):
        epochs = max(spec.epochs for spec in grok)
        width = max([len(s) for s in config.get("studies", {})] + [len("grokking"), len("total")])
        at = next((i for i, line in enumerate(lines) if line.startswith(("  GPU-hours", "  time:"))), len(lines))
        grok_line = f"  {'grokking':<{width}} {len(grok):>4} runs  (MLPs, up to {epochs} epochs; not in the FLOPs)"
        lines.insert(at, grok_line)
    return lines


def dry_run_lines(runs_by_study: dict[str, list[dict]], name: str, device: str) -> list[str]:
    """The cost of the runs a dry run would train (resolved run configs per study), as check-config
    says it; `device`: the experiment's runtime.device."""
    costs = {study: Cost() for study in runs_by_study}
    for study, resolved in runs_by_study.items():
        for run in resolved:
            costs[study].add(run_cost(run, f"{name}/{study}"))
    lines = cost_lines(costs, name, DEVICE_KIND.get(device, "cpu"), gpu_hours_too=device == "cuda")
    return ["Cost of these runs:"] + lines if lines else []
