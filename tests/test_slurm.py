"""A workflow run through a real SLURM cluster: a single node on localhost.

The module fixture runs tests/slurm/start_slurm.sh (as root; it installs
Debian's slurmctld/slurmd/slurm-client/munge if they are missing, writes the
config and starts the daemons) and stops the daemons afterwards.  The test is
skipped, with the reason, where that is impossible: not root, no apt, no
package registry, daemons that won't start.  Set STABILAB_REQUIRE_SLURM=1 to
make that a failure instead of a skip.

`run_snakemake_on_slurm` is the part that knows how to drive Snakemake's SLURM
executor against that cluster; the test feeds it a tiny three-rule workflow
(make -> train [gpu=1] -> collect) whose jobs record $SLURM_JOB_ID, then
re-runs one rule with --forcerun.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SLURM_SCRIPTS = REPO / "tests" / "slurm"

# What the localhost cluster needs on top of any profile:
#  - squeue for job states: sacct exists but the cluster has no accounting
#    database, and with sacct the executor waits forever;
#  - a short first status check (the default is 40 s; the next checks come
#    10 s, 20 s, ... later until a job finishes);
#  - the cluster's only partition, and resources that fit a 2-CPU node.
SLURM_ARGS = [
    "--executor", "slurm",
    "--slurm-status-command", "squeue",
    "--slurm-init-seconds-before-status-checks", "2",
    "--slurm-keep-successful-logs",
    "--latency-wait", "10",
    "--nocolor",
]
DEFAULT_RESOURCES = ["slurm_partition=debug", "mem_mb=200", "runtime=10"]

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
    the profile's whole set-resources (so repeat gpu=1).  Tried that way, the real
    pipeline ran corpus -> tokenizer -> tokenize -> train for one run target.
    """
    # targets first: several options (--default-resources, --forcerun, ...) take
    # any number of values and would swallow targets that follow them
    cmd = [
        sys.executable, "-m", "snakemake",
        *targets,
        "--snakefile", str(snakefile),
        "--directory", str(workdir),
        "--jobs", str(jobs),
        *SLURM_ARGS,
        "--default-resources", *DEFAULT_RESOURCES,
        *extra_args,
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


@pytest.fixture(scope="module")
def slurm_cluster():
    """A single-node SLURM cluster on localhost, stopped again by its last user.

    Test sessions running at once on one machine share the cluster: each holds a
    shared lock on /run/slurm-test/users.lock while it uses it, and only the one
    that can then take the lock exclusively (the last) stops the daemons."""
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
                ["bash", str(SLURM_SCRIPTS / "start_slurm.sh")], capture_output=True, text=True, timeout=900
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


