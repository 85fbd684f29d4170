"""Progress of a whole pipeline with an estimated time remaining: one line per finished job,

    [12/45] train lr/baseline/L6_lr0.01_s0 done (3m12s) · elapsed 14m05s · ETA ~41m

fed with Snakemake's log events by the `stabilab` logger plugin (`--logger stabilab`, on in the
profiles). Pure bookkeeping, no Snakemake or heavy imports, so that it is tested on synthetic
events.

The estimate: each job still to run takes the mean duration of its rule's finished jobs; a rule
none of whose jobs has finished yet takes the slowest rule's mean so far (a guess on the long
side), and the line says "rough" while such jobs are most of the jobs left. A running job has
its elapsed time taken off. That work is spread over the parallel slots (local: the cores, each
job taking its threads; an executor such as SLURM: its jobs at once), and the ETA is never below
the longest single job left.
"""

from __future__ import annotations

import statistics
import string
from dataclasses import dataclass

from .layout import GROK_RUN_DIR, RUN_NAME

TARGET_ONLY = {"all"}  # the Snakefile's default target: runs nothing, takes no time


def format_duration(seconds: float) -> str:
    """42s, 3m12s, 14m (from 10 minutes on), 2h05m."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, secs = divmod(seconds, 60)
    if minutes < 10:
        return f"{minutes}m{secs:02d}s"
    if minutes < 60:
        return f"{minutes}m"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def _fields(pattern: str) -> set[str]:
    return {name for _, name, _, _ in string.Formatter().parse(pattern) if name}


RUN_FIELDS, GROK_FIELDS = _fields(RUN_NAME), _fields(GROK_RUN_DIR)


def job_label(rule: str, wildcards: dict) -> str:
    """'train depth/mlra/L4_lr0.003_s0' (the run's folder under runs/, as in its log's path),
    'grok_train add/stablemax/s0', 'tokenize'; other wildcards as key=value."""
    wildcards = {k: str(v) for k, v in (wildcards or {}).items()}
    if set(wildcards) == RUN_FIELDS:
        return f"{rule} {RUN_NAME.format(**wildcards)}"
    if set(wildcards) == GROK_FIELDS:
        return f"{rule} {GROK_RUN_DIR.format(**wildcards)}"
    if wildcards:
        return f"{rule} " + ",".join(f"{k}={v}" for k, v in wildcards.items())
    return rule


@dataclass
class Job:
    rule: str
    label: str
    threads: int
    started: float


class Progress:
    """Bookkeeping of one pipeline run; `observe` takes each event, `line` says where it stands."""

    def __init__(self, separator: str = " · "):
        self.sep = separator
        self.start: float | None = None
        self.now = 0.0
        self.cores: int | None = None  # local execution
        self.nodes: int | None = None  # an executor (SLURM): jobs at once
        self.planned: dict[str, int] = {}  # rule -> jobs to run (the job stats table)
        self.threads: dict[str, int] = {}  # rule -> threads of its last started job
        self.running: dict[int, Job] = {}
        self.durations: dict[str, list[float]] = {}
        self.finished: list[tuple[Job, float]] = []
        self.total = 0

    # ------------------------------------------------------------------ events
    def observe(self, event: str | None, fields: dict, time: float) -> None:
        """One log record: its event name (Snakemake's LogEvent value), its extra fields, its time."""
        if self.start is None:
            self.start = time
        self.now = max(self.now, time)
        if event == "resources_info":
            if fields.get("cores") is not None:
                self.cores = int(fields["cores"])
            if fields.get("nodes") is not None:
                self.nodes = int(fields["nodes"])
        elif event == "run_info" and isinstance(fields.get("stats"), dict):
            self.planned = {rule: int(n) for rule, n in fields["stats"].items() if rule != "total"}
            self.total = int(fields["stats"].get("total", sum(self.planned.values())))
        elif event == "job_info":
            rule, threads = fields["rule_name"], int(fields.get("threads") or 1)
            self.threads[rule] = threads
            self.running[fields["jobid"]] = Job(rule, job_label(rule, fields.get("wildcards")), threads, time)
        elif event == "job_finished":
            job = self.running.pop(fields["job_id"], None)
            if job is not None:
                self.durations.setdefault(job.rule, []).append(time - job.started)
                self.finished.append((job, time - job.started))
        elif event == "job_error":
            self.running.pop(fields.get("jobid"), None)  # a retry logs its job_info again
        elif event == "progress":
            self.total = int(fields["total"])

    # ------------------------------------------------------------------ estimate
    def _estimate(self, rule: str) -> tuple[float, bool]:
        """A job's expected duration, and whether it is a guess (no job of its rule finished)."""
        if self.durations.get(rule):
            return statistics.fmean(self.durations[rule]), False
        return max(statistics.fmean(d) for d in self.durations.values()), True

    def remaining(self) -> tuple[float, list[str]] | None:
        """Seconds left (None before any job finished) and the rules guessed, if their jobs are
        most of the jobs left."""
        if not self.finished:
            return None
        done = {rule: len(d) for rule, d in self.durations.items()}
        running = {}
        for job in self.running.values():
            running[job.rule] = running.get(job.rule, 0) + 1
        work, longest, jobs, guessed = 0.0, 0.0, 0, {}
        local = self.nodes is None
        for job in self.running.values():
            estimate, guess = self._estimate(job.rule)
            left = max(estimate - (self.now - job.started), 0.0)
            work += left * (job.threads if local else 1)
            longest, jobs = max(longest, left), jobs + 1
            if guess:
                guessed[job.rule] = guessed.get(job.rule, 0) + 1
        for rule, n in self.planned.items():
            if rule in TARGET_ONLY:
                continue
            waiting = n - done.get(rule, 0) - running.get(rule, 0)
            if waiting <= 0:
                continue
            estimate, guess = self._estimate(rule)
            work += waiting * estimate * (self.threads.get(rule, 1) if local else 1)
            longest, jobs = max(longest, estimate), jobs + waiting
            if guess:
                guessed[rule] = guessed.get(rule, 0) + waiting
        slots = (self.cores if local else self.nodes) or 1
        left = max(work / slots, longest)
        rough = sorted(guessed, key=guessed.get, reverse=True) if 2 * sum(guessed.values()) > jobs else []
        return left, rough

    def line(self, done: int | None = None) -> str:
        """`[12/45] <last finished job> done (3m12s) · elapsed 14m · ETA ~41m`."""
        done = len(self.finished) if done is None else done
        total = max(self.total, done)
        elapsed = self.now - self.start if self.start is not None else 0.0
        head, tail = f"[{done}/{total}]", f"{self.sep}elapsed {format_duration(elapsed)}"
        last = self.finished[-1] if self.finished else None
        if last and last[0].rule in TARGET_ONLY:
            return f"{head} pipeline done{tail}"
        if last:
            head += f" {last[0].label} done ({format_duration(last[1])})"
        if done >= total:
            return f"{head}{tail}{self.sep}pipeline done"
        estimate = self.remaining()
        if estimate is None:
            return f"{head}{tail}{self.sep}ETA unknown"
        left, rough = estimate
        tail += f"{self.sep}ETA ~{format_duration(left)}"
        if rough:
            tail += f" (rough: no {' or '.join(rough[:2])} job finished yet)"
        return head + tail
