"""The whole-pipeline progress line with its ETA (stabilab.progress) and the Snakemake logger plugin
that prints it, fed with synthetic log events through Snakemake's own logger manager."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from stabilab.progress import Progress, format_duration, job_label

TRAIN = {"study": "depth", "variant": "mlra", "depth": "4", "lr": "0.003", "seed": "0"}


@pytest.fixture(autouse=True)
def keep_excepthook(monkeypatch):
    """The plugin's handler takes over sys.excepthook (an interrupt while Snakemake plans)."""
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)


def test_durations_and_job_labels_read_like_the_run_folders():
    assert [format_duration(s) for s in (0.4, 42, 192, 605, 7500)] == ["0s", "42s", "3m12s", "10m", "2h05m"]
    assert job_label("train", TRAIN) == "train depth/mlra/L4_lr0.003_s0"
    assert job_label("grok_train", {"operation": "add", "variant": "stablemax", "seed": 1}) == \
        "grok_train add/stablemax/s1"
    assert job_label("tables", {}) == "tables" and job_label("x", {"k": 1}) == "x k=1"


def pipeline(cores=2, nodes=None):
    """Corpus (10 s), then four train jobs of 60 s on two slots, then tables."""
    p = Progress()
    p.observe(None, {"msg": "Building DAG of jobs..."}, 0.0)
    p.observe("resources_info", {"cores": cores} if nodes is None else {"nodes": nodes}, 0.0)
    p.observe("run_info", {"stats": {"corpus": 1, "train": 4, "tables": 1, "total": 6}}, 0.0)
    p.observe("job_info", {"jobid": 1, "rule_name": "corpus", "wildcards": {}, "threads": 1}, 0.0)
    p.observe("job_finished", {"job_id": 1}, 10.0)
    p.observe("progress", {"done": 1, "total": 6}, 10.0)
    return p


def test_before_a_rule_is_timed_its_jobs_take_the_slowest_rules_mean_and_the_line_says_rough():
    p = pipeline()
    # 4 train + 1 tables at the corpus's 10 s, on 2 cores; guessed jobs are most of the jobs left
    assert p.line(1) == "[1/6] corpus done (10s) · elapsed 10s · ETA ~25s (rough: no train or tables job finished yet)"


def test_finished_jobs_of_a_rule_time_its_remaining_and_running_jobs():
    p = pipeline()
    p.observe("job_info", {"jobid": 2, "rule_name": "train", "wildcards": TRAIN, "threads": 1}, 10.0)
    p.observe("job_info", {"jobid": 3, "rule_name": "train", "wildcards": {**TRAIN, "seed": 1}, "threads": 1}, 40.0)
    p.observe("job_finished", {"job_id": 2}, 70.0)
    # job 3 has 30 of its 60 s left, two more train jobs 60 s each, tables at the slowest rule's mean
    # (train, 60 s): 210 s on 2 cores; one job in four guessed: not rough
    assert p.line(2) == "[2/6] train depth/mlra/L4_lr0.003_s0 done (1m00s) · elapsed 1m10s · ETA ~1m45s"
    p.observe("job_finished", {"job_id": 3}, 100.0)
    for jobid, start in ((4, 100.0), (5, 100.0)):
        p.observe("job_info", {"jobid": jobid, "rule_name": "train", "wildcards": TRAIN, "threads": 1}, start)
    p.observe("job_finished", {"job_id": 4}, 130.0)
    # train: 50 s on average, job 5 has 20 s left, tables 50 s: 70 s on 2 cores, but never below
    # the longest job left
    assert p.line(4).endswith("· ETA ~50s")
    p.observe("job_finished", {"job_id": 5}, 160.0)
    p.observe("job_info", {"jobid": 6, "rule_name": "tables", "wildcards": {}, "threads": 1}, 160.0)
    p.observe("job_finished", {"job_id": 6}, 165.0)
    assert p.line(6) == "[6/6] tables done (5s) · elapsed 2m45s · pipeline done"


def test_the_target_rule_all_takes_no_time_and_ends_the_pipeline():
    p = pipeline()
    p.planned["all"] = 1
    assert "ETA ~25s" in p.line(1)  # as without it
    p.observe("job_info", {"jobid": 0, "rule_name": "all", "wildcards": {}, "threads": 1}, 20.0)
    p.observe("job_finished", {"job_id": 0}, 20.0)
    assert p.line(6) == "[6/6] pipeline done · elapsed 20s"


def test_slots_come_from_the_cores_and_threads_or_from_the_executors_jobs():
    one_core = pipeline(cores=1)
    assert "ETA ~50s" in one_core.line(1)
    cluster = pipeline(nodes=100)  # every job at once: the longest job left
    assert "ETA ~10s" in cluster.line(1)
    wide = pipeline(cores=4)
    wide.observe("job_info", {"jobid": 2, "rule_name": "train", "wildcards": TRAIN, "threads": 4}, 10.0)
    wide.observe("job_finished", {"job_id": 2}, 50.0)
    # three train jobs of 40 s, each taking all four cores, one after the other; tables (40 s, one core)
    assert wide.line(2).endswith("ETA ~2m10s")


def test_a_failed_job_is_not_counted_as_running_and_its_retry_is_timed_from_its_restart():
    p = pipeline()
    p.observe("job_info", {"jobid": 2, "rule_name": "train", "wildcards": TRAIN, "threads": 1}, 10.0)
    p.observe("job_error", {"jobid": 2, "rule_name": "train"}, 15.0)
    assert p.running == {}
    p.observe("job_info", {"jobid": 2, "rule_name": "train", "wildcards": TRAIN, "threads": 1}, 20.0)
    p.observe("job_finished", {"job_id": 2}, 80.0)
    assert p.durations["train"] == [60.0]


# ----------------------------------------------------------------------------- the logger plugin


def record_events(log):
    from snakemake_interface_logger_plugins.common import LogEvent

    log.info("Select jobs to execute...")
    log.info("Execute 1 jobs...", extra={"event": LogEvent.JOB_STARTED, "jobs": [1]})
    log.info(" Rule: train, Jobid: 1", extra={
        "event": LogEvent.JOB_INFO, "jobid": 1, "rule_msg": None, "rule_name": "train", "local": False,
        "input": [], "output": ["summary.json"], "log": [], "benchmark": None, "wildcards": TRAIN,
        "reason": "missing output", "resources": {}, "priority": 0, "threads": 1, "indent": False,
        "is_checkpoint": False, "printshellcmd": True, "is_handover": False, "shellcmd": "stabilab train"})
    log.info("Finished jobid: 1 (Rule: train)", extra={"event": LogEvent.JOB_FINISHED, "job_id": 1})
    log.info(None, extra={"event": LogEvent.PROGRESS, "done": 1, "total": 2})


def test_the_plugin_prints_the_eta_line_and_snakemakes_own_errors_and_failed_logs(capsys, tmp_path):
    from snakemake.logging import LoggerManager, logger
    from snakemake.settings.enums import Quietness
    from snakemake.settings.types import OutputSettings
    from snakemake_interface_logger_plugins.common import LogEvent
    from snakemake_interface_logger_plugins.registry import LoggerPluginRegistry
    from snakemake_interface_logger_plugins.settings import LogHandlerSettingsBase

    assert "stabilab" in LoggerPluginRegistry().plugins  # found by its module name, as `--logger stabilab`
    failed_log = tmp_path / "train.log"
    failed_log.write_text("config error: bad value for 'optim.lr'\n")
    settings = OutputSettings(quiet={Quietness.RULES}, show_failed_logs=True, nocolor=True,
                              log_handler_settings={"stabilab": LogHandlerSettingsBase()})
    manager = LoggerManager(logger, settings)
    try:
        record_events(logger)
        logger.error("Error in rule train, jobid: 2", extra={
            "event": LogEvent.JOB_ERROR, "rule_name": "train", "rule_msg": None, "jobid": 2, "input": [],
            "output": ["summary.json"], "log": [str(failed_log)], "conda_env": None, "container_img": None,
            "aux": {}, "indent": False, "shellcmd": "stabilab train --run x"})
    finally:
        manager.stop()
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert any(line.startswith("[1/2] train depth/mlra/L4_lr0.003_s0 done (") and "· ETA ~" in line
               for line in lines), err
    assert "Error in rule train:" in err and "config error: bad value for 'optim.lr'" in err  # the failed log
    for chatter in ("Select jobs to execute", "Execute 1 jobs", "Finished jobid", "steps (", "Rule: train"):
        assert chatter not in err, chatter


def interrupt_events(log, runs, exited=True):
    """What Snakemake 9 logs on Ctrl-C with two train jobs in flight (recorded from the default pipeline
    with SIGINT sent to snakemake's process group): its 'Terminating' line, then for each job as it exits
    a RuleException and a job_error (the shell command, the failed log), then the closing lines. Not
    `exited`: the records up to 'Terminating' (the jobs are still stopping)."""
    from snakemake_interface_logger_plugins.common import LogEvent

    log.info("Execute 2 jobs...", extra={"event": LogEvent.JOB_STARTED, "jobs": [14, 32]})
    for jobid, (wildcards, _) in zip((14, 32), runs):
        log.info(f" Rule: train, Jobid: {jobid}", extra={
            "event": LogEvent.JOB_INFO, "jobid": jobid, "rule_msg": None, "rule_name": "train", "local": False,
            "input": [], "output": ["summary.json"], "log": [], "benchmark": None, "wildcards": wildcards,
            "reason": "missing output", "resources": {}, "priority": 0, "threads": 1, "indent": False,
            "is_checkpoint": False, "printshellcmd": True, "is_handover": False, "shellcmd": "stabilab train"})
    log.info("Select jobs to execute...")
    log.info("Terminating processes on user request, this might take some time.")
    if not exited:
        return
    for jobid, (wildcards, path) in zip((14, 32), runs):
        command = f"stabilab train --run '{{\"seed\": {wildcards['seed']}}}' --out x > {path} 2>&1"
        log.error(f"RuleException:\nCalledProcessError in file \"workflow/rules/train.smk\", line 25:\n"
                  f"Command 'set -euo pipefail;  {command}' returned non-zero exit status 130.",
                  extra={"event": LogEvent.ERROR, "exception": "RuleException"})
        log.error(f"Error in rule train, jobid: {jobid}", extra={
            "event": LogEvent.JOB_ERROR, "rule_name": "train", "rule_msg": None, "jobid": jobid, "input": [],
            "output": ["summary.json"], "log": [path], "conda_env": None, "container_img": None, "aux": {},
            "indent": False, "shellcmd": command})
    log.info("Complete log(s): .snakemake/log/2026-12-07T200229.605989.snakemake.log")
    log.info("Elapsed time: 0:00:12.427459")
    log.error("WorkflowError:\nAt least one job did not complete successfully.",
              extra={"event": LogEvent.ERROR, "exception": "WorkflowError"})


def test_an_interrupt_is_one_line_saying_how_many_runs_stopped_and_how_to_resume(capsys, tmp_path):
    from snakemake.logging import LoggerManager, logger
    from snakemake.settings.enums import Quietness
    from snakemake.settings.types import OutputSettings
    from snakemake_interface_logger_plugins.settings import LogHandlerSettingsBase

    runs = []
    for seed, step in ((0, 120), (1, 130)):
        path = tmp_path / f"L4_lr0.003_s{seed}.log"
        path.write_text(f"step {step} loss 5.1\ninterrupted: checkpoint written at step {step}; "
                        "run the same command again to resume\n")
        runs.append(({**TRAIN, "seed": str(seed)}, str(path)))
    settings = OutputSettings(quiet={Quietness.RULES, Quietness.HOST}, show_failed_logs=True, nocolor=True,
                              log_handler_settings={"stabilab": LogHandlerSettingsBase()})
    manager = LoggerManager(logger, settings)
    try:
        interrupt_events(logger, runs)
    finally:
        manager.stop()
    assert capsys.readouterr().err.splitlines() == [
        "interrupted: 2 runs stopped (checkpoints kept); run the same snakemake command to resume"]


def test_a_second_interrupt_is_the_same_one_line_without_snakemakes_traceback(capsys, tmp_path, monkeypatch):
    """A second Ctrl-C while the jobs stop: Snakemake stops logging, then prints its traceback (a
    KeyboardInterrupt in the executor's shutdown, then 'RuntimeError: Cannot close a running event loop')
    and the jobs' errors as they exit, through Python's last-resort handler."""
    import logging

    from snakemake.logging import LoggerManager, logger
    from snakemake.settings.enums import Quietness
    from snakemake.settings.types import OutputSettings
    from snakemake_interface_logger_plugins.common import LogEvent
    from snakemake_interface_logger_plugins.settings import LogHandlerSettingsBase

    runs = [({**TRAIN, "seed": str(seed)}, str(tmp_path / f"s{seed}.log")) for seed in (0, 1)]
    settings = OutputSettings(quiet={Quietness.RULES, Quietness.HOST}, nocolor=True,
                              log_handler_settings={"stabilab": LogHandlerSettingsBase()})
    monkeypatch.setattr(logging.root, "handlers", [])  # as in snakemake: none above its logger (pytest has its own)
    monkeypatch.setattr(logging.getLogger("snakemake"), "handlers", [])
    manager = LoggerManager(logger, settings)
    interrupt_events(logger, runs, exited=False)
    manager.stop()
    logger.error("Traceback (most recent call last):\n...\nRuntimeError: Cannot close a running event loop",
                 extra={"event": LogEvent.ERROR, "exception": "RuntimeError"})
    logger.error("Error in rule train, jobid: 14", extra={"event": LogEvent.JOB_ERROR, "rule_name": "train"})
    assert capsys.readouterr().err.splitlines() == [
        "interrupted: 2 runs stopped; run the same snakemake command to resume"]


def test_an_interrupt_while_snakemake_plans_is_the_line_not_pythons_traceback(capsys):
    from snakemake.settings.types import OutputSettings

    from snakemake_logger_plugin_stabilab import LogHandler

    seen = []
    sys.excepthook = lambda *exc: seen.append(exc[0])
    LogHandler(OutputSettings(), None)
    try:
        raise KeyboardInterrupt
    except KeyboardInterrupt:
        sys.excepthook(*sys.exc_info())  # as Python does with an exception nothing caught
    assert capsys.readouterr().err.splitlines() == [
        "interrupted: no job was running; run the same snakemake command to resume"]
    sys.excepthook(ValueError, ValueError("x"), None)
    assert seen == [ValueError]  # anything else: the hook it replaced


def test_the_interrupt_line_counts_runs_their_checkpoints_and_other_jobs(tmp_path):
    from snakemake_logger_plugin_stabilab import Interrupt

    kept, lost = tmp_path / "kept.log", tmp_path / "lost.log"
    kept.write_text("interrupted: checkpoint written at step 40; run the same command again to resume\n")
    lost.write_text("interrupted\n")
    one = Interrupt()
    one.stopped("train", [str(kept)])
    assert one.line() == "interrupted: 1 run stopped (checkpoint kept); run the same snakemake command to resume"
    mixed = Interrupt()
    for rule, log in (("train", kept), ("train", lost), ("grok_train", lost), ("tables", tmp_path / "none")):
        mixed.stopped(rule, [str(log)])
    assert mixed.line() == ("interrupted: 3 runs (1 with a checkpoint) and 1 other job stopped; "
                            "run the same snakemake command to resume")
    jobs = Interrupt()
    jobs.stopped("tokenize", [])
    assert jobs.line() == "interrupted: 1 job stopped; run the same snakemake command to resume"
    assert Interrupt().line() == "interrupted: no job was running; run the same snakemake command to resume"


@pytest.mark.parametrize("encoding, separator", [("utf-8", " · "), ("ascii", " | ")])
def test_a_console_that_cannot_show_the_dot_gets_a_bar(encoding, separator, monkeypatch):
    import io

    from snakemake.settings.types import OutputSettings

    from snakemake_logger_plugin_stabilab import LogHandler

    monkeypatch.setattr(sys, "stderr", io.TextIOWrapper(io.BytesIO(), encoding=encoding))
    handler = LogHandler(OutputSettings(), None)
    assert handler.progress.sep == separator


def test_a_missing_file_snakemake_reports_with_a_traceback_is_one_line():
    import logging

    from snakemake_logger_plugin_stabilab import missing_file

    traceback = ('Traceback (most recent call last):\n  File "cli.py", line 2168, in args_to_api\n\n'
                 "FileNotFoundError: [Errno 2] No such file or directory: 'nonexistent.yaml'\n")
    record = logging.LogRecord("snakemake", logging.ERROR, "", 0, traceback, None, None)
    record.event, record.exception = "error", "FileNotFoundError"
    assert missing_file(record) == "error: file not found: nonexistent.yaml (--verbose shows Snakemake's traceback)"
    record.exception = "KeyError"
    assert missing_file(record) is None


@pytest.mark.slow
def test_a_nonexistent_configfile_is_one_line(tmp_path):
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(["snakemake", "-s", str(root / "Snakefile"), "-n", "--configfile", "nonexistent.yaml"],
                          cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 1
    assert "error: file not found: nonexistent.yaml (--verbose shows Snakemake's traceback)" in \
        (proc.stdout + proc.stderr).splitlines()  # a dry run's console is stdout
    assert "Traceback" not in proc.stdout + proc.stderr


@pytest.mark.slow
def test_targets_after_config_are_one_line_saying_where_targets_go(tmp_path):
    """`snakemake --config set=... $(stabilab targets ...)`: Snakemake reads the targets as config
    values and fails with its own traceback before the Snakefile is read."""
    root = Path(__file__).resolve().parents[1]
    target = "results/default/runs/lr/baseline/L2_lr0.01_s0/summary.json"
    proc = subprocess.run(["snakemake", "-s", str(root / "Snakefile"), "-n", "--config", "set=train.steps=20",
                           target], cwd=tmp_path, capture_output=True, text=True)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1 and "Traceback" not in out
    assert (f"error: --config got '{target}', not key=value: targets after --config are read as config values: "
            "put the targets first or end --config with --") in out.splitlines()
    proc = subprocess.run(["snakemake", "-s", str(root / "Snakefile"), "-n", "--config", "train.steps=20"],
                          cwd=tmp_path, capture_output=True, text=True)
    assert "Traceback" not in proc.stdout + proc.stderr
    assert 'a dotted key goes into set, e.g. --config set="train.steps=20"' in proc.stdout + proc.stderr
