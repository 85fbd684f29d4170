"""What a dry run says it would train, and the warning before `--config set=...` retrains finished
runs in place."""

from __future__ import annotations

import json
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

from stabilab.config import load_run_config
from stabilab.dryrun import DryRun
from stabilab.experiment import config_changes, load_experiment, retrain_warning, run_config, runs, shards_dir

ROOT = Path(__file__).resolve().parents[1]


def finish(cfg: dict, run, folder: Path) -> None:
    """A run folder as the trainer leaves it: config.json (vocabulary filled in) and summary.json."""
    folder.mkdir(parents=True, exist_ok=True)
    written = load_run_config(run_config(cfg, run, shards_dir(cfg))).with_vocab(2048).to_dict()
    (folder / "config.json").write_text(json.dumps(written, indent=2) + "\n")
    (folder / "summary.json").write_text("{}\n")


def test_config_changes_name_each_changed_key_with_its_values():
    cfg = load_experiment(ROOT / "config.yaml")
    run = runs(cfg)[0]
    old = json.loads(json.dumps(load_run_config(run_config(cfg, run, "s")).with_vocab(2048).to_dict()))
    assert config_changes(old, run_config(cfg, run, "s")) == []  # the vocabulary comes from the shards
    tried = load_experiment(ROOT / "config.yaml", {"set": "train.steps=20 optim.grad_clip=null model.norm=rmsnorm"})
    assert config_changes(old, run_config(tried, run, "s")) == [
        "model.norm: layernorm -> rmsnorm", "optim.grad_clip: 1 -> null", "train.steps: 150 -> 20"]


def job_info(folder: Path, wildcards: dict, run: dict | None, reason: str = "Updated input files: meta.json") -> dict:
    shellcmd = f"stabilab train --run {shlex.quote(json.dumps(run))} --out {folder}" if run else "stabilab grok-train"
    return {"rule_name": "train" if run else "grok_train", "wildcards": wildcards,
            "output": [str(folder / "summary.json")], "reason": reason, "shellcmd": shellcmd}


def test_a_dry_run_counts_runs_per_study_and_names_the_changed_keys(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_experiment(ROOT / "config.yaml")
    tried = load_experiment(ROOT / "config.yaml", {"set": "train.steps=20"})  # the spikes study keeps its 260
    plan = DryRun()
    res = Path("results/default")
    for run in runs(cfg):
        if (run.study, run.variant) != ("spikes", "spam"):  # never trained: new
            finish(cfg, run, res / run.path)
    for run in runs(tried):
        if run.study in ("spikes", "depth") or (run.study, run.variant) == ("variants", "baseline"):
            wildcards = {"study": run.study, "variant": run.variant, "depth": run.depth, "lr": f"{run.lr:g}",
                         "seed": run.seed}
            plan.observe(job_info(res / run.path, wildcards, run_config(tried, run, shards_dir(tried))))
    for variant in ("stablemax", "perpgrad"):
        plan.observe(job_info(res / "grokking" / "add" / variant / "s0",
                              {"operation": "add", "variant": variant, "seed": 0}, None))
    plan.observe({"rule_name": "tokenize", "wildcards": {}, "output": ["meta.json"], "reason": "x"})
    lines = plan.lines()
    assert lines[:7] == [
        "Would train 18 runs:",
        "  depth    12  (config changed)",
        "  spikes    3  (2 input updated, 1 new)",
        "  variants  1  (config changed)",
        "  grokking  2  (new)",
        "Changed since the run folders' config.json:",
        "  train.steps: 150 -> 20  (13 runs: depth, variants)",
    ]
    # what those runs cost, as check-config says it: 20 steps x 16 x 64 tokens (spikes: its own 260)
    assert lines[7] == "Cost of these runs:"
    assert [line.split()[:5] for line in lines[8:12]] == [
        ["depth", "12", "runs", "246k", "tokens"], ["spikes", "3", "runs", "799k", "tokens"],
        ["variants", "1", "runs", "20.5k", "tokens"], ["total", "16", "runs", "1.06M", "tokens"]]
    assert lines[12].startswith("  time: roughly") and "measured for 'default'" in lines[12]  # results/default
    assert len(lines) == 13
    same = DryRun()  # the same config, retrained for another reason: Snakemake's, in a word
    run = runs(cfg)[0]
    same.observe(job_info(res / run.path, {"study": run.study, "variant": run.variant, "depth": run.depth,
                                           "lr": f"{run.lr:g}", "seed": run.seed},
                          run_config(cfg, run, shards_dir(cfg)), reason="Code has changed since last execution"))
    assert same.lines()[:3] == ["Would train 1 run:", "  depth 1  (code changed)", "Cost of these runs:"]


def test_set_that_changes_finished_runs_warns_in_one_line_naming_the_override_that_keeps_them(
        tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_experiment(ROOT / "config.yaml")
    for run in runs(cfg)[:5]:
        finish(cfg, run, Path("results/default") / run.path)
    tried = load_experiment(ROOT / "config.yaml", {"set": "train.steps=20"})
    assert retrain_warning(tried, runs(tried), shards_dir(tried), "train.steps=20") == (
        "warning: set=train.steps=20 changes train.steps of 5 finished runs of 'default': they will be retrained "
        'in place; to keep them, name the try: --config set="train.steps=20 name=mytry"')
    renamed = load_experiment(ROOT / "config.yaml", {"set": "train.steps=20 name=mytry"})
    assert retrain_warning(renamed, runs(renamed), shards_dir(renamed), "train.steps=20 name=mytry") is None
    assert retrain_warning(cfg, runs(cfg), shards_dir(cfg), "runtime.device=cpu") is None  # no run changes


@pytest.mark.slow
def test_snakemake_n_prints_the_plan_and_the_warning(tmp_path):
    """The default profile's dry run (the logger plugin) on the default config with finished runs."""
    cfg = load_experiment(ROOT / "config.yaml")
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(yaml.safe_load((ROOT / "config.yaml").read_text())))
    for run in runs(cfg):
        if run.study == "depth":
            finish(cfg, run, tmp_path / "results" / "default" / run.path)
    proc = subprocess.run(["snakemake", "-s", str(ROOT / "Snakefile"), "-n", "--config", "set=train.steps=20"],
                          cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = (proc.stdout + proc.stderr).splitlines()
    assert ("warning: set=train.steps=20 changes train.steps of 12 finished runs of 'default': they will be "
            'retrained in place; to keep them, name the try: --config set="train.steps=20 name=mytry"') in out
    plan = out[out.index("Would train 40 runs:"):]
    assert plan[1:6] == ["  depth    12  (config changed)", "  lr       15  (new)", "  spikes    3  (new)",
                         "  variants  6  (new)", "  grokking  4  (new)"]
    assert plan[6:9] == ["Changed since the run folders' config.json:", "  train.steps: 150 -> 20  (12 runs: depth)",
                         "Cost of these runs:"]  # check-config's lines for the 40 runs that would train
    assert plan[9].split()[:5] == ["depth", "12", "runs", "246k", "tokens"]
    assert any(line.startswith("  total      36 runs") for line in plan)
    end = plan.index("This was a dry-run (flag -n). The order of jobs does not reflect the order of execution.")
    assert plan[end - 1].startswith("  time: roughly")  # the cost's last line, then Snakemake's
    assert not any(line.startswith("Reasons:") for line in out)  # it pointed at job blocks the profile hides
