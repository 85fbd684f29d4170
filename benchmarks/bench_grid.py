#!/usr/bin/env python3
"""Train a preset's whole grid (or a slice) on one machine, and measure it: wall time, the grid's
model FLOPs, aggregate MFU, each run's tokens/s and peak memory.

Every step goes through the pipeline's own launch path, the `stabilab` subcommands the Snakemake
rules call with the same arguments: data preparation (`corpus`, `tokenizer`, `tokenize`, skipped
when the shards exist), one `stabilab train --run <resolved config> --out <run folder>` process per
run (`--jobs` at a time, sharing the GPU like the `gpu` profile's `gpu_slots`), then `tables` and
`figures`. Results land where the pipeline puts them (`results/<name>/`, `figures/<name>/`), so
the same grid can be finished or redrawn with Snakemake afterwards; runs that already have a
summary.json are skipped, as Snakemake would.

Model FLOPs per run: `flops_per_token` (6 N + 12 L H Q T, N the parameters in matmuls;
`GPT.flops_per_token`) x the tokens it trained on, from its summary.json. Aggregate MFU = the
grid's FLOPs / (wall time x peak), peak 989 TFLOP/s (dense bf16, H100/H200 SXM) by default.

Usage:
    python benchmarks/bench_grid.py --config configs/oec.yaml --jobs 6 --out benchmarks/results/oec_grid
    python benchmarks/bench_grid.py --config configs/oec.yaml --seeds 0 --lrs 0.1 0.3   # a slice

10-16 small runs sharing a GPU as separate processes reached about the MFU of one alone while a
kernel was running nearly all the time (benchmarks/README.md): consistent with the processes
taking turns on it. `--mps` starts a CUDA MPS control daemon for the grid's processes (and stops
it at the end), or joins one already serving the environment, under which their kernels can
overlap; `runtime.compile_mode=reduce-overhead` (an override) gives each run CUDA graphs.

Where the runs compile, the first of the runs that compile the same graphs starts alone and the
others once it has logged a step, reading its graphs from Inductor's on-disk cache
(`--compile-first`, the default; `--no-compile-first` starts them all at once). On one H200 the
whole paper grid took 566 s at 20.4 % aggregate MFU this way (benchmarks/results/h200_grid_paper_full.md;
no run of the whole grid without it was made to compare).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
try:
    import stabilab  # noqa: F401
except ImportError:  # not installed (e.g. on a bare GPU box): use the checkout's src/
    sys.path.insert(0, str(REPO / "src"))

from stabilab.config import RuntimeConfig, parse_overrides, validated
from stabilab.device import PEAK_BF16_TFLOPS
from stabilab.experiment import load_experiment, run_config, runs, shards_dir, write_runtime
from stabilab.layout import FIGURES, RESULTS, TOKENIZER
from stabilab.train.trainer import PREEMPTED_EXIT_CODE as RETRY_EXIT_CODE  # preempted, or out of GPU memory

RETRY_PAUSE_S = 30.0
STABILAB = [sys.executable, "-m", "stabilab.cli"]


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="experiment config (a preset)")
    p.add_argument("--jobs", type=int, default=4, help="runs training at once (they share the GPU)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads per run (the gpu profile's)")
    p.add_argument("--studies", nargs="*", help="only these studies")
    p.add_argument("--variants", nargs="*", help="only these variants")
    p.add_argument("--lrs", nargs="*", type=float, help="only these learning rates")
    p.add_argument("--seeds", nargs="*", type=int, help="only these seeds")
    p.add_argument("--order", default="seed,-lr", help="launch order: comma-separated keys, '-' for descending")
    p.add_argument("--retries", type=int, default=2,
                   help="times a run that exits 75 (preempted, or out of GPU memory) is tried again")
    p.add_argument("--stacked", type=int, default=0, metavar="N",
                   help="train runs that differ only in LR and seed N at a time in one process (stabilab "
                        "train-stacked); a job of N counts as one of --jobs")
    p.add_argument("--compile-first", action=argparse.BooleanOptionalAction, default=True,
                   help="of the runs whose compiled graphs are the same (configs equal but for LR and seed), the "
                        "first compiles alone and the others start once it has logged its first step, reading "
                        "its graphs from Inductor's on-disk cache instead of compiling them again (default where the "
                        "runs compile; --no-compile-first launches every run at once, each compiling its own)")
    p.add_argument("--deadline", type=float, default=None, help="launch no run after this many seconds")
    p.add_argument("--commit", default=None, metavar="SHA",
                   help="the commit every run of the slice must come from: a finished run whose summary.json names "
                        "another (or no) commit is trained again, its folder first moved aside to "
                        "<folder>.by-<that commit's first 7 digits> (nothing is deleted)")
    p.add_argument("--mps", action="store_true",
                   help="run the grid's processes under CUDA MPS (nvidia-cuda-mps-control), started and stopped here")
    p.add_argument("--peak-tflops", type=float, default=PEAK_BF16_TFLOPS)
    p.add_argument("--no-report", action="store_true", help="skip the tables and figures at the end")
    p.add_argument("--out", default=None, help="folder for grid.md and grid.csv")
    p.add_argument("overrides", nargs="*", metavar="key.path=value", help="experiment-config overrides")
    return p.parse_args(argv)


class Children:
    """The grid's running `stabilab` processes. A SIGTERM to bench_grid is passed on to them (each
    run then writes its checkpoint and exits 75) and nothing more is launched, so that no run keeps
    training, orphaned, into the folders a restarted grid trains in."""

    def __init__(self):
        # reentrant: the handler runs in the main thread, which may hold the lock (data preparation)
        self.lock, self.live, self.stopped = threading.RLock(), set(), threading.Event()

    @property
    def stopping(self) -> bool:
        return self.stopped.is_set()

    def run(self, cmd: list[str], **kwargs) -> int:
        with self.lock:
            if self.stopping:
                return RETRY_EXIT_CODE
            proc = subprocess.Popen(cmd, **kwargs)
            self.live.add(proc)
        try:
            return proc.wait()
        finally:
            with self.lock:
                self.live.discard(proc)

    def stop(self, *_) -> None:
        with self.lock:
            self.stopped.set()
            for proc in self.live:
                proc.terminate()

    def pause(self, seconds: float) -> None:
        """Wait before a retry, cut short by a stop."""
        self.stopped.wait(seconds)


CHILDREN = Children()


@contextlib.contextmanager
def sigterm_to_children():
    """While the block runs, a SIGTERM stops CHILDREN (this grid's runs) instead of this process."""
    previous = signal.signal(signal.SIGTERM, CHILDREN.stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_cli(args: list[str], log: Path, append: bool = False) -> int:
    """One `stabilab` subcommand, as a rule runs it, its output into `log`."""
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    with open(log, "a" if append else "w") as f:
        return CHILDREN.run(STABILAB + args, stdout=f, stderr=subprocess.STDOUT, cwd=REPO, env=env)


MPS_CONTROL = "nvidia-cuda-mps-control"


@contextlib.contextmanager
def mps_daemon(log_dir: Path):
    """A CUDA MPS control daemon for the processes started inside (they inherit its pipe
    directory through the environment), quit on the way out. With CUDA_MPS_PIPE_DIRECTORY already
    set, the daemon that serves it is joined and left running: two grids can share one MPS server
    (two daemons would each start their own and the grids would time-slice again)."""
    if os.environ.get("CUDA_MPS_PIPE_DIRECTORY"):
        yield {"CUDA_MPS_PIPE_DIRECTORY": os.environ["CUDA_MPS_PIPE_DIRECTORY"]}
        return
    exe = shutil.which(MPS_CONTROL)
    if exe is None:
        raise SystemExit(f"--mps: {MPS_CONTROL} is not on PATH (it comes with the NVIDIA driver's utilities)")
    log_dir.mkdir(parents=True, exist_ok=True)
    # the pipe directory holds a unix socket, whose path must stay short: not under the results
    pipe = tempfile.mkdtemp(prefix="mps-")
    env = {"CUDA_MPS_PIPE_DIRECTORY": pipe, "CUDA_MPS_LOG_DIRECTORY": str(log_dir)}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        if subprocess.run([exe, "-d"]).returncode != 0:
            raise SystemExit(f"--mps: '{MPS_CONTROL} -d' failed: see {log_dir}/control.log")
        try:
            yield env
        finally:
            subprocess.run([exe], input="quit\n", text=True)
    finally:
        shutil.rmtree(pipe, ignore_errors=True)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


GPU_SAMPLE_S = 5  # nvidia-smi's sampling period while the grid trains


@contextlib.contextmanager
def gpu_sampler(path: Path | None):
    """nvidia-smi's utilization and memory of each GPU every GPU_SAMPLE_S seconds into `path`
    (CSV) while the block runs; nothing without nvidia-smi or a path."""
    exe = shutil.which("nvidia-smi")
    if exe is None or path is None:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        f.write("timestamp,gpu,utilization_pct,memory_mib\n")
        f.flush()
        proc = subprocess.Popen([exe, "--query-gpu=timestamp,index,utilization.gpu,memory.used",
                                 "--format=csv,noheader,nounits", "-l", str(GPU_SAMPLE_S)], stdout=f,
                                stderr=subprocess.DEVNULL)
        try:
            yield
        finally:
            proc.terminate()
            proc.wait()


def utilization_line(path: Path) -> str | None:
    """grid.md's line on the samples: how often a kernel was running, and the memory in use."""
    if not path.exists():
        return None
    rows = [line.split(",") for line in path.read_text().splitlines()[1:]]
    rows = [(float(r[2]), float(r[3])) for r in rows if len(r) == 4 and r[2].strip().isdigit()]
    if not rows:
        return None
    util = sorted(u for u, _ in rows)
    busy = sum(u >= 99 for u in util)
    return (f"- GPU utilization (nvidia-smi, the share of time a kernel was running, every {GPU_SAMPLE_S} s): "
            f"median {util[len(util) // 2]:.0f} %, >= 99 % in {busy} of {len(util)} samples; "
            f"memory in use up to {max(m for _, m in rows) / 1024:.1f} GiB")


def prepare_data(cfg: dict, res: Path) -> None:
    """The data rules (corpus -> tokenizer -> tokenize) unless the token shards exist."""
    shards = Path(shards_dir(cfg))
    if (REPO / shards / "meta.json").exists():
        return
    data = res / "data"
    tok = cfg["tokenizer"]
    steps = [
        (["corpus", "--spec", json.dumps(cfg["data"], sort_keys=True), "--out", str(data / "corpus")], "corpus"),
        (["tokenizer", "--kind", tok.get("kind", "bpe"), "--vocab-size", str(tok.get("vocab_size", 2048)),
          "--corpus", str(data / "corpus"), "--out", str(res / TOKENIZER)], "tokenizer"),
        (["tokenize", "--tokenizer", str(res / TOKENIZER), "--corpus", str(data / "corpus"),
          "--out", str(shards)], "tokenize"),
    ]
    for cli_args, name in steps:
        if run_cli(cli_args, res / "logs" / f"{name}.log") != 0:
            raise SystemExit(f"{name} failed: see {res / 'logs' / f'{name}.log'}")


def chosen_runs(cfg: dict, args) -> list:
    grid = [r for r in runs(cfg) if (not args.studies or r.study in args.studies)
            and (not args.variants or r.variant in args.variants)
            and (not args.lrs or any(abs(r.lr - lr) <= 1e-12 * lr for lr in args.lrs))
            and (not args.seeds or r.seed in args.seeds)]
    for key in reversed(args.order.split(",")):
        name = key.lstrip("-")
        grid.sort(key=lambda r, name=name: getattr(r, name), reverse=key.startswith("-"))
    return grid


def set_aside_other_commits(grid: list, res: Path, commit: str) -> list[Path]:
    """Move each finished run of `grid` not trained by `commit` (a full or abbreviated SHA) out of
    the way, so that it trains again; return where each went."""
    moved = []
    for run in grid:
        folder = res / run.path
        if not (folder / "summary.json").exists():
            continue
        theirs = json.loads((folder / "summary.json").read_text()).get("provenance", {}).get("git_commit") or ""
        if theirs and (theirs.startswith(commit) or commit.startswith(theirs)):
            continue
        aside, n = folder.with_name(f"{folder.name}.by-{theirs[:7] or 'unknown'}"), 1
        while aside.exists():
            n += 1
            aside = folder.with_name(f"{folder.name}.by-{theirs[:7] or 'unknown'}.{n}")
        folder.rename(aside)
        moved.append(aside)
    return moved


def resume_step(folder: Path) -> int | None:
    """The step a run folder's checkpoint resumes from; None without one, or when it cannot be
    read (its run then says so; here it counts as a fresh start)."""
    from stabilab.errors import UserError
    from stabilab.train.checkpoint import checkpoint_step

    try:
        return checkpoint_step(folder)
    except (UserError, KeyError, RuntimeError):
        return None


def graph_key(cfg: dict, run) -> str:
    """Runs with the same key compile the same graphs: their resolved configs differ only in what
    a stacked job's members may differ in (optim.lr and seed; `stacked.PER_MEMBER`)."""
    from stabilab.config import leaves
    from stabilab.train.stacked import PER_MEMBER

    resolved = run_config(cfg, run, shards_dir(cfg))
    return json.dumps({k: v for k, v in leaves(resolved).items() if k not in PER_MEMBER}, sort_keys=True,
                      default=str)


def job_key(cfg: dict, job: list) -> str:
    """Jobs with the same key compile the same graphs: one `train` run or a stack of the same size
    (a stack's graphs are specialized on its member count) of runs with one graph key."""
    return json.dumps([graph_key(cfg, job[0]), len(job)])


def runs_compile(cfg: dict) -> bool:
    """Whether the grid's runs will compile (`runtime.compile`, auto: on CUDA), so that a first run
    has graphs to leave in the cache; without compilation `--compile-first` would only delay."""
    rt = validated(RuntimeConfig, cfg.get("runtime") or {}, "runtime")
    cuda = rt.device != "cpu" and torch.cuda.is_available()
    return rt.compiles_on(torch.device("cuda" if cuda else "cpu"))


class CompileFirst:
    """`--compile-first`: of the jobs with one `job_key`, the first in launch order (the pioneer)
    starts at once; the others wait, in their worker and holding its slot, until the pioneer has
    logged a step past the one it started from (so its training step, compilation included, has
    run once and those graphs are in Inductor's on-disk cache; its evaluation and metrics graphs
    come later and are still compiled by every run), or until it has exited, or the grid stops.
    The pool takes jobs first-in, first-out, so a pioneer is always running before its followers
    wait for it."""

    POLL_S = 1.0

    def __init__(self, jobs: list[list], keys: list[str], res: Path):
        self.res = res
        self.key = {job[0].path: key for job, key in zip(jobs, keys)}
        self.pioneer: dict[str, str] = {}  # key -> the path of its first job's first run
        for job, key in zip(jobs, keys):
            self.pioneer.setdefault(key, job[0].path)
        self.started: dict[str, tuple[float, int]] = {}  # pioneer path -> (start time, step it resumes from)
        self.exited = {path: threading.Event() for path in self.pioneer.values()}

    def _logged_past(self, path: str) -> bool:
        """The pioneer's metrics.jsonl, rewritten since it started, ends past its starting step."""
        t0, from_step = self.started.get(path, (float("inf"), 0))
        log = self.res / path / "metrics.jsonl"
        try:
            stat = log.stat()
            if stat.st_mtime < t0:
                return False
            with open(log, "rb") as f:
                f.seek(max(0, stat.st_size - 4096))
                lines = f.read().splitlines()
            return bool(lines) and json.loads(lines[-1]).get("step", 0) > from_step
        except (OSError, ValueError):  # not written yet, or a line half-written
            return False

    def before(self, job: list) -> threading.Event | None:
        """Wait for this job's pioneer, or, being one, note its start; a pioneer gets the event to
        set when it exits."""
        path = job[0].path
        pioneer = self.pioneer[self.key[path]]
        if pioneer == path:
            self.started[path] = (time.time() - 1.0, resume_step(self.res / path) or 0)  # -1 s: mtime resolution
            return self.exited[path]
        while not (self.exited[pioneer].is_set() or CHILDREN.stopping or self._logged_past(pioneer)):
            time.sleep(self.POLL_S)
        return None


def stacked_jobs(cfg: dict, todo: list, size: int, res: Path) -> list[list]:
    """The runs grouped for `stabilab train-stacked`: runs whose resolved configs differ only in
    optim.lr and seed and whose checkpoints (in `res`) resume from the same step (a stack holds
    its members at one step), in launch order, at most `size` per job; a run the stacked path
    refuses (SPAM, StableMax, ...) or one without a partner is a job of its own."""
    from stabilab.config import load_run_config
    from stabilab.errors import UserError
    from stabilab.train.stacked import check_members

    groups: dict[str, list] = {}
    for run in todo:
        try:
            check_members([load_run_config(run_config(cfg, run, shards_dir(cfg)))])
        except UserError:
            key = run.path  # trained alone
        else:
            key = json.dumps([graph_key(cfg, run), resume_step(res / run.path)])
        groups.setdefault(key, []).append(run)
    jobs = [g[i:i + size] for g in groups.values() for i in range(0, len(g), size)]
    return sorted(jobs, key=lambda job: todo.index(job[0]))  # the launch order of their first members


def main(argv=None) -> dict:
    global CHILDREN
    CHILDREN = Children()  # this grid's (a test may run several in one process)
    args = parse_args(argv)
    cfg = load_experiment(args.config, parse_overrides(args.overrides))
    res = REPO / RESULTS.format(name=cfg["name"])
    start = time.time()
    prepare_data(cfg, res)
    t_data = time.time() - start
    runtime = write_runtime(cfg, res / "runtime.json")
    grid = chosen_runs(cfg, args)
    if args.commit:
        moved = set_aside_other_commits(grid, res, args.commit)
        print(f"{len(moved)} finished runs of other commits set aside (<run>.by-<commit>), to train again", flush=True)
    todo = [r for r in grid if not (res / r.path / "summary.json").exists()]
    print(f"{len(grid)} runs in the slice, {len(todo)} to train, {args.jobs} at a time", flush=True)
    lock, done, failed, skipped = threading.Lock(), [], [], []
    jobs = stacked_jobs(cfg, todo, args.stacked, res) if args.stacked > 1 else [[r] for r in todo]
    if args.stacked > 1:
        print(f"stacked: {len(todo)} runs in {len(jobs)} jobs of up to {args.stacked} members", flush=True)
    args.compile_first = args.compile_first and runs_compile(cfg)  # decided once: the grid and its report
    first = CompileFirst(jobs, [job_key(cfg, job) for job in jobs], res) if args.compile_first else None

    def train(job: list) -> None:
        pioneer = first.before(job) if first else None  # a later job of its graph key waits here
        try:
            if CHILDREN.stopping or (args.deadline is not None and time.time() - start > args.deadline):
                with lock:
                    skipped.extend(job)
                return
            train_job(job)
        finally:
            if pioneer is not None:
                pioneer.set()

    def train_job(job: list) -> None:
        t0 = time.time()
        for attempt in range(args.retries + 1):
            if attempt:  # the GPU was full (or the run preempted): wait for others to free memory, resume
                CHILDREN.pause(RETRY_PAUSE_S * attempt)
            # a stacked job's members that finished before it stopped are not trained again
            left = [r for r in job if not (res / r.path / "summary.json").exists()] if attempt else job
            code = launch(left, append=attempt > 0) if left else 0
            if code != RETRY_EXIT_CODE or CHILDREN.stopping:
                break
        with lock:
            for run in job:
                finished = code == 0 or (len(job) > 1 and (res / run.path / "summary.json").exists())
                stopped = CHILDREN.stopping and code == RETRY_EXIT_CODE  # checkpointed at the stop
                (done if finished else skipped if stopped else failed).append(run)
                print(f"[{len(done) + len(failed)}/{len(todo)}] {run.path}: exit {code} in {time.time() - t0:.0f} s "
                      f"(at {time.time() - start:.0f} s){f' (stacked x{len(job)})' if len(job) > 1 else ''}",
                      flush=True)

    def launch(job: list, append: bool) -> int:
        """One `stabilab train` process for a single run, one `train-stacked` for several."""
        specs = []
        for run in job:
            spec = res / "grid_configs" / (run.path.replace("/", "_") + ".json")
            spec.parent.mkdir(parents=True, exist_ok=True)
            spec.write_text(json.dumps(run_config(cfg, run, shards_dir(cfg)), sort_keys=True))
            specs.append(str(spec))
        outs = [str(res / run.path) for run in job]
        if len(job) == 1:
            cli, log = ["train", "--run", specs[0], "--out", outs[0]], res / "logs" / f"{job[0].path}.log"
        else:  # one process trains the members together; each still writes its own run folder
            cli, log = ["train-stacked", "--runs", *specs, "--outs", *outs], res / "logs" / f"{job[0].path}.stacked.log"
        return run_cli([*cli, "--runtime", runtime, "--threads", str(args.threads)], log, append=append)

    t_train = time.time()
    with sigterm_to_children(), mps_daemon(res / "logs" / "mps") if args.mps else contextlib.nullcontext(), \
            gpu_sampler(Path(args.out) / "gpu_util.csv" if args.out else None), \
            ThreadPoolExecutor(max_workers=args.jobs) as pool:
        list(pool.map(train, jobs))
    t_train = time.time() - t_train
    if CHILDREN.stopping:
        print(f"SIGTERM: stopped; {len(skipped)} runs not trained (those stopped wrote their checkpoints)",
              flush=True)
    # the tables cover every finished run of the preset, not only this slice's: a slice that completes
    # a grid must not leave tables of the slice alone
    summaries = [res / r.path / "summary.json" for r in runs(cfg) if (res / r.path / "summary.json").exists()]
    if summaries and not args.no_report:
        tables = res / "tables"
        run_cli(["tables", *map(str, summaries), "--studies", json.dumps(cfg["studies"]), "--out", str(tables)],
                res / "logs" / "tables.log")
        run_cli(["figures", "--tables", str(tables), "--out", str(REPO / FIGURES.format(name=cfg["name"]))],
                res / "logs" / "figures.log")
    return report(args, cfg, res, [r for r in grid if r in done], t_train, t_data, failed, skipped)


def report(args, cfg, res: Path, trained: list, wall: float, t_data: float, failed: list, skipped: list) -> dict:
    rows = []
    for run in trained:
        s = json.loads((res / run.path / "summary.json").read_text())
        flops = s.get("flops_per_token", 0) * s["tokens"]
        rows.append({"run": run.path, "tokens": s["tokens"], "steps": s["steps"], "wall_time_s": s["wall_time_s"],
                     "tokens_per_s": s["tokens"] / max(s["wall_time_s"], 1e-9), "model_flops": flops,
                     "peak_memory_gib": s.get("peak_memory_gib"), "diverged": s["diverged"],
                     "final_val_loss": s["final_val_loss"]})
    total = sum(r["model_flops"] for r in rows)
    mfu = 100 * total / max(wall, 1e-9) / (args.peak_tflops * 1e12)
    how = f", stacked {args.stacked} per process" if args.stacked > 1 else ""
    how += ", under CUDA MPS" if args.mps else ""
    how += ", compile first" if args.compile_first else ""
    lines = [f"# Grid benchmark: {args.config} ({len(rows)} runs trained, {args.jobs} at a time{how})", "",
             *([f"- overrides: {' '.join(args.overrides)}"] if args.overrides else []),
             f"- wall time of the training phase: {wall:.1f} s (data preparation before it: {t_data:.1f} s)",
             f"- model FLOPs of the trained runs: {total / 1e15:.2f} PFLOP; aggregate MFU {mfu:.1f} % "
             f"of {args.peak_tflops:g} TFLOP/s",
             f"- failed: {len(failed)}; not trained (deadline or SIGTERM): {len(skipped)}",
             *filter(None, [utilization_line(Path(args.out) / "gpu_util.csv") if args.out else None]), "",
             "| run | tokens | run wall (s) | tokens/s (own wall time) | peak memory (GiB) | final val loss |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        mem = f"{r['peak_memory_gib']:.2f}" if r["peak_memory_gib"] is not None else "n/a"
        loss = "diverged" if r["diverged"] else f"{r['final_val_loss']:.4f}"
        lines.append(f"| {r['run']} | {r['tokens']:,} | {r['wall_time_s']:.1f} | {r['tokens_per_s']:,.0f} | "
                     f"{mem} | {loss} |")
    markdown = "\n".join(lines)
    print(markdown, flush=True)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "grid.md").write_text(markdown + "\n")
        (out / "grid.json").write_text(json.dumps({"wall_s": wall, "model_flops": total, "mfu_pct": mfu,
                                                   "jobs": args.jobs, "runs": rows}, indent=2) + "\n")
    return {"rows": rows, "mfu_pct": mfu, "wall_s": wall, "failed": failed, "skipped": skipped}


if __name__ == "__main__":
    result = main()
    sys.exit(RETRY_EXIT_CODE if CHILDREN.stopping else 1 if result["failed"] else 0)
