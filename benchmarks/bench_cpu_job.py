#!/usr/bin/env python3
"""Where the seconds of the default CPU job (`snakemake` on config.yaml, 47 jobs) go.

Subcommands (run from the repository root; docs/performance.md, "CPU smoke test", has figures):

`pipeline`: the whole job. Runs `snakemake` (extra words are passed on) with a `stabilab` shim
first on PATH that records every job's command, wall time and CPU time (user + sys of its whole
process tree, from the kernel's accounting of the finished child, not sampled), samples the load
average every 5 s, and prints per rule: jobs, wall seconds (sum, max), CPU seconds (sum, mean),
then the whole job: wall, CPU of everything (snakemake included), Snakemake's own share, the two
cores' idle time, the data-preparation head and the tail after the last training job.
`--fresh` first deletes results/<name>/ and figures/<name>/ (a measured run starts from nothing);
`--save FILE` writes the records as JSON for `report`.

`report FILE`: the tables of a saved `pipeline` run again.

`phases`: one `stabilab train` job of the default grid, `--repeat` times, each in a fresh process,
its phases timed from inside (wrappers around the functions the job calls): imports, config
validation, opening and checking the shards (sha256 of every byte), model and optimizer build,
the first step, the other steps, logging steps (metrics, evaluation), writing the outputs, and
what lies outside Python's main (interpreter start-up and teardown). Wall and CPU seconds, median
over the repeats. Needs the default job's shards (`snakemake tokenize`).

`ab`: the whole `stabilab train` job as the rule starts it (`bash -c "stabilab train ..."`),
alternately from two source trees (`--src A --src B`, e.g. a `git archive` of the commit before a
change): median wall and CPU seconds of each. On a shared machine, compare CPU seconds.

`compare A B`: whether two results folders hold the same numbers: every CSV of tables/ and
grokking/tables/, cell by cell and bit for bit (as text), except the columns (and the summary
tables' rows) that measure the machine or the checkout (wall time, tokens/s, peak memory,
provenance). Exit code 1 on any difference.

Usage:
    python benchmarks/bench_cpu_job.py pipeline --fresh --save /tmp/job.json
    python benchmarks/bench_cpu_job.py phases --repeat 5
    python benchmarks/bench_cpu_job.py ab --src /tmp/before/src --src src --repeat 6
    python benchmarks/bench_cpu_job.py compare /tmp/before/results/default results/default
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"

# ----------------------------------------------------------------------------- shared


def child_cpu() -> float:
    """User + sys seconds of this process's finished (waited-for) descendants."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def timed_process(cmd: list[str], env: dict) -> tuple[float, float, str]:
    """Wall and CPU (user + sys of the finished process tree) seconds of one command; its stdout."""
    cpu0, t0 = child_cpu(), time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall, cpu = time.perf_counter() - t0, child_cpu() - cpu0
    if proc.returncode:
        raise SystemExit(f"failed ({proc.returncode}): {shlex.join(cmd)[:300]}\n{proc.stdout[-2000:]}\n"
                         f"{proc.stderr[-2000:]}")
    return wall, cpu, proc.stdout


class LoadSampler:
    """The 1-minute load average every `every` seconds, in a thread."""

    def __init__(self, every: float = 5.0):
        self.samples: list[float] = []
        self.every = every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append(os.getloadavg()[0])
            self._stop.wait(self.every)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def text(self) -> str:
        s = self.samples or [os.getloadavg()[0]]
        return (f"load average (1 min, every {self.every:g} s) median {statistics.median(s):.1f}, "
                f"range {min(s):.1f}-{max(s):.1f}, on {os.cpu_count()} cores")


def default_run(config: str, shards: str | None, study: str, variant: str, depth: int) -> dict:
    """The resolved run config the train rule passes for one run of the grid."""
    if str(SRC) not in sys.path:
        sys.path.insert(0, str(SRC))
    from stabilab.experiment import load_experiment, run_config, runs, shards_dir

    cfg = load_experiment(config)
    for run in runs(cfg):
        if (run.study, run.variant, run.depth) == (study, variant, depth):
            return run_config(cfg, run, shards or str(REPO / shards_dir(cfg)))
    raise SystemExit(f"no run {study}/{variant} L{depth} in {config}")


def _median_table(rows: dict[str, list[tuple[float, float]]], first: str = "phase") -> str:
    lines = [f"| {first} | wall s (median) | CPU s (median) | CPU s (min) |", "|---|---:|---:|---:|"]
    for name, values in rows.items():
        walls, cpus = zip(*values)
        lines.append(f"| {name} | {statistics.median(walls):.3f} | {statistics.median(cpus):.3f} | "
                     f"{min(cpus):.3f} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- pipeline

# `stabilab` as the rules call it, timed: bash's `times` gives the finished child's user and sys
# seconds (its whole tree), as the kernel accounted them
SHIM = """#!/bin/bash
start=$(date +%s.%N)
{real} "$@"
rc=$?
end=$(date +%s.%N)
times > "{log}.$$"  # in this shell (a pipe or $(...) would run it in a fresh subshell, which has no children)
t=($(tail -n 1 "{log}.$$"))
rm -f "{log}.$$"
printf '%s\\t%s\\t%s\\t%s\\t%s\\t%s\\n' "$start" "$end" "$rc" "${{t[0]}}" "${{t[1]}}" "$*" >> "{log}"
exit $rc
"""


def _seconds(bash_time: str) -> float:
    """bash `times` output (1m2.345s) in seconds."""
    m = re.fullmatch(r"(\d+)m([\d.]+)s", bash_time)
    return int(m.group(1)) * 60 + float(m.group(2))


def _job_name(args: str) -> tuple[str, str]:
    """(rule, run) of a recorded `stabilab` command line."""
    words = args.split()
    sub = words[0] if words else "?"
    rule = {"grok-train": "grok_train", "grok-report": "grok_report"}.get(sub, sub)
    m = re.search(r"--out (\S+)", args)
    run = ""
    if sub in ("train", "grok-train") and m:
        run = "/".join(m.group(1).rstrip("/").split("/")[-3:])
    return rule, run


def cmd_pipeline(args, extra: list[str]) -> None:
    real = shutil.which("stabilab")
    if real is None:
        raise SystemExit("stabilab is not on PATH (activate the environment)")
    if args.fresh:
        name = args.name
        for folder in (REPO / "results" / name, REPO / "figures" / name):
            shutil.rmtree(folder, ignore_errors=True)
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "jobs.tsv"
        log.touch()
        shim = Path(tmp) / "bin" / "stabilab"
        shim.parent.mkdir()
        shim.write_text(SHIM.format(real=shlex.quote(real), log=str(log)))
        shim.chmod(0o755)
        env = {**os.environ, "PATH": f"{shim.parent}{os.pathsep}{os.environ['PATH']}"}
        cmd = ["snakemake", *extra]
        print(f"$ {shlex.join(cmd)}  (in {REPO})", flush=True)
        with LoadSampler() as load:
            cpu0, t0, start = child_cpu(), time.perf_counter(), time.time()
            proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=not args.verbose, text=True)
            wall, cpu = time.perf_counter() - t0, child_cpu() - cpu0
        if proc.returncode:
            tail = "" if args.verbose else (proc.stdout[-3000:] + proc.stderr[-3000:])
            raise SystemExit(f"snakemake failed ({proc.returncode})\n{tail}")
        jobs = []
        for line in log.read_text().splitlines():
            s, e, rc, user, sys_, cmdline = line.split("\t", 5)
            rule, run = _job_name(cmdline)
            jobs.append({"rule": rule, "run": run, "start": float(s) - start, "end": float(e) - start,
                         "cpu": _seconds(user) + _seconds(sys_), "rc": int(rc)})
    record = {"wall": wall, "cpu": cpu, "cores": args.cores or os.cpu_count(), "load": load.samples,
              "load_text": load.text(), "jobs": jobs, "command": cmd,
              "commit": subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                                       capture_output=True, text=True).stdout.strip()}
    if args.save:
        Path(args.save).write_text(json.dumps(record, indent=1))
    print(report_text(record))


def report_text(rec: dict) -> str:
    jobs, wall, cores = rec["jobs"], rec["wall"], rec["cores"]
    rules: dict[str, list[dict]] = {}
    for job in jobs:
        rules.setdefault(job["rule"], []).append(job)
    lines = [f"commit {rec.get('commit', '?')}: {len(jobs)} stabilab jobs; {rec['load_text']}", "",
             "| rule | jobs | wall s (sum) | wall s (max) | CPU s (sum) | CPU s (mean) |",
             "|---|---:|---:|---:|---:|---:|"]
    for rule, js in rules.items():
        walls = [j["end"] - j["start"] for j in js]
        cpus = [j["cpu"] for j in js]
        lines.append(f"| {rule} | {len(js)} | {sum(walls):.1f} | {max(walls):.1f} | {sum(cpus):.1f} | "
                     f"{statistics.mean(cpus):.2f} |")
    job_wall = sum(j["end"] - j["start"] for j in jobs)
    job_cpu = sum(j["cpu"] for j in jobs)
    train = [j for j in jobs if j["rule"] == "train"]
    data = [j for j in jobs if j["rule"] in ("corpus", "tokenizer", "tokenize")]
    lines += ["", "| whole job | seconds |", "|---|---:|",
              f"| wall | {wall:.1f} |",
              f"| CPU, everything (user + sys) | {rec['cpu']:.1f} |",
              f"| CPU of the stabilab jobs | {job_cpu:.1f} |",
              f"| CPU of Snakemake itself and the jobs' shells | {rec['cpu'] - job_cpu:.1f} |",
              f"| core-seconds without a running job ({cores} cores x wall - job wall) | "
              f"{cores * wall - job_wall:.1f} |"]
    if data:
        lines.append(f"| data preparation done at | {max(j['end'] for j in data):.1f} |")
    if train:
        lines.append(f"| first train job started at | {min(j['start'] for j in train):.1f} |")
        lines.append(f"| after the last train job (tables, figures, report) | "
                     f"{wall - max(j['end'] for j in train):.1f} |")
    return "\n".join(lines)


def cmd_report(args, extra) -> None:
    print(report_text(json.loads(Path(args.file).read_text())))


# ----------------------------------------------------------------------------- phases

# Run in the child: the train job of `stabilab.cli.main`, with wrappers that time each phase.
CHILD = r'''
import json, sys, time
T0 = (time.perf_counter(), time.process_time())
marks, totals = [], {}
def now():
    return (time.perf_counter(), time.process_time())
def mark(name, start):
    marks.append((name, time.perf_counter() - start[0], time.process_time() - start[1]))
def add(name, start):
    w, c, n = totals.get(name, (0.0, 0.0, 0))
    totals[name] = (w + time.perf_counter() - start[0], c + time.process_time() - start[1], n + 1)

s = now(); import stabilab.cli as cli; mark("import stabilab.cli", s)
s = now(); import stabilab.config; mark("import stabilab.config (pydantic, yaml)", s)
s = now(); import torch; mark("import torch", s)
s = now(); import stabilab.train.trainer as tr; mark("import stabilab.train", s)

def timed(owner, attr, name):
    fn = getattr(owner, attr)
    def wrapper(*a, **k):
        s = now()
        try:
            return fn(*a, **k)
        finally:
            add(name, s)
    setattr(owner, attr, wrapper)

timed(stabilab.config, "load_run_config", "config validation")
timed(tr, "open_shards", "shards: open, check sizes and sha256")
timed(tr, "seeded_model", "model build")
timed(tr, "build_optimizer", "optimizer build")
timed(tr.StabilityProbe, "__init__", "stability probe set-up")
timed(tr.Trainer, "__init__", "Trainer set-up, all (incl. the rows above)")
timed(tr.Trainer, "prepare_folder", "run folder")
timed(tr.Trainer, "log_record", "logging steps: metrics, evaluation")
timed(tr.Trainer, "finish", "writing outputs: model.pt, summary.json")
step_fn = tr.Trainer.train_step
def train_step(self, measure):
    s = now()
    try:
        return step_fn(self, measure)
    finally:
        add("first step" if "first step" not in totals else "other steps", s)
tr.Trainer.train_step = train_step
timed(tr.Trainer, "run", "Trainer.run: the loop, all")

s = now()
rc = cli.run_command(sys.argv[1:]) if hasattr(cli, "run_command") else cli.main(sys.argv[1:])
mark("the train command, all", s)
mark("Python main, all", T0)
print("PHASES " + json.dumps({"marks": marks, "totals": totals}), flush=True)
if hasattr(cli, "exit_now"):  # what `stabilab` does after the command (cli.main)
    cli.exit_now(rc)
sys.exit(rc)
'''


def cmd_phases(args, extra) -> None:
    run = default_run(args.config, args.shards, args.study, args.variant, args.depth)
    env = {**os.environ, "PYTHONPATH": str(Path(args.src[0]).resolve()) if args.src else str(SRC)}
    py = sys.executable
    rows: dict[str, list[tuple[float, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp, LoadSampler() as load:
        runtime = Path(tmp) / "runtime.json"
        runtime.write_text("{}")
        out = Path(tmp) / "run"
        argv = ["train", "--run", json.dumps(run), "--out", str(out), "--runtime", str(runtime),
                "--threads", str(args.threads)]
        for _ in range(args.repeat):
            rows.setdefault("`python -c pass`", []).append(timed_process([py, "-c", "pass"], env)[:2])
            wall, cpu, stdout = timed_process([py, "-c", CHILD, *argv], env)
            shutil.rmtree(out)
            phases = json.loads(next(line for line in stdout.splitlines() if line.startswith("PHASES "))[7:])
            for name, w, c in phases["marks"]:
                rows.setdefault(name, []).append((w, c))
            for name, (w, c, n) in phases["totals"].items():
                rows.setdefault(f"{name} (x{n})" if n > 1 else name, []).append((w, c))
            main = next((w, c) for name, w, c in phases["marks"] if name == "Python main, all")
            rows.setdefault("outside Python main: start-up, teardown", []).append((wall - main[0], cpu - main[1]))
            rows.setdefault("the process, all", []).append((wall, cpu))
    print(f"{args.study}/{args.variant} L{args.depth}, {args.repeat} repeats, --threads {args.threads}, "
          f"{env['PYTHONPATH']}; {load.text()}")
    print(_median_table(rows))


# ----------------------------------------------------------------------------- ab


def cmd_ab(args, extra) -> None:
    run = default_run(args.config, args.shards, args.study, args.variant, args.depth)
    srcs = [str(Path(s).resolve()) for s in (args.src or [str(SRC)])]
    rows: dict[str, list[tuple[float, float]]] = {s: [] for s in srcs}
    with tempfile.TemporaryDirectory() as tmp, LoadSampler() as load:
        runtime = Path(tmp) / "runtime.json"
        runtime.write_text("{}")
        out = Path(tmp) / "run"
        for i in range(args.repeat):
            for src in (srcs if i % 2 == 0 else srcs[::-1]):  # alternate which goes first
                argv = [sys.executable, "-m", "stabilab.cli", "train", "--run", json.dumps(run), "--out", str(out),
                        "--runtime", str(runtime), "--threads", str(args.threads)]
                env = {**os.environ, "PYTHONPATH": src}
                rows[src].append(timed_process(["bash", "-c", shlex.join(argv) + " > /dev/null 2>&1"], env)[:2])
                shutil.rmtree(out)
    print(f"{args.study}/{args.variant} L{args.depth}, {args.repeat} rounds, --threads {args.threads}; {load.text()}")
    print(_median_table(rows, "source"))


# ----------------------------------------------------------------------------- compare

# columns that measure the machine or the checkout, not the runs
MACHINE = re.compile(r"wall|tokens_per_s|peak_memory|elapsed|seconds|^(stabilab|git_commit|git_dirty|torch|cuda|"
                     r"python|device_name)$")


def compare_tables(a: Path, b: Path) -> tuple[list[str], list[str], set[str]]:
    """(files compared, differences, columns skipped) of the CSVs under tables/ and grokking/tables/."""
    compared, diffs, skipped = [], [], set()
    names = sorted({p.relative_to(a).as_posix() for p in a.glob("tables/*.csv")} |
                   {p.relative_to(a).as_posix() for p in a.glob("grokking/tables/*.csv")} |
                   {p.relative_to(b).as_posix() for p in b.glob("tables/*.csv")} |
                   {p.relative_to(b).as_posix() for p in b.glob("grokking/tables/*.csv")})
    for name in names:
        if not (a / name).exists() or not (b / name).exists():
            diffs.append(f"{name}: only in {'B' if not (a / name).exists() else 'A'}")
            continue
        ra, rb = (list(csv.reader(open(p / name, newline=""))) for p in (a, b))
        if ra[0] != rb[0]:
            diffs.append(f"{name}: other columns")
            continue
        if len(ra) != len(rb):
            diffs.append(f"{name}: {len(ra) - 1} rows in A, {len(rb) - 1} in B")
            continue
        keep = [i for i, col in enumerate(ra[0]) if not MACHINE.search(col)]
        skipped |= {col for col in ra[0] if MACHINE.search(col)}
        metric = ra[0].index("metric") if "metric" in ra[0] else None  # summary tables: one row per metric
        for n, (x, y) in enumerate(zip(ra[1:], rb[1:]), start=2):
            if metric is not None and x[metric] == y[metric] and MACHINE.search(x[metric]):
                skipped.add(f"{name}: rows of metric {x[metric]}")
                continue
            bad = [ra[0][i] for i in keep if x[i] != y[i]]
            if bad:
                diffs.append(f"{name} line {n}: {', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}")
        compared.append(f"{name} ({len(ra) - 1} rows x {len(keep)} columns)")
    return compared, diffs, skipped


def cmd_compare(args, extra) -> None:
    compared, diffs, skipped = compare_tables(Path(args.a), Path(args.b))
    print(f"compared: {len(compared)} tables\n  " + "\n  ".join(compared))
    print(f"not compared (machine, checkout): {', '.join(sorted(skipped)) or 'nothing'}")
    if not compared:
        raise SystemExit("no tables found")
    if diffs:
        print(f"DIFFERENT: {len(diffs)}\n  " + "\n  ".join(diffs[:50]))
        raise SystemExit(1)
    print("identical: every compared cell is the same text")


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(required=True)
    p = sub.add_parser("pipeline", help="the whole snakemake job, every job timed (extra words go to snakemake)")
    p.add_argument("--fresh", action="store_true", help="delete results/<name>/ and figures/<name>/ first")
    p.add_argument("--name", default="default", help="the experiment's name, for --fresh (default: default)")
    p.add_argument("--cores", type=int, help="cores the job had, for the idle time (default: this machine's)")
    p.add_argument("--save", help="write the records as JSON here")
    p.add_argument("--verbose", action="store_true", help="show snakemake's output")
    p.set_defaults(func=cmd_pipeline)
    p = sub.add_parser("report", help="the tables of a saved pipeline run")
    p.add_argument("file")
    p.set_defaults(func=cmd_report)
    for name, func, text in (("phases", cmd_phases, "the phases of one train job"),
                             ("ab", cmd_ab, "the whole train job from two source trees, alternately")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--config", default=str(REPO / "config.yaml"))
        p.add_argument("--shards", help="token shards (default: the config's, results/<name>/data/shards)")
        p.add_argument("--study", default="depth")
        p.add_argument("--variant", default="baseline")
        p.add_argument("--depth", type=int, default=2)
        p.add_argument("--threads", type=int, default=1)
        p.add_argument("--repeat", type=int, default=3)
        p.add_argument("--src", action="append", help="a src/ folder (ab: twice; default: this checkout's)")
        p.set_defaults(func=func)
    p = sub.add_parser("compare", help="are two results folders' tables the same, bit for bit")
    p.add_argument("a")
    p.add_argument("b")
    p.set_defaults(func=cmd_compare)
    args, extra = parser.parse_known_args(argv)
    if extra and args.func is not cmd_pipeline:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.func(args, extra)


if __name__ == "__main__":
    main()
