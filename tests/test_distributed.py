"""Data-parallel training (torchrun, gloo on CPU) and preemption (SIGTERM -> checkpoint -> resume)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import tiny_run
from stabilab.train import PREEMPTED_EXIT_CODE

TIMING = {"tokens_per_s"}


def records(folder) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING}
            for line in (folder / "metrics.jsonl").read_text().splitlines()]


def train_cmd(run_file, out) -> list[str]:
    return [sys.executable, "-m", "stabilab.cli", "train", "--run", str(run_file), "--out", str(out), "--threads", "1"]


@pytest.mark.slow
def test_two_process_ddp_matches_one_process(tiny_data, tmp_path):
    """Same global batch (2 micro-batches per step): one process accumulates both, two processes
    take one each and all-reduce. Losses agree to float32 summation-order noise (rel 1e-4)."""
    run = tiny_run(tiny_data["shards"], train={"steps": 20, "grad_accum": 2, "processes": 2,
                                               "eval_every": 10, "metrics_every": 10})
    (tmp_path / "run.json").write_text(json.dumps(run))
    single = subprocess.run(train_cmd(tmp_path / "run.json", tmp_path / "single"), capture_output=True, text=True)
    assert single.returncode == 0, single.stderr
    env = dict(os.environ, OMP_NUM_THREADS="1")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                "-m", "stabilab.cli", "--", "train", "--run", str(tmp_path / "run.json"),
                "--out", str(tmp_path / "ddp"),
                "--threads", "1"]
    ddp = subprocess.run(torchrun, capture_output=True, text=True, env=env, timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    one, two = records(tmp_path / "single"), records(tmp_path / "ddp")
    assert [r["step"] for r in one] == [r["step"] for r in two]
    for a, b in zip(one, two):
        for key in ("train_loss", "grad_norm", "val_loss"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-4), (a["step"], key)
    summary = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["tokens"] == 20 * 2 * 8 * 32


@pytest.mark.slow
def test_sigterm_checkpoints_and_resume_matches(tiny_data, tmp_path):
    run = tiny_run(tiny_data["shards"], train={"steps": 300, "log_every": 1, "eval_every": 100,
                                               "metrics_every": 50, "checkpoint_every": 1000})
    (tmp_path / "run.json").write_text(json.dumps(run))
    full = subprocess.run(train_cmd(tmp_path / "run.json", tmp_path / "full"), capture_output=True, text=True)
    assert full.returncode == 0, full.stderr

    out = tmp_path / "preempted"
    proc = subprocess.Popen(train_cmd(tmp_path / "run.json", out), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 120
    while time.time() < deadline:  # wait until training is under way, then preempt it
        log = out / "metrics.jsonl"
        if log.exists() and len(log.read_text().splitlines()) >= 30:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == PREEMPTED_EXIT_CODE, stderr
    assert "checkpoint written" in stdout
    assert (out / "ckpt.pt").exists() and not (out / "summary.json").exists()
    import torch

    from stabilab.train.checkpoint import Checkpointer

    state = Checkpointer(out, torch.device("cpu")).load()  # hash-checked, then torch.load(weights_only=True)
    assert 30 <= state["step"] < 300

    again = subprocess.run(train_cmd(tmp_path / "run.json", out), capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    assert f"resumed from step {state['step']}" in again.stdout
    assert records(out) == records(tmp_path / "full")
