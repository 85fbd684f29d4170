"""The whole Snakemake pipeline on a tiny config in a temporary directory."""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest
import yaml

from conftest import make_documents, write_text_files
from stabilab.experiment import runs
from stabilab.studies import expected_figures

ROOT = Path(__file__).resolve().parents[1]


def tiny_experiment(text_dir: Path) -> dict:
    cfg = yaml.safe_load((ROOT / "config.yaml").read_text())
    cfg = copy.deepcopy(cfg)
    cfg["name"] = "tiny"
    cfg["data"] = {"source": "text", "paths": [str(text_dir)], "val_fraction": 0.2}
    cfg["tokenizer"] = {"kind": "bpe", "vocab_size": 300}
    cfg["model"] = {"block_size": 32, "n_head": 2, "n_embd": 32}
    cfg["train"] = {"steps": 20, "batch_size": 4, "eval_every": 10, "eval_batches": 1, "log_every": 5,
                    "metrics_every": 5, "divergence": {"margin": 1.0, "patience": 5}}
    cfg["studies"] = {
        "depth": {"kind": "depth", "variants": ["baseline", "mlra"], "depths": [1, 2], "lrs": [1e-2], "seeds": [0, 1]},
        # lr 1e3 without clipping diverges: it must be recorded, not crash the pipeline
        "lr": {"kind": "lr", "variants": ["baseline", "oec_center+zloss"], "depths": [1], "lrs": [1e-2, 1e3],
               "overrides": {"optim": {"grad_clip": None}}},
        "spikes": {"kind": "spikes", "variants": ["adamw_noclip", "spam"], "depths": [1], "lrs": [1e-2],
                   "overrides": {"train": {"spike_scores": True}}},
    }
    cfg["grokking"] = {"modulus": 23, "epochs": 20, "eval_every": 10}  # all four variants, briefly
    return cfg


@pytest.mark.slow
def test_pipeline_end_to_end(tmp_path):
    write_text_files(tmp_path / "text", make_documents(12, 300))
    cfg = tiny_experiment(tmp_path / "text")
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    cmd = ["snakemake", "-s", str(ROOT / "Snakefile"), "--directory", str(tmp_path), "--cores", "2"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "best final validation loss per variant" in proc.stdout + proc.stderr  # the end-of-run summary
    # the stabilab logger plugin (default profile): one line per finished job with the pipeline's ETA
    progress = [line for line in proc.stderr.splitlines() if re.match(r"\[\d+/\d+\] ", line)]
    assert re.fullmatch(r"\[1/(\d+)\] \S+.* done \(\d+s\) · elapsed \d+s · ETA ~\S+.*", progress[0]), progress[0]
    total = int(progress[0].split("/")[1].split("]")[0])
    assert len(progress) == total == 25  # 14 + 4 runs, corpus, tokenizer, tokenize, tables, figures, report, all
    assert any(" train depth/mlra/L2_lr0.01_s0 done (" in line for line in progress)
    assert progress[-1].startswith(f"[{total}/{total}] pipeline done · elapsed ")
    assert "steps (" not in proc.stderr and "Select jobs to execute" not in proc.stderr

    tables = tmp_path / "results" / "tiny" / "tables"
    runs_csv = pd.read_csv(tables / "runs.csv")
    expected = runs(cfg)
    assert len(runs_csv) == len(expected) == 8 + 4 + 2
    assert set(zip(runs_csv.study, runs_csv.variant, runs_csv.depth, runs_csv.seed)) == \
        {(r.study, r.variant, r.depth, r.seed) for r in expected}
    steps = pd.read_csv(tables / "steps.csv")
    assert len(steps) > len(expected) and steps["train_loss"].notna().any()
    diverged = runs_csv[runs_csv.diverged]
    assert set(diverged.lr) == {1e3} and len(diverged) == 2  # both variants at the absurd LR
    assert runs_csv[~runs_csv.diverged].final_val_loss.notna().all()

    summary = pd.read_csv(tables / "summary_depth.csv")
    ppl = summary[(summary.metric == "final_val_ppl")]
    assert len(ppl) == 4 and (ppl["n"] == 2).all() and ppl["ci95"].notna().all()  # two seeds: a CI
    sens = pd.read_csv(tables / "summary_lr.csv").query("metric == 'lr_sensitivity'")
    assert set(sens.variant) == {"baseline", "oec_center+zloss"} and (sens["mean"] > 0).all()
    assert (tables / "summary_spikes.csv").exists() and (tables / "headline.csv").exists()
    norms = pd.read_csv(tables / "grad_norms.csv")  # every step's grad norm, for the spike study only
    assert set(norms.study) == {"spikes"} and len(norms) == 2 * 20
    assert {"gss_spikes", "gss_spikes_norm"} <= set(runs_csv.columns)
    assert runs_csv["git_commit"].notna().all() and "torch" in runs_csv  # provenance columns

    figures = tmp_path / "figures" / "tiny"
    for png in expected_figures(cfg["studies"]):
        assert (figures / png).stat().st_size > 0
        assert (figures / png).with_suffix(".pdf").exists()

    grok = pd.read_csv(tmp_path / "results" / "tiny" / "grokking" / "tables" / "grokking_summary.csv")
    assert sorted(grok.variant) == ["perpgrad", "softmax_fp32", "softmax_fp64", "stablemax"]
    assert (figures / "grokking" / "grokking_test_accuracy.png").exists()

    # The LM figures are re-drawn from the tables alone, without any run folder.
    for study in cfg["studies"]:
        shutil.rmtree(figures / study)
    redraw = subprocess.run(["stabilab", "figures", "--tables", str(tables), "--out", str(figures)],
                            capture_output=True, text=True)
    assert redraw.returncode == 0, redraw.stderr
    assert all((figures / png).exists() for png in expected_figures(cfg["studies"]))

    # The report opens on the headline tables, the smoke-test note first (config.yaml is one), above the
    # workflow's description: the front page's HTML, as the report's script holds it
    report = subprocess.run(cmd + ["--report", str(tmp_path / "report.html")], capture_output=True, text=True)
    assert report.returncode == 0, report.stderr[-3000:]
    page = (tmp_path / "report.html").read_text()
    front = json.loads(re.search(r"var workflow_desc = (\".*?\");\n", page).group(1))
    assert front.index("SMOKE TEST, not a result") < front.index("<table") < front.index("stabilab replicates")
    assert front.count("<table") == len(cfg["studies"]) and "μ-centering + z-loss" in front

    # Nothing left to do: a second snakemake call is a no-op, also with other runtime choices
    # (they are not part of a run's identity); a changed run value re-plans exactly its runs.
    again = subprocess.run(cmd + ["-n"], capture_output=True, text=True)
    assert "Nothing to be done" in again.stdout + again.stderr
    runtime = subprocess.run(cmd + ["-n", "--config", "set=runtime.trackers=[tensorboard,mlflow] "
                                                      "runtime.keep_checkpoint=true"], capture_output=True, text=True)
    assert "Nothing to be done" in runtime.stdout + runtime.stderr, runtime.stdout[-2000:]
    changed = subprocess.run(cmd + ["-n", "--config", "set=studies.spikes.overrides.train.steps=25"],
                             capture_output=True, text=True)
    assert re.search(r"\btrain\s+2\b", changed.stdout), changed.stdout[-3000:]

    # A refused input never deletes a finished result: an edited meta.json stops the workflow
    # when it plans, before any run is re-planned (and its summary removed).
    meta = tmp_path / "results" / "tiny" / "data" / "shards" / "meta.json"
    original = meta.read_text()
    edited = json.loads(original)
    edited["tokenizer"]["vocab_size"] = 512
    meta.write_text(json.dumps(edited))
    refused = subprocess.run(cmd, capture_output=True, text=True)
    assert refused.returncode != 0 and "was changed after the shards were written" in refused.stdout + refused.stderr
    assert all((tmp_path / "results" / "tiny" / r.path / "summary.json").exists() for r in expected)
    meta.write_text(original)

    # Data files are inputs: adding one re-plans data preparation and everything after it.
    write_text_files(tmp_path / "text_extra", make_documents(1, 50, seed=9))
    shutil.copy(tmp_path / "text_extra" / "doc000.txt", tmp_path / "text" / "doc999.txt")
    added = subprocess.run(cmd + ["-n"], capture_output=True, text=True)
    assert re.search(r"\bcorpus\s+1\b", added.stdout) and re.search(r"\btokenize\s+1\b", added.stdout), \
        added.stdout[-3000:]
