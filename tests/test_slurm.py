"""A workflow run through a real SLURM cluster: a single node on localhost.

The module fixture runs tests/slurm/start_slurm.sh (as root; it installs
Debian's slurmctld/slurmd/slurm-client/munge if they are missing, writes the
config and starts the daemons) and stops the daemons afterwards.  The test is
skipped, with the reason, where that is impossible: not root, no apt, no
package registry, daemons that won't start.  Set STABILAB_REQUIRE_SLURM=1 to
make that a failure instead of a skip.

It installs system packages and starts daemons, so it is opt-in: it runs only
with STABILAB_SLURM_TEST=1 (which `.ci/run` sets; CI always runs it).

`run_snakemake_on_slurm` is the part that knows how to drive Snakemake's SLURM
executor against that cluster.  The test runs the project's real Snakefile with
its SLURM profile on a tiny experiment config (a depth-study run of 10 steps, and
a data-parallel run of 2 processes, grokking off): corpus -> tokenizer -> tokenize
-> train [gpu=1] and train [gpu=2, torchrun, gloo on the CPU] -> tables -> figures,
each a SLURM job; then it retrains the first run with --forcerun train.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from conftest import make_documents, write_text_files
from stabilab.experiment import runs
from stabilab.studies import expected_figures

REPO = Path(__file__).resolve().parents[1]
SLURM_SCRIPTS = REPO / "tests" / "slurm"

# What the localhost cluster needs on top of any profile:
#  - squeue for job states: sacct exists but the cluster has no accounting
#    database, and with sacct the executor waits forever;
#  - a short first status check (the default is 40 s; the next checks come
#    10 s, 20 s, ... later until a job finishes): a job of the real pipeline
#    takes 10-15 s here (Snakemake starts twice inside it), so checks 4 s and
#    18 s after a submission catch each job at the second one;
#  - the cluster's only partition, and resources that fit a 2-CPU node.
SLURM_ARGS = [
    "--executor", "slurm",
    "--slurm-status-command", "squeue",
    "--slurm-init-seconds-before-status-checks", "4",
    "--slurm-keep-successful-logs",
    "--latency-wait", "10",
    "--nocolor",
]
DEFAULT_RESOURCES = ["slurm_partition=debug", "mem_mb=200", "runtime=10"]
GPUS = 2  # placeholder GPUs on the node: a data-parallel run of 2 processes asks for 2

USERS_LOCK = Path("/run/slurm-test/users.lock")

# the plugin's log line; rules with wildcards log to rule_<name>/<wildcards>/<id>.log
SUBMITTED = re.compile(
    r"Job \d+ has been submitted with SLURM jobid (\d+) \(log: \S*/rule_(\w+)/(?:\S+/)?\1\.log\)"
)


def _slurm_env() -> dict:
    """This process's environment minus any enclosing SLURM job, with this Python's
    bin directory first on PATH (jobs get the submitter's environment: --export=ALL)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", ""), "/usr/sbin", "/sbin"])
    return env


def _cancel_run(log: str) -> None:
    """Cancel the SLURM jobs of the Snakemake run whose log this is (job name = run ID)."""
    match = re.search(r"SLURM run ID: (\S+)", log)
    if match:
        subprocess.run(["scancel", "--name", match.group(1)], capture_output=True)


def run_snakemake_on_slurm(workdir, snakefile, targets, extra_args=(), *, jobs=2, timeout=300):
    """Run `snakemake` on `targets` in `workdir` through the localhost SLURM cluster.

    Returns the CompletedProcess (stdout holds the whole log); fails the test with
    the log's tail if Snakemake exits non-zero or runs past `timeout` seconds (then
    it is killed and its SLURM jobs cancelled: on SIGTERM Snakemake only "waits
    for running jobs", which is forever when it cannot see their state).

    `extra_args` come last and may override the defaults here, e.g.
    ["--workflow-profile", "workflow/profiles/slurm", "--forcerun", "train"].
    The --default-resources here replace a profile's (partition debug, small
    memory).  With the project's SLURM profile on this 2-CPU node also pass
    `--set-threads train=1 --set-resources train:gpu=1 train:mem_mb=2000`: its train
    job asks for 4 CPUs and 32 GB, and --set-resources on the command line replaces
    the profile's whole set-resources (so repeat gpu=1); the test does that.
    """
    # targets after `--`: several options (--default-resources, --forcerun, ...)
    # take any number of values and would swallow targets that follow them
    cmd = [
        sys.executable, "-m", "snakemake",
        "--snakefile", str(snakefile),
        "--directory", str(workdir),
        "--jobs", str(jobs),
        *SLURM_ARGS,
        "--default-resources", *DEFAULT_RESOURCES,
        *extra_args,
        "--", *targets,
    ]
    try:
        proc = subprocess.run(
            cmd, cwd=workdir, env=_slurm_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, timeout=timeout,
        )
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout or ""
        out = out.decode(errors="replace") if isinstance(out, bytes) else out
        _cancel_run(out)
        pytest.fail(f"snakemake on SLURM ran past {timeout}s: {' '.join(cmd)}\n{out[-4000:]}")
    if proc.returncode != 0:
        queue = subprocess.run(["squeue", "--states=all", "-o", "%i %j %T %r"], capture_output=True, text=True)
        pytest.fail(
            f"snakemake on SLURM exited {proc.returncode}: {' '.join(cmd)}\n{proc.stdout[-6000:]}\n"
            f"squeue:\n{queue.stdout}{queue.stderr}"
        )
    return proc


def submitted_jobs(log: str) -> dict[str, list[str]]:
    """{rule: [SLURM job ids]} for the jobs that a Snakemake log says it submitted."""
    jobs: dict[str, list[str]] = {}
    for jobid, rule in SUBMITTED.findall(log):
        jobs.setdefault(rule, []).append(jobid)
    return jobs


def _skip_or_fail(reason: str):
    if os.environ.get("STABILAB_REQUIRE_SLURM") == "1":
        pytest.fail(f"STABILAB_REQUIRE_SLURM=1 but {reason}")
    pytest.skip(reason)


pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def slurm_cluster():
    """A single-node SLURM cluster on localhost, stopped again by its last user.

    Test sessions running at once on one machine share the cluster: each holds a
    shared lock on /run/slurm-test/users.lock while it uses it, and only the one
    that can then take the lock exclusively (the last) stops the daemons."""
    if os.environ.get("STABILAB_SLURM_TEST") != "1" and os.environ.get("STABILAB_REQUIRE_SLURM") != "1":
        pytest.skip("installs SLURM from Debian's packages: opt-in with STABILAB_SLURM_TEST=1 (CI sets it)")
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        _skip_or_fail("needs root to install and start a localhost SLURM cluster (tests/slurm/start_slurm.sh)")
    if shutil.which("bash") is None:
        _skip_or_fail("needs bash for tests/slurm/start_slurm.sh")
    try:
        import snakemake_executor_plugin_slurm  # noqa: F401
    except ImportError:
        _skip_or_fail("snakemake-executor-plugin-slurm is not installed")
    import fcntl

    USERS_LOCK.parent.mkdir(parents=True, exist_ok=True)
    users = open(USERS_LOCK, "a")
    fcntl.flock(users, fcntl.LOCK_SH)
    try:
        try:
            proc = subprocess.run(
                ["bash", str(SLURM_SCRIPTS / "start_slurm.sh")], capture_output=True, text=True, timeout=900,
                env=dict(os.environ, SLURM_TEST_GPUS=str(GPUS)),
            )
        except subprocess.TimeoutExpired:
            _skip_or_fail("tests/slurm/start_slurm.sh ran past 900 s (package install hanging?)")
        if proc.returncode != 0:
            lines = (proc.stderr or proc.stdout).strip().splitlines()
            _skip_or_fail(f"cannot start a localhost SLURM cluster: {lines[-1] if lines else 'no output'}")
        yield proc.stdout.strip()
    finally:
        try:
            fcntl.flock(users, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            pass  # another session still uses the cluster: leave it running
        else:
            subprocess.run(
                ["bash", str(SLURM_SCRIPTS / "stop_slurm.sh")], capture_output=True, text=True, timeout=120
            )
        users.close()


def tiny_experiment(text_dir: Path) -> dict:
    """config.yaml shrunk to two tiny training runs (as tests/test_pipeline.py does), grokking off: one
    run of one process, and one data-parallel run of 2 processes (train.processes; the same global batch
    of 2 micro-batches), which the train rule launches with torchrun and gives 2 GPUs on one node."""
    cfg = copy.deepcopy(yaml.safe_load((REPO / "config.yaml").read_text()))
    cfg["name"] = "tiny"
    cfg["data"] = {"source": "text", "paths": [str(text_dir)], "val_fraction": 0.2}
    cfg["tokenizer"] = {"kind": "bpe", "vocab_size": 300}
    cfg["model"] = {"block_size": 32, "n_head": 2, "n_embd": 32}
    cfg["train"] = {"steps": 10, "batch_size": 4, "eval_every": 10, "eval_batches": 1, "log_every": 5,
                    "metrics_every": 5}
    cfg["studies"] = {
        "depth": {"kind": "depth", "variants": ["baseline"], "depths": [1], "lrs": [1e-2], "seeds": [0]},
        "ddp": {"kind": "compare", "variants": ["baseline"], "depths": [1], "lrs": [1e-2], "seeds": [0],
                "overrides": {"train": {"processes": 2, "grad_accum": 2}}},
    }
    cfg["grokking"] = {"variants": []}  # an empty list switches the grokking study off
    return cfg


def pipeline_args(configfile: Path) -> list[str]:
    """The project's SLURM profile, with the experiment config `configfile`, fitted to the
    2-CPU localhost node: the profile's train job (4 CPUs, 32 GB) would never start there.
    --set-resources replaces the profile's whole set-resources; the GPUs are the train rule's
    own resource (gpu = train.processes), so they stay."""
    return [
        "--workflow-profile", str(REPO / "workflow" / "profiles" / "slurm"),
        "--configfile", str(configfile),  # replaces the repository's config.yaml (see the Snakefile)
        "--set-threads", "train=1",
        "--set-resources", "train:mem_mb=2000",
    ]


DATA_RULES = ["corpus", "tokenizer", "tokenize"]
ALL_RULES = sorted(DATA_RULES + ["train", "tables", "figures"])


def _scontrol_job(jobid: str) -> str:
    return subprocess.run(["scontrol", "show", "job", jobid], capture_output=True, text=True).stdout


def _check_slurm_job(workdir: Path, rule: str, jobid: str) -> str:
    """The job ran and finished in SLURM, on the debug partition, and left its SLURM log."""
    info = _scontrol_job(jobid)
    assert "JobState=COMPLETED" in info, f"{rule}: SLURM job {jobid}\n{info}"
    assert "Partition=debug" in info, info
    assert f"JobId={jobid} " in info, info
    logs = list((workdir / ".snakemake" / "slurm_logs" / f"rule_{rule}").rglob(f"{jobid}.log"))
    assert len(logs) == 1, f"no SLURM log of {rule} job {jobid}"
    return info


def _gpus(info: str) -> int:
    """The GPUs a job was given, from `scontrol show job` (gres:gpu:N or gres/gpu=N), 0 for none."""
    match = re.search(r"gres[:/]gpu[:=](\d+)", info)
    return int(match.group(1)) if match else 0


def test_pipeline_runs_through_slurm_and_forcerun_retrains_one_run(slurm_cluster, tmp_path):
    env_path = _slurm_env()["PATH"]
    assert shutil.which("stabilab", path=env_path), f"the rules call `stabilab`, not on the jobs' PATH {env_path}"
    assert shutil.which("torchrun", path=env_path), f"a data-parallel run calls `torchrun`, not on {env_path}"
    write_text_files(tmp_path / "text", make_documents(12, 300))
    cfg = tiny_experiment(tmp_path / "text")
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    args = pipeline_args(tmp_path / "config.yaml")
    snakefile = REPO / "Snakefile"
    run, ddp = runs(cfg)
    res = tmp_path / "results" / "tiny"
    summary = res / run.path / "summary.json"

    # the whole pipeline (default target: tables and figures), every rule a SLURM job
    first = run_snakemake_on_slurm(tmp_path, snakefile, [], args, timeout=300)
    jobs = submitted_jobs(first.stdout)
    assert sorted(jobs) == ALL_RULES, first.stdout[-3000:]
    assert {rule: len(ids) for rule, ids in jobs.items()} == {rule: 2 if rule == "train" else 1 for rule in ALL_RULES}
    infos = {jobid: _check_slurm_job(tmp_path, rule, jobid) for rule, ids in jobs.items() for jobid in ids}
    ids = {rule: ids[0] for rule, ids in jobs.items()}
    # each train job got the (placeholder) GPUs its run asks for: 1, and 2 on one node for the
    # 2-process run; the other rules none
    assert sorted(_gpus(infos[jobid]) for jobid in jobs["train"]) == [1, 2], [infos[j] for j in jobs["train"]]
    ddp_job = next(jobid for jobid in jobs["train"] if _gpus(infos[jobid]) == 2)
    assert "NumNodes=1 " in infos[ddp_job], infos[ddp_job]
    for rule in DATA_RULES + ["tables", "figures"]:
        assert _gpus(infos[ids[rule]]) == 0, infos[ids[rule]]
    # the data-parallel run trained in 2 processes (torchrun; gloo on this CPU node), in the 2-GPU job
    assert "ddp" in str(next((tmp_path / ".snakemake" / "slurm_logs" / "rule_train").rglob(f"{ddp_job}.log")))
    ddp_summary = json.loads((res / ddp.path / "summary.json").read_text())
    assert ddp_summary["processes"] == 2 and ddp_summary["steps"] == 10
    assert ddp_summary["tokens"] == 10 * 2 * 4 * 32  # the global batch: 2 micro-batches of 4 x 32 tokens
    assert json.loads((res / run.path / "summary.json").read_text())["processes"] == 1

    runs_csv = pd.read_csv(res / "tables" / "runs.csv")
    assert len(runs_csv) == 2, runs_csv
    assert sorted(zip(runs_csv.study, runs_csv.variant, runs_csv.depth, runs_csv.seed)) == [
        ("ddp", "baseline", 1, 0), ("depth", "baseline", 1, 0)]
    figures = tmp_path / "figures" / "tiny"
    for png in expected_figures(cfg["studies"]):
        assert png.startswith(("depth/", "ddp/"))
        assert (figures / png).stat().st_size > 0, png
        assert (figures / png).with_suffix(".pdf").exists(), png
    assert not (res / "grokking").exists()

    # re-run one training rule: only train, as a new SLURM job; its summary is rewritten
    data_outputs = [res / "data" / "corpus" / "train.jsonl.gz", res / "data" / "tokenizer.json",
                    res / "data" / "shards" / "meta.json"]
    kept = {path: path.stat().st_mtime_ns for path in data_outputs + [res / "tables" / "runs.csv"]}
    summary_before = summary.stat().st_mtime_ns
    target = str(summary.relative_to(tmp_path))
    second = run_snakemake_on_slurm(tmp_path, snakefile, [target], args + ["--forcerun", "train"],
                                    timeout=150)
    jobs2 = submitted_jobs(second.stdout)
    assert sorted(jobs2) == ["train"], second.stdout[-3000:]  # corpus, tokenizer, tokenize not re-run
    (train2,) = jobs2["train"]
    assert int(train2) > max(map(int, jobs["train"]))
    info2 = _check_slurm_job(tmp_path, "train", train2)
    assert _gpus(info2) == 1, info2
    assert summary.stat().st_mtime_ns != summary_before
    assert json.loads(summary.read_text())["steps"] == 10  # a complete summary again
    # trained afresh (a finished run keeps no checkpoint to resume from)
    assert "resumed from" not in (res / "logs" / f"{run.path}.log").read_text()
    assert {path: path.stat().st_mtime_ns for path in kept} == kept
