"""Snakemake logger plugin `stabilab` (`--logger stabilab`, set in the workflow profiles): the
console of Snakemake's default logger, except that each "N of M steps (x%) done" becomes one line
with the job that finished and an estimate of the time remaining for the whole pipeline
(stabilab.progress):

    [12/45] train lr/baseline/L6_lr0.01_s0 done (3m12s) · elapsed 14m · ETA ~41m

The scheduler's chatter between jobs ("Select jobs to execute...", "Execute 2 jobs...",
"Finished jobid: 3 (Rule: tokenize)") is left out; a failed job's error and log are shown also
with quiet: rules (Snakemake's own filter hides them then); a missing file that Snakemake reports
with its own traceback (`--configfile nonexistent.yaml`) is one line, and so is a word after `--config`
that Snakemake cannot read (a target: `--config set=... $(stabilab targets)`). An interrupt (Ctrl-C) is
one line once the jobs in flight have stopped, in place of Snakemake's error block for each of them (a
run's checkpoint is counted from its log, where `stabilab train` writes `checkpoint written at step
N` as it stops), and of Snakemake's traceback when Ctrl-C comes while it plans or twice:

    interrupted: 3 runs stopped (checkpoints kept); run the same snakemake command to resume

--verbose leaves all of these as Snakemake prints them. Everything else (messages,
errors, the failed jobs' logs of show-failed-logs, dry runs, the job stats) is Snakemake's own
formatter and filter, which Snakemake attaches to this handler because it declares none of its
own. Snakemake finds the plugin by its module name (snakemake_logger_plugin_<name>) on sys.path.
Light imports only: it is imported whenever Snakemake starts.
"""

from __future__ import annotations

import logging
import re
import sys

from snakemake_interface_logger_plugins.base import LogHandlerBase

from stabilab.dryrun import DryRun
from stabilab.progress import Progress

__all__ = ["LogHandler"]

RED, RESET = "\033[31m", "\033[0m"
# the scheduler's chatter between jobs: the progress line says which job finished
SKIPPED_EVENTS = {"job_started", "job_finished"}  # "Execute 2 jobs...", "Finished jobid: 3 (Rule: tokenize)"
SKIPPED_MESSAGES = {"Select jobs to execute..."}
# Snakemake's filter hides these with quiet: rules, and with them the failed job's log
# (show-failed-logs); they are shown unless quiet: all
ALWAYS_SHOWN = {"job_error", "group_error"}
DRY_RUN_END = "This was a dry-run"  # Snakemake's last line of a dry run: the plan of runs goes before it
REASONS_HEAD = "Reasons:\n    (check individual jobs above for details)"  # points at job blocks quiet hides
# Ctrl-C: Snakemake logs this, then an error block for each job in flight as it exits, "Complete
# log(s)", "Elapsed time" and a WorkflowError ("At least one job did not complete successfully.")
INTERRUPTED = "Terminating processes on user request, this might take some time."
RUN_RULES = {"train", "grok_train"}  # a job of these is a run (train resumes from its checkpoint)
SNAKEMAKE_LOGGER = "snakemake.logging"
CHECKPOINT = re.compile(r"checkpoint written at step \d+")


def event_of(record: logging.LogRecord) -> str | None:
    """The record's Snakemake LogEvent as its value ('progress', 'job_info', ...), or None."""
    event = getattr(record, "event", None)
    return None if event is None else str(event)


def missing_file(record: logging.LogRecord) -> str | None:
    """A missing file Snakemake reports with its own traceback (`--configfile nonexistent.yaml`
    fails before the Snakefile is read) as one line: 'error: file not found: nonexistent.yaml'."""
    if event_of(record) != "error" or getattr(record, "exception", None) != "FileNotFoundError":
        return None
    last = record.getMessage().rstrip().splitlines()[-1:]
    match = re.fullmatch(r"FileNotFoundError: \[Errno 2\] No such file or directory: '(.*)'", last[0]) if last else None
    return f"error: file not found: {match.group(1)} (--verbose shows Snakemake's traceback)" if match else None


def bad_config_word(record: logging.LogRecord) -> str | None:
    """A word after `--config` that Snakemake cannot read, reported with its own traceback before
    the Snakefile is read, as one line: a target after `--config` (`snakemake --config set=...
    $(stabilab targets ...)`), or a dotted key (`--config train.steps=20`)."""
    if event_of(record) != "error" or getattr(record, "exception", None) != "ValueError":
        return None
    last = record.getMessage().rstrip().splitlines()[-1:]
    last = last[0] if last else ""
    if match := re.search(r"Config entries have to be defined as name=value pairs\. \(Unparsable value: '(.*)'\)$",
                          last):
        return (f"error: --config got '{match.group(1)}', not key=value: targets after --config are read as "
                "config values: put the targets first or end --config with --")
    if last.endswith("Config entry must start with a valid identifier."):
        return ("error: --config takes top-level keys (name, set, train, ...): a dotted key goes into set, "
                'e.g. --config set="train.steps=20"')
    return None


def plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def wrote_checkpoint(logs) -> bool:
    """Whether a stopped job's log ends saying that it wrote a checkpoint."""
    for log in logs or ():
        try:
            with open(log, "rb") as f:
                f.seek(0, 2)
                f.seek(max(f.tell() - 4096, 0))
                tail = f.read().decode("utf-8", "replace")
        except OSError:
            continue
        if CHECKPOINT.search(tail):
            return True
    return False


class Interrupt:
    """The jobs an interrupt stopped: each fails after Snakemake's INTERRUPTED message."""

    def __init__(self) -> None:
        self.runs = 0
        self.checkpoints = 0
        self.others = 0
        self.reported = False

    def stopped(self, rule: str | None, logs) -> None:
        if rule in RUN_RULES:
            self.runs += 1
            self.checkpoints += wrote_checkpoint(logs)
        else:
            self.others += 1

    def line(self) -> str:
        """'interrupted: 3 runs stopped (checkpoints kept); run the same snakemake command to resume'."""
        kept = ""
        if self.runs and self.checkpoints == self.runs:
            kept = " (checkpoint kept)" if self.runs == 1 else " (checkpoints kept)"
        elif self.checkpoints:
            kept = f" ({self.checkpoints} with a checkpoint)"
        if self.runs and not self.others:
            what = f"{plural(self.runs, 'run')} stopped{kept}"
        elif self.runs:
            what = f"{plural(self.runs, 'run')}{kept} and {plural(self.others, 'other job')} stopped"
        elif self.others:
            what = f"{plural(self.others, 'job')} stopped"
        else:
            what = "no job was running"
        return f"interrupted: {what}; run the same snakemake command to resume"


class LogHandler(LogHandlerBase):
    def __post_init__(self) -> None:
        self.stream = sys.stdout if self.common_settings.stdout else sys.stderr
        encoding = getattr(self.stream, "encoding", None) or "ascii"
        try:
            " · ".encode(encoding)
            separator = " · "
        except (LookupError, UnicodeEncodeError):
            separator = " | "
        self.progress = Progress(separator)
        isatty = getattr(self.stream, "isatty", None)
        quiet = self.common_settings.quiet or ()
        quiet = {getattr(q, "name", str(q)).lower() for q in quiet}
        self.quiet_all, self.quiet_rules = "all" in quiet, bool(quiet & {"all", "rules"})
        self.dry_run = DryRun() if self.common_settings.dryrun else None
        self.colour = not self.common_settings.nocolor and bool(isatty and isatty())
        self.after_job_info = False
        self.interrupt: Interrupt | None = None
        if not self.common_settings.verbose:
            # Ctrl-C while Snakemake reads the Snakefile or plans (before its scheduler runs) ends it
            # with Python's traceback of the KeyboardInterrupt: the line instead
            self.previous_excepthook = sys.excepthook
            sys.excepthook = self.excepthook

    def excepthook(self, kind, value, traceback) -> None:
        if not issubclass(kind, KeyboardInterrupt):
            return self.previous_excepthook(kind, value, traceback)
        self.interrupt = self.interrupt or Interrupt()
        self.report_interrupt()

    def handle(self, record: logging.LogRecord) -> bool:
        """Every record is counted, also those the filter then drops (job_info with quiet: rules)."""
        try:
            event = event_of(record)
            self.progress.observe(event, record.__dict__, record.created)
            if self.dry_run is not None and event == "job_info":
                self.dry_run.observe(record.__dict__)
            if event is None and record.getMessage() == INTERRUPTED and not self.common_settings.verbose:
                self.interrupt = self.interrupt or Interrupt()
            elif event == "job_error" and self.interrupt:
                self.interrupt.stopped(record.__dict__.get("rule_name"), record.__dict__.get("log"))
        except Exception:  # bookkeeping never breaks Snakemake's own output
            pass
        return super().handle(record)

    def filter(self, record: logging.LogRecord) -> bool:
        if event_of(record) in ALWAYS_SHOWN and not self.quiet_all:
            return True
        return super().filter(record)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            event = event_of(record)
            if self.interrupt:
                # the stopped jobs' error blocks, "Complete log(s)", "Elapsed time": one line instead,
                # at the error that ends the pipeline (a WorkflowError), or when Snakemake stops
                if event == "error" and getattr(record, "exception", None) != "RuleException":
                    self.report_interrupt()
                return
            if event in SKIPPED_EVENTS or (event is None and record.getMessage() in SKIPPED_MESSAGES):
                return
            if self.dry_run is not None and event is None and self.dry_run.why:
                text = str(record.getMessage())
                if text.startswith(REASONS_HEAD) and self.quiet_rules:
                    return  # the plan of runs says why, per study
                if text.startswith(DRY_RUN_END):
                    self.stream.write("\n".join(self.dry_run.lines()) + "\n")
            if event == "progress":
                message = self.progress.line(record.__dict__.get("done"))
            elif not self.common_settings.verbose and (short := missing_file(record) or bad_config_word(record)):
                message = short
            else:
                message = self.format(record)
            if not message or message == "None":
                return
            if self.colour and record.levelno >= logging.ERROR:
                message = f"{RED}{message}{RESET}"
            if event == "job_info" and not self.after_job_info:
                message = "\n" + message  # a blank line before a run of job blocks, as Snakemake's
            self.after_job_info = event == "job_info"
            self.stream.write(message + "\n")
            self.stream.flush()
        except Exception:
            self.handleError(record)

    def report_interrupt(self) -> None:
        if self.interrupt and not self.interrupt.reported and not self.quiet_all:
            self.interrupt.reported = True
            self.stream.write(self.interrupt.line() + "\n")
            self.stream.flush()

    def close(self) -> None:
        """Snakemake stops logging. After an interrupt whose line is not out yet (a second Ctrl-C: Snakemake
        gives up waiting for its jobs and prints its own traceback), the jobs still running count as
        stopped, and what Snakemake logs after this (its traceback, their errors) is dropped."""
        try:
            if self.interrupt and not self.interrupt.reported:
                for job in self.progress.running.values():
                    self.interrupt.stopped(job.rule, None)
                self.report_interrupt()
                # Snakemake removes its logger's handlers next; Python's last-resort handler would print
                # what it logs then, unless a handler above takes it
                logging.getLogger(SNAKEMAKE_LOGGER.rpartition(".")[0]).addHandler(logging.NullHandler())
        except Exception:
            pass
        super().close()

    @property
    def writes_to_stream(self) -> bool:
        return True

    @property
    def writes_to_file(self) -> bool:
        return False

    @property
    def has_filter(self) -> bool:
        return False  # Snakemake's DefaultFilter: quiet, printshellcmds, dry run as configured

    @property
    def has_formatter(self) -> bool:
        return False  # Snakemake's DefaultFormatter: errors and show-failed-logs as always

    @property
    def needs_rulegraph(self) -> bool:
        return False
