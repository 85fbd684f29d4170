"""The trainer: outputs, exact resume, divergence as data."""

from __future__ import annotations

import json
import math

import pytest

from conftest import tiny_run
from stabilab.config import load_run_config
from stabilab.train import Trainer

TIMING = {"tokens_per_s"}


def records(folder) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING}
            for line in (folder / "metrics.jsonl").read_text().splitlines()]


def test_outputs_and_summary(tiny_data, tmp_path):
    summary = Trainer(load_run_config(tiny_run(tiny_data["shards"])), tmp_path).run()
    assert {p.name for p in tmp_path.iterdir()} == {"config.json", "metrics.jsonl", "summary.json"}
    recs = records(tmp_path)
    assert recs[0]["step"] == 1 and recs[-1]["step"] == 40
    assert {"train_loss", "lr", "grad_norm", "tokens"} <= set(recs[0])
    assert [r["step"] for r in recs if "val_loss" in r] == [20, 40]
    assert recs[-1]["train_loss"] < recs[0]["train_loss"] - 1.0
    assert summary["final_val_loss"] == recs[-1]["val_loss"]
    assert summary["final_val_ppl"] == pytest.approx(math.exp(summary["final_val_loss"]))
    assert not summary["diverged"] and summary["params"] > 0
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model"]["vocab_size"] == 300 and saved["optim"]["lr"] == 1e-2


@pytest.mark.parametrize("variant", [{}, {"optim": {"name": "spam", "spam": {"reset_interval": 15}}},
                                     {"optim": {"perpgrad": True}}], ids=["adamw", "spam", "perpgrad"])
def test_resume_equals_uninterrupted_run(tiny_data, tmp_path, variant):
    run = tiny_run(tiny_data["shards"], **variant)
    Trainer(load_run_config(run), tmp_path / "full").run()

    class Killed(Exception):
        pass

    first = Trainer(load_run_config(run), tmp_path / "resumed")
    original = first.train_step

    def die_at_step_25(measure):
        if first.step == 25:  # after the checkpoint at step 20: steps 21-25 are lost work
            raise Killed
        return original(measure)

    first.train_step = die_at_step_25
    with pytest.raises(Killed):
        first.run()
    assert not (tmp_path / "resumed" / "summary.json").exists()  # unfinished runs never look finished
    Trainer(load_run_config(run), tmp_path / "resumed").run()
    assert records(tmp_path / "resumed") == records(tmp_path / "full")


def test_changed_config_starts_afresh(tiny_data, tmp_path):
    Trainer(load_run_config(tiny_run(tiny_data["shards"], train={"steps": 10})), tmp_path).run()
    Trainer(load_run_config(tiny_run(tiny_data["shards"], train={"steps": 15})), tmp_path).run()
    assert [r["step"] for r in records(tmp_path)] == [1, 5, 10, 15]


def test_absurd_learning_rate_is_recorded_as_divergence(tiny_data, tmp_path):
    run = tiny_run(tiny_data["shards"], optim={"lr": 1e3, "warmup_steps": 1, "grad_clip": None},
                   train={"steps": 200, "divergence": {"margin": 1.0, "patience": 10}})
    summary = Trainer(load_run_config(run), tmp_path).run()
    assert summary["diverged"] and summary["diverged_step"] < 200
    assert summary["final_val_loss"] is None
    assert records(tmp_path)[-1]["step"] == summary["diverged_step"]
