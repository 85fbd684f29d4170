"""Stacked runs as pipeline runs (train/stacked_runs.py, `stabilab train-stacked`): every member's
run folder holds what `Trainer.run` of that run alone writes (the records of metrics.jsonl at the
same steps, summary.json, the final weights), in float64 on the CPU; a diverging member is
finished at its own verdict without touching the others."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys

import pytest
import torch

from conftest import Killed, tiny_run
from stabilab.config import RuntimeConfig, load_run_config
from stabilab.train import Trainer
from stabilab.train.checkpoint import WEIGHTS, load_weights
from stabilab.train.stacked_runs import StackedRuns, train_stacked

CPU = RuntimeConfig(device="cpu", compile=False)
# metrics.jsonl values compared relative to 1 + |value|: float64 runs agree to ~1e-12, the values
# Trainer reports in float32 (grad norms, the statistics of RunningStats) to float32's resolution
TOL = 1e-5
VARIES = {"tokens_per_s"}  # timing
SUMMARY_VARIES = {"wall_time_s", "peak_memory_gib"}


pytestmark = pytest.mark.usefixtures("float64_default")  # conftest: float64 tensors, one thread


def config(shards: str, lr: float, seed: int, **sections) -> dict:
    base = {"model": {"n_layer": 2, "n_embd": 32, "n_head": 2, "block_size": 16},
            "optim": {"lr": lr, "warmup_steps": 5},
            "train": {"steps": 24, "batch_size": 4, "grad_accum": 2, "log_every": 4, "metrics_every": 8,
                      "eval_every": 12, "eval_batches": 2, "checkpoint_every": 100}}
    run = tiny_run(shards, seed=seed, **base)
    for name, section in sections.items():
        run[name] = {**run.get(name, {}), **section}
    return run


def records(folder) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in VARIES}
            for line in (folder / "metrics.jsonl").read_text().splitlines()]


def assert_same_records(alone: list[dict], stacked: list[dict]) -> None:
    assert [r["step"] for r in stacked] == [r["step"] for r in alone]
    for a, b in zip(alone, stacked):
        assert set(a) == set(b), (a["step"], set(a) ^ set(b))
        for k, v in a.items():
            w = b[k]
            if isinstance(v, float) and not math.isfinite(v):
                assert not math.isfinite(w), (a["step"], k, v, w)
            elif isinstance(v, (int, float)):
                assert abs(v - w) <= TOL * (1 + abs(v)), (a["step"], k, v, w)
            else:
                assert v == w, (a["step"], k)


def assert_same_summary(alone: dict, stacked: dict, members: int) -> None:
    assert stacked["provenance"].pop("stacked") == members
    for k, v in alone.items():
        if k in SUMMARY_VARIES:
            continue
        w = stacked[k]
        if isinstance(v, float):
            assert abs(v - w) <= TOL * (1 + abs(v)), (k, v, w)
        else:
            assert v == w, (k, v, w)


def test_every_member_folder_is_the_run_trained_alone(tiny_data, tmp_path):
    runs = [config(tiny_data["shards"], lr, seed) for lr, seed in [(1e-2, 0), (3e-3, 1), (2e-2, 2)]]
    alone = []
    for i, run in enumerate(runs):
        alone.append(Trainer(load_run_config(run), tmp_path / f"alone{i}", CPU).run())
    outs = [tmp_path / f"stacked{i}" for i in range(len(runs))]
    summaries = train_stacked([load_run_config(r) for r in runs], outs, CPU)
    for i, out in enumerate(outs):
        assert_same_records(records(tmp_path / f"alone{i}"), records(out))
        assert_same_summary(alone[i], summaries[i], len(runs))
        assert json.loads((out / "summary.json").read_text())["final_val_loss"] == summaries[i]["final_val_loss"]
        assert (out / "config.json").read_text() == (tmp_path / f"alone{i}" / "config.json").read_text()
        mine = load_weights(out / WEIGHTS, "cpu")["model"]
        theirs = load_weights(tmp_path / f"alone{i}" / WEIGHTS, "cpu")["model"]
        assert max((mine[k] - theirs[k]).abs().max().item() for k in theirs) < 1e-10


def test_a_diverging_member_stops_at_its_own_verdict_and_the_others_train_on(tiny_data, tmp_path):
    # LR 1e300 overflows the weights at the first step, alike in both (a merely large LR, e.g. 1e4, is
    # chaotic: the two computations part at the first rounding and diverge at different steps)
    runs = [config(tiny_data["shards"], 1e-2, 0), config(tiny_data["shards"], 1e300, 1)]
    alone = [Trainer(load_run_config(r), tmp_path / f"alone{i}", CPU).run() for i, r in enumerate(runs)]
    assert alone[1]["diverged"] and not alone[0]["diverged"]
    outs = [tmp_path / "s0", tmp_path / "s1"]
    summaries = train_stacked([load_run_config(r) for r in runs], outs, CPU)
    assert summaries[1]["diverged_step"] == alone[1]["diverged_step"]
    for i in range(2):  # the diverging member too: NaN (null) where the run alone's NaN weights give NaN
        assert_same_records(records(tmp_path / f"alone{i}"), records(outs[i]))
        assert_same_summary(alone[i], summaries[i], 2)
    mine = load_weights(outs[1] / WEIGHTS, "cpu")["model"]
    theirs = load_weights(tmp_path / "alone1" / WEIGHTS, "cpu")["model"]
    assert all(torch.equal(mine[k].isnan(), theirs[k].isnan()) for k in theirs)


def test_wandb_is_refused_in_one_line(tiny_data, tmp_path):
    from stabilab.errors import UserError

    runs = [load_run_config(config(tiny_data["shards"], lr, 0)) for lr in (1e-2, 3e-3)]
    with pytest.raises(UserError, match="cannot log to wandb"):
        train_stacked(runs, [tmp_path / "a", tmp_path / "b"], RuntimeConfig(device="cpu", trackers=["wandb"]))


def test_train_stacked_cli_writes_each_folder_and_refuses_a_mismatch_in_one_line(tiny_data, tmp_path):
    files = []
    for i, lr in enumerate([1e-2, 3e-3]):
        f = tmp_path / f"run{i}.json"
        f.write_text(json.dumps(config(tiny_data["shards"], lr, i, train={"steps": 8})))
        files.append(str(f))
    cmd = [sys.executable, "-m", "stabilab.cli", "train-stacked", "--device", "cpu", "--compile", "off"]
    proc = subprocess.run([*cmd, "--runs", *files, "--outs", str(tmp_path / "a"), str(tmp_path / "b")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("done: test/baseline") == 2
    assert all(json.loads((tmp_path / d / "summary.json").read_text())["steps"] == 8 for d in "ab")
    proc = subprocess.run([*cmd, "--runs", *files, "--outs", str(tmp_path / "c")], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and "2 runs but --outs 1" in proc.stderr


def interrupted(cfgs, outs, at: int, how: str) -> None:
    """Train the group until it is about to take step `at + 1`, then stop it: `crash` (the process
    dies: the steps since the last checkpoint are lost) or `sigterm` (preempted: checkpoints are
    written at the step in flight, and it exits 75)."""
    group = StackedRuns(cfgs, outs, CPU)
    original = group.stacked.train_step

    def train_step(measure=False):
        if group.stacked.step == at:
            if how == "crash":
                raise Killed
            # handled between this step and the next; never to the test process's own handler
            assert signal.getsignal(signal.SIGTERM) is not real, "StackedRuns.run installed no SIGTERM handler"
            os.kill(os.getpid(), signal.SIGTERM)
        return original(measure)

    group.stacked.train_step = train_step
    real = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Killed if how == "crash" else SystemExit) as stopped:
        group.run()
    if how == "sigterm":
        assert stopped.value.code == 75


@pytest.mark.parametrize("how", ["crash", "sigterm"])
def test_a_stopped_group_resumes_from_its_checkpoints_and_ends_as_if_never_stopped(tiny_data, tmp_path, how,
                                                                                   capsys):
    runs = [load_run_config(config(tiny_data["shards"], lr, seed, train={"checkpoint_every": 8}))
            for lr, seed in [(1e-2, 0), (3e-3, 1)]]
    whole = [tmp_path / f"whole{i}" for i in range(2)]
    expected = train_stacked(runs, whole, CPU)
    outs = [tmp_path / f"resumed{i}" for i in range(2)]
    interrupted(runs, outs, 13, how)  # crash: back to the checkpoint of step 8; SIGTERM: at step 14
    assert all((out / "ckpt.pt").exists() and not (out / "summary.json").exists() for out in outs)
    capsys.readouterr()
    summaries = train_stacked(runs, outs, CPU)
    # (retraining from step 0 would give the same numbers: the resume must be seen to happen)
    assert f"resumed 2 stacked runs from step {8 if how == 'crash' else 14}" in capsys.readouterr().out
    for i in range(2):
        assert_same_records(records(whole[i]), records(outs[i]))
        uninterrupted = json.loads(json.dumps(expected[i]))
        uninterrupted["provenance"].pop("stacked")
        why = "error (Killed: ) at step 13" if how == "crash" else "preempted (SIGTERM) at step 14"
        assert uninterrupted["resumes"] == [] and summaries[i].pop("resumes") == [
            {"from_step": 8 if how == "crash" else 14, "reason": why}]
        uninterrupted.pop("resumes")
        assert_same_summary(uninterrupted, summaries[i], 2)
        mine, theirs = (load_weights(f[i] / WEIGHTS, "cpu")["model"] for f in (outs, whole))
        assert max((mine[k] - theirs[k]).abs().max().item() for k in theirs) < 1e-10
        assert not (outs[i] / "ckpt.pt").exists()  # finished: the checkpoint is dropped, as a run alone's


def test_a_stacked_members_checkpoint_resumes_as_its_run_alone(tiny_data, tmp_path, capsys):
    """The checkpoint format is the single run's: a member stopped in a group and resumed by
    `Trainer.run` alone ends as the run trained alone from the start."""
    runs = [load_run_config(config(tiny_data["shards"], lr, seed)) for lr, seed in [(1e-2, 0), (3e-3, 1)]]
    alone = Trainer(runs[1], tmp_path / "alone", CPU).run()
    outs = [tmp_path / "g0", tmp_path / "g1"]
    interrupted(runs, outs, 9, "sigterm")
    capsys.readouterr()
    summary = Trainer(runs[1], outs[1], CPU).run()
    assert "resumed from step 10" in capsys.readouterr().out
    assert_same_records(records(tmp_path / "alone"), records(outs[1]))
    summary["provenance"]["stacked"] = 2  # finished alone: assert_same_summary expects the group's mark
    assert summary.pop("resumes") == [{"from_step": 10, "reason": "preempted (SIGTERM) at step 10"}]
    alone.pop("resumes")
    assert_same_summary(alone, summary, 2)
    mine, theirs = (load_weights(f / WEIGHTS, "cpu")["model"] for f in (outs[1], tmp_path / "alone"))
    assert max((mine[k] - theirs[k]).abs().max().item() for k in theirs) < 1e-10


def test_members_whose_checkpoints_differ_in_step_train_one_by_one_and_lose_nothing(tiny_data, tmp_path, capsys):
    """A retried job regrouped (b checkpointed at step 10, c fresh) cannot share a stack: each trains
    alone, b from its own checkpoint (kept, not restarted), and both end as their runs alone."""
    runs = [load_run_config(config(tiny_data["shards"], lr, seed)) for lr, seed in [(1e-2, 0), (3e-3, 1), (2e-2, 2)]]
    alone = [Trainer(runs[i], tmp_path / f"alone{i}", CPU).run() for i in (1, 2)]
    outs = [tmp_path / "a", tmp_path / "b", tmp_path / "c"]
    interrupted(runs[:2], outs[:2], 9, "sigterm")
    capsys.readouterr()
    summaries = train_stacked(runs[1:], outs[1:], CPU)
    printed = capsys.readouterr().out
    assert "training them one by one" in printed and printed.count("resumed from step 10") == 1
    for k, i in enumerate((1, 2)):
        assert_same_records(records(tmp_path / f"alone{i}"), records(outs[i]))
        summaries[k]["provenance"]["stacked"] = 1  # trained alone at the end: no group mark
        resumed = [{"from_step": 10, "reason": "preempted (SIGTERM) at step 10"}] if i == 1 else []
        assert summaries[k].pop("resumes") == resumed and alone[k].pop("resumes") == []
        assert_same_summary(alone[k], summaries[k], 1)
