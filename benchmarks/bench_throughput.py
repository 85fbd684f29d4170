#!/usr/bin/env python3
"""GPU training throughput of GPT-2 124M (or any shape) for each variant: tokens/s, peak memory, MFU.

Each variant's model, optimizer and step are the project's own: a `stabilab.train.Trainer`
subclass, built by `Trainer.__init__` on small shards of random ids, whose batches are uniform
random token ids drawn on the device (`torch.randint`), so no tokenizer or data set is needed.
`Trainer.train_step(False)` is timed unchanged (bf16 autocast on CUDA, fused AdamW, grad
clipping, the variants' losses, post-step and optimizers). Variants run
one after the other in one process; for each: `--warmup` untimed steps (compilation happens
there; SPAM is warmed up past its spike-clipping grace period), then `--steps` timed steps
between two device synchronizations.

MFU follows nanoGPT's `estimate_mfu` (PaLM appendix B), `GPT.flops_per_token`:
    FLOPs/token = 6 N + 12 L H Q T
with N the parameters that enter a matmul: all but position embeddings and, when untied, the
input embedding (tied wte/lm_head counted once; for MLRA the factorized attention parameters),
L layers, H heads, Q = n_embd / H the head dim and T the sequence length; MFU = FLOPs/token x
tokens/s / peak, peak 989 TFLOP/s (H100 SXM, dense bf16) by default.

Profile (`--profile-steps K`): after the timed steps, K more steps under torch.profiler, and
`<out>/profile_<variant>.md`: the device's kernel time by kind (matmul, attention, Triton-fused
elementwise and reductions, optimizer, memory copies), the busy fraction of the profiled wall time
(the union of the kernels' intervals: what is left is launch and host time), and the longest
kernels. On the CPU the same table is made of the operators' own CPU time. Kernels inside CUDA
graphs may be reported as whole graphs: profile under `--compile-mode default`.

Data parallel: started under `torchrun --nproc_per_node N`, every process is one rank of the
project's DDP path (`train.processes`); the global batch stays `--batch-size` (each rank runs
its share of the micro-batches), tokens/s is the global rate, MFU is per GPU, and rank 0 writes
the outputs. Scaling efficiency = tokens/s on N GPUs / (N x tokens/s on one).

Usage: see benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time
import typing
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from bench_variants import (  # noqa: E402  (also puts the checkout's src/ on sys.path if needed)
    add_common_args,
    build_run_config,
    environment_line,
    load_experiment,
    markdown_table,
    parse_variants,
    prepare_shards,
    set_threads,
    sync,
    warmup_steps_for,
    write_outputs,
)
from stabilab.config import CompileMode, RuntimeConfig  # noqa: E402
from stabilab.device import PEAK_BF16_TFLOPS, pick_device  # noqa: E402
from stabilab.model import padded_vocab  # noqa: E402
from stabilab.optim import raise_recompile_limit  # noqa: E402
from stabilab.train import Trainer  # noqa: E402


class RandomTokenTrainer(Trainer):
    """The project's Trainer, built by its own `__init__` (on small random-token shards), except
    that every batch it moves to the device is replaced by uniform random ids drawn there with
    `torch.randint` (same shape): the timed step does no host-side data work."""

    def to_device(self, x: torch.Tensor, y: torch.Tensor):
        vocab, shape = self.cfg.model.vocab_size, tuple(x.shape)
        return (torch.randint(0, vocab, shape, device=self.device),
                torch.randint(0, vocab, shape, device=self.device))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_common_args(p, "experiment config with the variants' overlays")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the model (default: on for CUDA, off on CPU)")
    p.add_argument("--compile-mode", default="auto", choices=typing.get_args(CompileMode),
                   help="torch.compile mode of the model + loss graph (runtime.compile_mode; auto as there)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads for torch (0: torch's default)")
    p.add_argument("--n-layer", type=int, default=12)
    p.add_argument("--n-embd", type=int, default=768)
    p.add_argument("--n-head", type=int, default=12)
    p.add_argument("--block-size", type=int, default=1024, help="sequence length T")
    p.add_argument("--vocab", type=int, default=50257, help="real vocabulary (the model pads it to a multiple of 64)")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per optimizer step")
    p.add_argument("--micro-batch", type=int, default=16, help="sequences per forward/backward (grad accumulation)")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps per variant (compilation included)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per variant")
    p.add_argument("--profile-steps", type=int, default=0,
                   help="steps profiled after the timed ones, per variant (0: none); needs --out")
    p.add_argument("--peak-tflops", type=float, default=PEAK_BF16_TFLOPS,
                   help="peak FLOP/s for MFU, in TFLOP/s (989: H100 SXM dense bf16)")
    p.add_argument("--out", default=None,
                   help="folder for throughput.csv and throughput.md (rewritten after each variant)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    set_threads(args.threads)
    world = int(os.environ.get("WORLD_SIZE", "1"))  # > 1 under torchrun: the Trainer runs DDP
    main_rank = int(os.environ.get("RANK", "0")) == 0
    if args.batch_size % (args.micro_batch * world):
        raise SystemExit(f"--batch-size ({args.batch_size}) must be a multiple of --micro-batch ({args.micro_batch})"
                         f" x processes ({world})")
    if args.profile_steps and not args.out:
        raise SystemExit("--profile-steps needs --out (the folder for profile_<variant>.md)")
    experiment = load_experiment(args.config)
    variants = parse_variants(args.variants)
    device = pick_device(args.device, int(os.environ.get("LOCAL_RANK", "0")))
    compile_ = (device.type == "cuda") if args.compile is None else args.compile
    if compile_:
        raise_recompile_limit(8 * len(variants) + 8)
    overrides = {
        "model": {"n_layer": args.n_layer, "n_embd": args.n_embd, "n_head": args.n_head,
                  "block_size": args.block_size, "dropout": 0.0},
        "train": {"dtype": args.dtype, "steps": 10**7,
                  "batch_size": args.micro_batch, "grad_accum": args.batch_size // args.micro_batch},
    }
    tokens_per_step = args.batch_size * args.block_size
    rows: list[dict] = []
    table: list[list] = []
    gpus = f"{world} processes (DDP, one device each), " if world > 1 else ""
    header = (f"# Training throughput ({environment_line(device)})\n\n{gpus}"
              f"Shapes: n_layer {args.n_layer}, n_embd {args.n_embd}, n_head {args.n_head}, T {args.block_size}, "
              f"vocab {args.vocab} (padded {padded_vocab(args.vocab)}), batch {args.batch_size} = "
              f"{args.batch_size // args.micro_batch} x micro-batch {args.micro_batch} "
              f"({tokens_per_step:,} tokens/step), "
              f"dtype {args.dtype}, compile {compile_} "
              f"({RuntimeConfig(compile_mode=args.compile_mode).compile_mode_on(device, world)}), "
              f"{args.warmup} warm-up + {args.steps} timed steps per variant. "
              f"MFU = (6 N + 12 L H Q T) x tokens/s / {args.peak_tflops:g} TFLOP/s"
              f"{' / processes' if world > 1 else ''}, N = parameters without "
              f"position embeddings.\n")
    headers = ["variant", "params", "N (non-emb.)", "GFLOP/token", "ms/step", "tokens/s", "peak mem (GiB)",
               "MFU", "step time vs baseline", "warm-up (s)"]
    markdown = header
    # The Trainer opens token shards when built: small ones of random ids over --vocab (never read
    # in the timed steps, whose batches come from torch.randint).
    with tempfile.TemporaryDirectory(prefix="bench_throughput_") as tmp:
        shard_dir, _ = prepare_shards(Path(tmp), str(args.vocab), 30000, random_tokens=True)
        for name in variants:
            runtime = RuntimeConfig(device=device.type, compile=compile_, compile_mode=args.compile_mode)
            row = _bench_variant(args, experiment, name, overrides, runtime,
                                 device, tokens_per_step, shard_dir,
                                 Path(tmp) / "runs" / name.replace("+", "_"), world)
            rows.append(row)
            if not main_rank:
                continue
            ref = next((r for r in rows if r["variant"] == "baseline" and r["status"] == "ok"), None)
            table = [_table_row(r, ref) for r in rows]
            markdown = header + "\n" + markdown_table(headers, table)
            print(f"[{name}] {row['status']}: {row['tokens_per_s']:.0f} tokens/s, {row['ms_per_step']:.1f} ms/step, "
                  f"MFU {row['mfu_pct']:.2f} %, warm-up {row['warmup_s']:.1f} s", flush=True)
            write_outputs(args.out, "throughput", rows, markdown)  # partial results survive a time-out
    if world > 1:
        torch.distributed.destroy_process_group()
    if main_rank:
        print(markdown, flush=True)
    return {"rows": rows, "markdown": markdown}


def _table_row(r: dict, ref: dict | None) -> list:
    if r["status"] != "ok":
        return [r["variant"], f"{r['params']:,}", f"{r['params_non_embedding']:,}",
                f"{r['flops_per_token'] / 1e9:.4g}", r["status"], "", "", "", "", f"{r['warmup_s']:.1f}"]
    mem = f"{r['peak_mem_gib']:.2f}" if r["peak_mem_gib"] == r["peak_mem_gib"] else "n/a"
    rel = ("—" if ref is None or ref is r else f"{(r['ms_per_step'] / ref['ms_per_step'] - 1) * 100:+.1f} %")
    return [r["variant"], f"{r['params']:,}", f"{r['params_non_embedding']:,}", f"{r['flops_per_token'] / 1e9:.4g}",
            f"{r['ms_per_step']:.2f}", f"{r['tokens_per_s']:,.0f}", mem, f"{r['mfu_pct']:.3g} %", rel,
            f"{r['warmup_s']:.1f}"]


def _bench_variant(args, experiment, name, overrides, runtime, device, tokens_per_step, shard_dir, run_dir,
                   world) -> dict:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    cfg = build_run_config(experiment, name, overrides, shard_dir, "bpe")
    row = {"variant": name, "status": "ok", "params": 0, "params_non_embedding": 0, "flops_per_token": 0,
           "ms_per_step": float("nan"), "tokens_per_s": float("nan"), "peak_mem_gib": float("nan"),
           "mfu_pct": float("nan"), "warmup_s": float("nan"), "compile": runtime.compile,
           "batch_size": args.batch_size, "micro_batch": args.micro_batch, "block_size": args.block_size,
           "processes": world}
    tr = None
    try:
        tr = RandomTokenTrainer(cfg, run_dir, runtime)
        row.update(params=tr.model.num_params(), params_non_embedding=tr.model.num_params(non_embedding=True),
                   flops_per_token=tr.model.flops_per_token())
        t0 = time.perf_counter()
        for _ in range(warmup_steps_for(cfg, args.warmup)):
            tr.train_step(False)
        sync(device)
        row["warmup_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(args.steps):
            tr.train_step(False)
        sync(device)
        dt = (time.perf_counter() - t0) / args.steps
        tok_s = tokens_per_step / dt
        row.update(ms_per_step=dt * 1e3, tokens_per_s=tok_s,
                   mfu_pct=100 * row["flops_per_token"] * tok_s / (world * args.peak_tflops * 1e12))
        if device.type == "cuda":
            row["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        if args.profile_steps:  # every rank steps (DDP all-reduces); rank 0 writes the report
            profile = profile_steps(tr, args.profile_steps, device)
            row["busy_pct"] = profile["busy_pct"]
            if int(os.environ.get("RANK", "0")) == 0:
                title = (f"# Profile of `{name}`: {args.profile_steps} steps after {args.steps} timed ones "
                         f"({environment_line(device)}; {tokens_per_step:,} tokens/step, "
                         f"{row['ms_per_step']:.2f} ms/step timed, MFU {row['mfu_pct']:.3g} %)\n\n")
                Path(args.out).mkdir(parents=True, exist_ok=True)
                (Path(args.out) / f"profile_{name.replace('+', '_')}.md").write_text(title + profile["markdown"] + "\n")
    except torch.cuda.OutOfMemoryError:
        row["status"] = "OOM"
    finally:
        del tr
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


# (kind, lower-case substrings of a kernel's or operator's name); the first match wins
KERNEL_KINDS = (
    ("attention", ("flash", "fmha", "sdpa", "scaled_dot_product", "attention")),
    ("matmul", ("gemm", "nvjet", "xmma", "cutlass", "cublas", "triton_tem", "aten::mm", "aten::addmm", "aten::bmm",
                "aten::matmul", "aten::linear")),
    ("optimizer", ("multi_tensor", "adam", "_foreach")),
    ("memory copy / set", ("memcpy", "memset", "fillfunctor", "aten::copy_", "aten::fill_", "aten::zero_")),
    ("Triton-fused elementwise and reductions", ("triton",)),
)


def kernel_kind(name: str) -> str:
    low = name.lower()
    return next((kind for kind, keys in KERNEL_KINDS if any(k in low for k in keys)), "other")


def busy_time(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of (start, end) intervals: the time at least one kernel ran."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def profile_steps(tr: Trainer, steps: int, device: torch.device) -> dict:
    """`steps` train steps under torch.profiler: kernel (CUDA) or operator (CPU) time by kind, the
    busy fraction of the wall time, and the longest kernels, as markdown."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sync(device)
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            tr.train_step(False)
        sync(device)
        wall_us = (time.perf_counter() - t0) * 1e6
    if cuda:  # (name, start, duration in us, calls) of every kernel and copy on the device
        spans = [(e.name, e.time_range.start, e.time_range.elapsed_us(), 1) for e in prof.events()
                 if e.device_type == DeviceType.CUDA]
    else:  # operators' own CPU time (self time: nested operators are not counted twice)
        spans = [(e.key, 0.0, e.self_cpu_time_total, e.count) for e in prof.key_averages()
                 if e.self_cpu_time_total > 0]
    total = sum(d for _, _, d, _ in spans) or 1.0
    busy = busy_time([(a, a + d) for _, a, d, _ in spans]) if cuda else total
    by_name: dict[str, list[float]] = {}  # name -> [time, calls]
    for name, _, d, calls in spans:
        entry = by_name.setdefault(name, [0.0, 0])
        entry[0] += d
        entry[1] += calls
    by_kind: dict[str, float] = {}  # each distinct name classified once
    for name, (d, _) in by_name.items():
        kind = kernel_kind(name)
        by_kind[kind] = by_kind.get(kind, 0.0) + d
    unit = "kernel" if cuda else "operator (self CPU time)"
    kinds = [[kind, f"{t / steps / 1e3:.3f}", f"{100 * t / total:.1f} %"]
             for kind, t in sorted(by_kind.items(), key=lambda kv: -kv[1])]
    top = sorted(by_name.items(), key=lambda kv: -kv[1][0])[:15]
    longest = [[kernel_kind(n), f"`{n[:90]}`", f"{calls / steps:g}", f"{t / steps / 1e3:.3f}",
                f"{100 * t / total:.1f} %"] for n, (t, calls) in top]
    busy_pct = 100 * busy / wall_us
    markdown = (f"Per step: wall {wall_us / steps / 1e3:.3f} ms; {unit} time {total / steps / 1e3:.3f} ms"
                + (f"; the device busy (at least one kernel running) {busy / steps / 1e3:.3f} ms = "
                   f"**{busy_pct:.1f} %** of the wall time" if cuda else "") + ".\n\n"
                + markdown_table([f"{unit} kind", "ms per step", "share"], kinds) + "\n\n"
                + markdown_table(["kind", "name", "calls per step", "ms per step", "share"], longest))
    return {"busy_pct": busy_pct, "by_kind_ms": {k: t / steps / 1e3 for k, t in by_kind.items()},
            "markdown": markdown}


if __name__ == "__main__":
    main()
