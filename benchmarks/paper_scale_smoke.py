#!/usr/bin/env python3
"""GPU smoke test of the paper-scale presets: each study's largest run trains a few steps on one GPU
at its real shape (model, sequence, global batch), and its tokens/s go into calibration rows.

For every study of `--config` (or those of `--study`), the run of the deepest model and the first
variant (`--variant` picks another), its first LR and seed: the run config the pipeline would train,
with `train.processes` set to 1 (its global batch `batch_size x grad_accum` unchanged: the
micro-batches the N processes would share run in turn, each the size it has on a GPU of the cluster).
On running out of GPU memory the micro-batch is halved (grad_accum doubled: the same global batch)
until it fits. The project's own `Trainer` runs `--warmup` untimed steps (compilation happens there),
then `--steps` timed steps between two device synchronizations; its LR schedule is the run's own
(its first steps). Data: `--shards` (token shards the pipeline made, e.g. a small slice tokenized or
imported with the preset's tokenizer) or, by default, token shards of uniform random ids over the
preset's vocabulary (the step time does not depend on token values).

Outputs in `--out`: `smoke.md` (a table per study: parameters, GFLOP per token, micro-batch x
accumulation, ms/step, tokens/s, MFU against 989 TFLOP/s, peak memory, the training loss of the
first and last step, and what the whole study would take at this speed), `smoke.csv`, and
`calibration_rows.csv` in benchmarks/results/calibration.csv's format (shape rows: device, preset
`<name>/<study>`, gflop_per_token, tokens_per_s, source `<out>/smoke.md`), to append to the
calibration table once the output folder is committed: `stabilab check-config` then takes each
study's GPU-hours from its own measurement.

    python benchmarks/paper_scale_smoke.py --config configs/paper_scale/oec.yaml \
        --out benchmarks/results/h100_paper_scale_oec

A CPU try of the same code path: `--device cpu` and run-config overrides that shrink the model, e.g.
`model.n_layer=1 model.n_embd=32 model.n_head=2 model.block_size=32 train.batch_size=2 train.grad_accum=2`.
"""

from __future__ import annotations

import argparse
import csv
import gc
import math
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from bench_variants import (  # noqa: E402  (also puts the checkout's src/ on sys.path if needed)
    environment_line,
    markdown_table,
    prepare_shards,
    set_threads,
    sync,
    warmup_steps_for,
)
from stabilab.config import RuntimeConfig, deep_merge, load_run_config, parse_overrides  # noqa: E402
from stabilab.cost import GPUS, gpu_hours, run_vocab  # noqa: E402
from stabilab.device import PEAK_BF16_TFLOPS, pick_device  # noqa: E402
from stabilab.errors import UserError  # noqa: E402
from stabilab.experiment import load_experiment, run_config, runs, shards_dir  # noqa: E402
from stabilab.optim import raise_recompile_limit  # noqa: E402
from stabilab.shards import read_meta  # noqa: E402
from stabilab.train import Trainer  # noqa: E402

CALIBRATION_FIELDS = ["device", "preset", "runs", "at_once", "model_pflop", "wall_s", "source", "gflop_per_token",
                      "tokens_per_s"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", required=True, help="a paper-scale preset (configs/paper_scale/*.yaml)")
    p.add_argument("--study", nargs="+", help="only these studies (default: all)")
    p.add_argument("--variant", help="this variant of each study (default: its first)")
    p.add_argument("--steps", type=int, default=50, help="timed steps per study")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps first (compilation happens there)")
    p.add_argument("--micro-batch", type=int, help="sequences per micro-batch to start from (default: the run's "
                                                   "train.batch_size); halved on running out of memory")
    p.add_argument("--shards", help="token shards to train on (default: random ids over the preset's vocabulary)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile (default: on for CUDA, as the pipeline)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default)")
    p.add_argument("--out", help="folder for smoke.md, smoke.csv and calibration_rows.csv")
    p.add_argument("overrides", nargs="*", metavar="key.path=value",
                   help="overrides of each run config (applied last), e.g. model.n_layer=1 for a CPU try")
    args = p.parse_args(argv)
    # `--study m16 model.n_layer=1`: the names' nargs takes every word, but a study name never holds '='
    args.overrides = [w for w in args.study or [] if "=" in w] + args.overrides
    args.study = [w for w in args.study or [] if "=" not in w] or None
    return args


def device_kind(device: torch.device) -> str:
    """The calibration table's device: h100, h200 (by the CUDA device's name), other GPUs by name, cpu."""
    if device.type != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name(device).lower()
    return next((kind for kind in GPUS if kind in name), name.replace("nvidia ", "").split()[0])


def study_runs(experiment: dict, studies: list[str] | None, variant: str | None) -> dict:
    """study -> (the run to time: its deepest model, the first variant or `variant`, first LR and seed;
    the study's number of runs)."""
    grid = runs(experiment)
    known = list(dict.fromkeys(r.study for r in grid))
    for study in studies or []:
        if study not in known:
            raise UserError(f"unknown study '{study}' (studies of '{experiment['name']}': {', '.join(known)})")
    out = {}
    for study in studies or known:
        members = [r for r in grid if r.study == study]
        variants = list(dict.fromkeys(r.variant for r in members))
        if variant is not None and variant not in variants:
            raise UserError(f"variant '{variant}' is not in study '{study}' (its variants: {', '.join(variants)})")
        chosen = [r for r in members if r.variant == (variant or variants[0])]
        deepest = max(r.depth for r in chosen)
        out[study] = (next(r for r in chosen if r.depth == deepest), len(members))
    return out


def one_gpu(run: dict, micro_batch: int | None) -> dict:
    """The run on one process, its global batch kept: micro-batch `micro_batch` (default its own)."""
    t = run["train"]
    total = t.get("batch_size", 16) * t.get("grad_accum", 1)
    micro = micro_batch or t.get("batch_size", 16)
    if total % micro:
        raise UserError(f"the micro-batch ({micro}) must divide the global batch ({total} sequences)")
    return deep_merge(run, {"train": {"processes": 1, "batch_size": micro, "grad_accum": total // micro}})


def smaller_micro_batch(total: int, micro: int) -> int | None:
    """The next micro-batch to try after running out of memory: the largest divisor of the global
    batch `total` below `micro` (about half of it, or less), None below 1."""
    return next((d for d in range(micro // 2, 0, -1) if total % d == 0), None)


def mean_loss(tr: Trainer) -> float:
    """The training loss of the steps since the last call (the trainer's running sum, reset)."""
    s = tr.stats
    value = (s.loss_sum / max(s.loss_n, 1)).item()
    s.loss_sum.zero_()
    s.loss_n = 0
    return value


def measure(cfg, runtime: RuntimeConfig, out: Path, warmup: int, steps: int, device: torch.device) -> dict:
    """Time `steps` optimizer steps after `warmup` untimed ones (SPAM: past its grace period); the
    training loss of the first and the last step; peak memory. Raises torch.cuda.OutOfMemoryError."""
    warmup = warmup_steps_for(cfg, warmup)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    tr = Trainer(cfg, out, runtime)
    try:
        t0 = time.perf_counter()
        tr.train_step(False)
        first = mean_loss(tr)
        for _ in range(warmup - 1):
            tr.train_step(False)
        sync(device)
        warm = time.perf_counter() - t0
        mean_loss(tr)
        t0 = time.perf_counter()
        for _ in range(steps - 1):
            tr.train_step(False)
        sync(device)
        tr.stats.loss_sum.zero_()
        tr.stats.loss_n = 0
        tr.train_step(False)
        sync(device)
        dt = (time.perf_counter() - t0) / steps
        last = mean_loss(tr)
        return {"params": tr.model.num_params(), "flops_per_token": tr.model.flops_per_token(),
                "ms_per_step": dt * 1e3, "tokens_per_s": tr.tokens_per_step / dt, "warmup_s": warm,
                "first_loss": first, "last_loss": last,
                "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else math.nan}
    finally:
        del tr
        gc.collect()


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    if args.steps < 1 or args.warmup < 1:
        raise SystemExit("--steps and --warmup must be at least 1")
    set_threads(args.threads)
    try:
        experiment = load_experiment(args.config)
        chosen = study_runs(experiment, args.study, args.variant)
        overrides = parse_overrides(args.overrides)
    except UserError as e:
        raise SystemExit(f"error: {e}") from None
    device = pick_device(args.device, 0)
    compile_ = (device.type == "cuda") if args.compile is None else args.compile
    if compile_:  # one process compiles every study's model (and retries at smaller micro-batches):
        raise_recompile_limit(16 * len(chosen) + 8)  # never a silent fallback to eager
    runtime = RuntimeConfig(device=device.type, compile=compile_)
    kind, name = device_kind(device), experiment["name"]
    out = Path(args.out) if args.out else None
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="paper_scale_smoke_") as tmp:
        for study, (run, n_runs) in chosen.items():
            resolved = deep_merge(run_config(experiment, run, shards_dir(experiment)), overrides)
            vocab = run_vocab(resolved)
            if args.shards:
                meta = read_meta(args.shards)
                data = {"shards": args.shards, "tokenizer": meta["tokenizer"]["kind"], "vocab_size": 0,
                        "tokenizer_file": ""}
            else:  # random ids over the preset's vocabulary (cached per vocabulary)
                folder = Path(tmp) / f"random_{vocab}"
                if not folder.exists():
                    folder.mkdir()
                    prepare_shards(folder, str(vocab), 60000, random_tokens=True)
                shards = str(folder / "shards")
                data = {"shards": shards, "tokenizer": "bpe", "vocab_size": 0, "tokenizer_file": ""}
            micro = args.micro_batch
            while True:
                try:
                    cfg = load_run_config(one_gpu({**resolved, "data": data}, micro))
                except UserError as e:
                    raise SystemExit(f"error: study '{study}': {e}") from None
                try:
                    row = measure(cfg, runtime, Path(tmp) / "runs" / study, args.warmup, args.steps, device)
                    row["status"] = "ok"
                    break
                except torch.cuda.OutOfMemoryError:
                    micro = smaller_micro_batch(cfg.train.batch_size * cfg.train.grad_accum, cfg.train.batch_size)
                    if micro is None:
                        row = {"status": "out of memory at micro-batch 1"}
                        break
            t, m = cfg.train, cfg.model
            row.update(study=study, run=run.path, device=kind, variant=run.variant, n_layer=m.n_layer, n_embd=m.n_embd,
                       block_size=m.block_size, vocab=vocab, micro_batch=t.batch_size, grad_accum=t.grad_accum,
                       processes=resolved["train"].get("processes", 1), runs_in_study=n_runs,
                       tokens_per_step=t.batch_size * t.grad_accum * m.block_size, steps_of_run=t.steps)
            rows.append(row)
            print(f"[{study}] {row['status']}" + (f": {row['tokens_per_s']:,.0f} tokens/s, {row['ms_per_step']:.1f} "
                                                  f"ms/step, loss {row['first_loss']:.3f} -> {row['last_loss']:.3f}"
                                                  if row["status"] == "ok" else ""), flush=True)
            markdown = write(rows, out, args, kind, name, device, compile_)  # partial results survive a time-out
    print(markdown, flush=True)
    return rows


def _study_hours(r: dict) -> str:
    """The study's runs at the measured speed: GPU-hours and the wall time of one run on its GPUs."""
    seconds = r["steps_of_run"] / (r["tokens_per_s"] / r["tokens_per_step"])
    return f"{gpu_hours([seconds * r['runs_in_study']] * 2)} GPU-h; a run {seconds / 3600 / r['processes']:.2g} h " \
           f"on {r['processes']} GPU{'s' * (r['processes'] > 1)}"


def write(rows: list[dict], out: Path | None, args, kind: str, name: str, device: torch.device,
          compiled: bool) -> str:
    """smoke.md, smoke.csv and calibration_rows.csv in `out` (when given); the markdown."""
    ok = [r for r in rows if r["status"] == "ok"]
    headers = ["study", "run", "params", "GFLOP/token", "micro-batch x accumulation", "tokens/step", "ms/step",
               "tokens/s", "MFU", "peak mem (GiB)", "loss: first -> last step", "the study at this speed"]
    table = []
    for r in rows:
        if r["status"] != "ok":
            table.append([r["study"], r["run"], "", "", f"{r['micro_batch']} x {r['grad_accum']}", "", r["status"],
                          "", "", "", "", ""])
            continue
        gflop = r["flops_per_token"] / 1e9
        table.append([r["study"], r["run"], f"{r['params']:,}", f"{gflop:.4g}",
                      f"{r['micro_batch']} x {r['grad_accum']}", f"{r['tokens_per_step']:,}",
                      f"{r['ms_per_step']:.2f}", f"{int(round(r['tokens_per_s'])):,}",
                      f"{100 * r['flops_per_token'] * r['tokens_per_s'] / (PEAK_BF16_TFLOPS * 1e12):.3g} %",
                      f"{r['peak_mem_gib']:.2f}" if r["peak_mem_gib"] == r["peak_mem_gib"] else "n/a",
                      f"{r['first_loss']:.3f} -> {r['last_loss']:.3f}", _study_hours(r)])
    markdown = (f"# Paper-scale smoke test: `{args.config}` ({environment_line(device)})\n\n"
                f"Each study's deepest run ({args.variant or 'its first variant'}) on one device at its real shape, "
                f"its global batch as micro-batches in turn; {args.warmup} untimed + {args.steps} timed steps; "
                f"data: {args.shards or 'uniform random ids over the vocabulary'}; compile "
                f"{'on' if compiled else 'off'}"
                f"{'; run-config overrides: ' + ' '.join(args.overrides) if args.overrides else ''}. MFU against "
                f"{PEAK_BF16_TFLOPS:g} TFLOP/s; 'the study at this speed': all its runs, one GPU each at this "
                f"speed (a run on N GPUs: N x the GPU-hours, perfect DDP scaling assumed).\n\n"
                + markdown_table(headers, table) + "\n")
    if out is None:
        return markdown
    out.mkdir(parents=True, exist_ok=True)
    (out / "smoke.md").write_text(markdown)
    with open(out / "smoke.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=sorted({k for r in rows for k in r}))
        writer.writeheader()
        writer.writerows(rows)
    with open(out / "calibration_rows.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CALIBRATION_FIELDS, lineterminator="\n")
        writer.writeheader()
        for r in ok:
            writer.writerow({"device": kind, "preset": f"{name}/{r['study']}", "runs": 1, "at_once": 1,
                             "model_pflop": "", "wall_s": "", "source": str(out / "smoke.md"),
                             "gflop_per_token": f"{r['flops_per_token'] / 1e9:.4g}",
                             "tokens_per_s": int(round(r["tokens_per_s"]))})
    return markdown


if __name__ == "__main__":
    main()
