#!/usr/bin/env python3
"""Stacked training (stabilab.train.stacked) against one single-run train_step: tokens/s, MFU, memory.

For each preset shape (`--shapes`: the model and batch of configs/oec.yaml and of
configs/two_instabilities.yaml, at the depth of their first study), and with and without
`torch.compile` (`--compile both|on|off`), it times
- one run's `Trainer.train_step(False)` (bench_throughput's RandomTokenTrainer: the project's
  Trainer, batches drawn on the device), and
- `StackedTrainer.train_step()` with N members (`--n`, default 1,2,4,8,16; LRs spread over
  1e-3 .. 1e-2, seeds 0..N-1), batches drawn on the device the same way,
each after `--warmup` untimed steps (compilation happens there), over `--steps` steps between two
device syncs. bf16 autocast on CUDA (`--dtype`), float32 weights.

Reported per row: ms/step, tokens/s of all members together, MFU = GPT.flops_per_token x tokens/s
/ `--peak-tflops` (989), the speed-up over the single run's tokens/s, peak memory (CUDA). The
separate-process figure to beat is bench_grid.py's aggregate MFU (issue 14: 11-22 % with 8-12 runs
sharing an H200). `--tiny` shrinks every shape for a CPU smoke test (tests/test_benchmarks_smoke.py).

Usage: see benchmarks/README.md ("bench_stacked.py").
"""

from __future__ import annotations

import argparse
import functools
import gc
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from bench_throughput import RandomTokenTrainer  # noqa: E402
from bench_variants import (  # noqa: E402  (also puts the checkout's src/ on sys.path if needed)
    REPO,
    build_run_config,
    environment_line,
    load_experiment,
    markdown_table,
    prepare_shards,
    set_threads,
    sync,
    write_outputs,
)
from stabilab.config import RuntimeConfig  # noqa: E402
from stabilab.device import PEAK_BF16_TFLOPS, pick_device  # noqa: E402
from stabilab.optim import raise_recompile_limit  # noqa: E402
from stabilab.train.stacked import StackedTrainer  # noqa: E402

SHAPES = {"oec": REPO / "configs" / "oec.yaml", "two_instabilities": REPO / "configs" / "two_instabilities.yaml"}
TINY = {"model": {"n_layer": 1, "n_embd": 16, "n_head": 2, "block_size": 16}, "train": {"batch_size": 2}}


class RandomTokenStacked(StackedTrainer):
    """StackedTrainer whose batches are uniform random ids drawn on the device, (N, B, T)."""

    def batch(self, micro: int):
        t, T, V = self.cfgs[0].train, self.cfgs[0].model.block_size, self.cfgs[0].model.vocab_size
        shape = (self.n, t.batch_size, T)
        return torch.randint(0, V, shape, device=self.device), torch.randint(0, V, shape, device=self.device)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated, of {', '.join(SHAPES)}")
    p.add_argument("--n", default="1,2,4,8,16", help="comma-separated member counts")
    p.add_argument("--compile", default="both", choices=["both", "on", "off"])
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="train.dtype (auto: bf16 autocast on CUDA, float32 on CPU)")
    p.add_argument("--vocab", type=int, default=50304, help="vocabulary of the random-token shards (GPT-2's, padded)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps per row (compilation included)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per row")
    p.add_argument("--peak-tflops", type=float, default=PEAK_BF16_TFLOPS,
                   help="peak FLOP/s for MFU, in TFLOP/s (989: H100/H200 SXM dense bf16)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads for torch (0: torch's default)")
    p.add_argument("--tiny", action="store_true",
                   help="tiny shapes (1 layer, d 16, T 16, batch 2), vocab 300, N 1,2, compile off: a CPU smoke test")
    p.add_argument("--out", default=None, help="folder for stacked.csv and stacked.md (rewritten after each row)")
    args = p.parse_args(argv)
    if args.tiny:
        args.vocab, args.compile = 300, "off"
        if args.n == p.get_default("n"):
            args.n = "1,2"
    unknown = [s for s in args.shapes.split(",") if s not in SHAPES]
    if unknown:
        raise SystemExit(f"--shapes: unknown shape '{unknown[0]}' (known: {', '.join(SHAPES)})")
    return args


def member_configs(experiment: dict, n: int, overrides: dict, shard_dir: str) -> list:
    """N baseline run configs of the preset's shape, LRs log-spaced over 1e-3 .. 1e-2, seeds 0..N-1."""
    lrs = [1e-3 * 10 ** (i / max(1, n - 1)) for i in range(n)]
    cfgs = []
    for i, lr in enumerate(lrs):
        cfg = build_run_config(experiment, "baseline", overrides, shard_dir, "bpe")
        cfgs.append(cfg.model_copy(update={"seed": i, "optim": cfg.optim.model_copy(update={"lr": lr})}, deep=True))
    return cfgs


def _time(step, args, device) -> tuple[float, float]:
    """(warm-up seconds, seconds per timed step)."""
    t0 = time.perf_counter()
    for _ in range(args.warmup):
        step()
    sync(device)
    warm = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync(device)
    return warm, (time.perf_counter() - t0) / args.steps


def bench_row(args, shape: str, experiment: dict, overrides: dict, members: int | None, compiled: bool,
              device: torch.device, shard_dir: str, run_dir: Path) -> dict:
    """One row: the single run's train_step (members None) or N stacked members."""
    gc.collect()
    torch._dynamo.reset()  # each row compiles its own graphs
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    runtime = RuntimeConfig(device=device.type, compile=compiled)
    row = {"shape": shape, "mode": "single train_step" if members is None else "stacked", "members": members or 1,
           "compile": compiled, "status": "ok", "ms_per_step": float("nan"), "tokens_per_s": float("nan"),
           "mfu_pct": float("nan"), "peak_mem_gib": float("nan"), "warmup_s": float("nan"), "flops_per_token": 0}
    tr = step = None
    try:
        if members is None:
            cfg = build_run_config(experiment, "baseline", overrides, shard_dir, "bpe")
            tr = RandomTokenTrainer(cfg, run_dir, runtime)
            step, tokens = functools.partial(tr.train_step, False), tr.tokens_per_step
            row["flops_per_token"] = tr.model.flops_per_token()
        else:
            tr = RandomTokenStacked(member_configs(experiment, members, overrides, shard_dir), runtime)
            step, tokens = tr.train_step, tr.tokens_per_step
            row["flops_per_token"] = tr.flops_per_token()
        row["warmup_s"], dt = _time(step, args, device)
        tok_s = tokens / dt
        row.update(ms_per_step=dt * 1e3, tokens_per_s=tok_s,
                   mfu_pct=100 * row["flops_per_token"] * tok_s / (args.peak_tflops * 1e12))
        if device.type == "cuda":
            row["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    except torch.cuda.OutOfMemoryError:
        row["status"] = "OOM"
    finally:
        tr = step = None  # free the row's model before the next
        gc.collect()
    return row


def shape_overrides(args, experiment: dict) -> dict:
    """The preset's model and batch at the depth of its first study (bf16 on CUDA by --dtype)."""
    studies = experiment.get("studies") or {}
    depths = next(iter(studies.values()), {}).get("depths") or [experiment.get("model", {}).get("n_layer", 2)]
    over = {"model": {"n_layer": depths[0]}, "train": {"dtype": args.dtype, "steps": 10**7, "grad_accum": 1}}
    if args.tiny:
        over = {"model": {**over["model"], **TINY["model"]}, "train": {**over["train"], **TINY["train"]}}
    return over


def _table(rows: list[dict]) -> list[list]:
    out = []
    for r in rows:
        ref = next((s for s in rows if s["shape"] == r["shape"] and s["compile"] == r["compile"]
                    and s["mode"] == "single train_step" and s["status"] == "ok"), None)
        if r["status"] != "ok":
            out.append([r["shape"], r["mode"], r["members"], r["compile"], r["status"], "", "", "", "", ""])
            continue
        speed = f"{r['tokens_per_s'] / ref['tokens_per_s']:.2f}x" if ref else "n/a"
        mem = f"{r['peak_mem_gib']:.2f}" if r["peak_mem_gib"] == r["peak_mem_gib"] else "n/a"
        out.append([r["shape"], r["mode"], r["members"], r["compile"], f"{r['ms_per_step']:.2f}",
                    f"{r['tokens_per_s']:,.0f}", f"{r['mfu_pct']:.3g} %", speed, mem, f"{r['warmup_s']:.1f}"])
    return out


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    set_threads(args.threads)
    device = pick_device(args.device)
    raise_recompile_limit(64)
    counts = [int(n) for n in args.n.split(",")]
    compiles = {"both": [False, True], "on": [True], "off": [False]}[args.compile]
    headers = ["shape", "mode", "members", "compile", "ms/step", "tokens/s (all members)", "MFU",
               "vs single run", "peak mem (GiB)", "warm-up (s)"]
    rows: list[dict] = []
    header = (f"# Stacked training vs one run ({environment_line(device)})\n\n"
              f"Random-token batches drawn on the device, vocab {args.vocab}, dtype {args.dtype}, "
              f"{args.warmup} warm-up + {args.steps} timed steps per row. MFU = GPT.flops_per_token x tokens/s / "
              f"{args.peak_tflops:g} TFLOP/s; 'vs single run': tokens/s over the single run's at the same compile "
              f"setting.{' Tiny shapes (--tiny): a smoke test, not a measurement.' if args.tiny else ''}\n")
    markdown = header
    with tempfile.TemporaryDirectory(prefix="bench_stacked_") as tmp:
        shard_dir, _ = prepare_shards(Path(tmp), str(args.vocab), 30000, random_tokens=True)
        for shape in args.shapes.split(","):
            experiment = load_experiment(SHAPES[shape])
            overrides = shape_overrides(args, experiment)
            c = build_run_config(experiment, "baseline", overrides, shard_dir, "bpe")  # the shape as resolved
            m = c.model
            header += (f"\n- {shape}: {SHAPES[shape].relative_to(REPO)}{' (tiny)' if args.tiny else ''}: "
                       f"n_layer {m.n_layer}, n_embd {m.n_embd}, n_head {m.n_head}, T {m.block_size}, "
                       f"batch {c.train.batch_size} per member, tied {m.tie_embeddings}, mlp {m.mlp}, "
                       f"norm {m.norm}, qk_norm {m.qk_norm}, position {m.position} (rope_fraction {m.rope_fraction})")
            for compiled in compiles:
                for members in [None, *counts]:
                    row = bench_row(args, shape, experiment, overrides, members, compiled, device, shard_dir,
                                    Path(tmp) / "runs" / f"{shape}_{compiled}")
                    rows.append(row)
                    print(f"[{shape} {row['mode']} N={row['members']} compile={compiled}] {row['status']}: "
                          f"{row['tokens_per_s']:,.0f} tokens/s, MFU {row['mfu_pct']:.3g} %", flush=True)
                    markdown = header + "\n\n" + markdown_table(headers, _table(rows))
                    write_outputs(args.out, "stacked", rows, markdown)  # partial results survive a time-out
    print(markdown, flush=True)
    return {"rows": rows, "markdown": markdown}


if __name__ == "__main__":
    main()
