"""The paper-scale presets (configs/paper_scale/): the official shapes as the papers' code has them,
their cost before submission, and their plan on SLURM (a dry run)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from stabilab.config import load_run_config
from stabilab.cost import run_vocab
from stabilab.experiment import load_experiment, run_config, runs, shards_dir

ROOT = Path(__file__).resolve().parents[1]
PRESETS = ROOT / "configs" / "paper_scale"


def resolved(preset: str) -> dict:
    """study -> the run configs of its runs (vocabulary filled in)."""
    cfg = load_experiment(PRESETS / f"{preset}.yaml")
    out: dict[str, list] = {}
    for run in runs(cfg):
        rc = run_config(cfg, run, shards_dir(cfg))
        out.setdefault(run.study, []).append(load_run_config(rc).with_vocab(run_vocab(rc)))
    return out


def params(cfg) -> tuple[int, int]:
    """(all parameters, the non-embedding count the OEC code names its models by: all but wte)."""
    import torch

    from stabilab.model import GPT

    with torch.device("meta"):
        model = GPT(cfg.model)
    return model.num_params(), model.num_params(non_embedding=True) - model.wte.weight.numel()


def test_oec_preset_is_the_wortsman_grid_of_the_oec_code():
    """script_create_config.py --wortsman: 5 sizes x 4 arms x 7 LRs, 100k steps of 64 x 2048 on 4 GPUs."""
    studies = resolved("oec")
    shapes = {"m16": (6, 224, 16e6), "m29": (9, 320, 29e6), "m57": (12, 480, 57e6), "m109": (15, 640, 109e6),
              "m221": (21, 832, 221e6)}
    assert list(studies) == list(shapes)
    for study, (layers, width, size) in shapes.items():
        grid = studies[study]
        assert len(grid) == 4 * 7 and {c.variant for c in grid} == {"baseline", "oec_loss", "oec_center", "zloss"}
        assert sorted({c.optim.lr for c in grid}) == [3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1]
        c = grid[0]
        assert (c.model.n_layer, c.model.n_embd, c.model.n_head, c.model.block_size) == (layers, width, 4, 2048)
        assert abs(params(c)[1] / size - 1) < 0.03  # the size in the code's names: 15.6M, 28.6M, ... 220.8M
        t, o = c.train, c.optim
        assert (t.steps, t.batch_size * t.grad_accum, t.processes, t.batch_size, c.seed) == (100000, 64, 4, 16, 1)
        assert (o.warmup_steps, o.min_lr, o.weight_decay, o.betas, o.grad_clip) == (5000, 1e-5, 0.0, [0.9, 0.95], 1.0)
        assert (c.model.vocab_size, c.model.tie_embeddings, c.model.qk_norm, c.model.rope_fraction) == (
            50257, False, "layernorm", 0.5)
        assert (t.eval_every, t.eval_batches) == (10000, 100)
    cfg = load_experiment(PRESETS / "oec.yaml")
    assert cfg["data"]["token_shards"]["max_tokens"] == 100000 * 64 * 2048  # the tokens one run trains


def test_spam_preset_is_the_llama_configs_of_the_spam_code():
    studies = resolved("spam")
    shapes = {"llama60m": (8, 512, 8, 1376, 10000, 1e-3, 1, 60e6),
              "llama130m": (12, 768, 12, 2048, 20000, 8e-4, 2, 130e6),
              "llama350m": (24, 1024, 16, 2736, 60000, 4e-4, 2, 350e6),
              "llama1b": (24, 2048, 32, 5461, 20000, 2e-3, 1, 1e9)}
    for study, (layers, width, heads, mlp, steps, lr, procs, size) in shapes.items():
        grid = studies[study]
        assert [c.variant for c in grid] == ["adam", "spam"]
        c = grid[1]
        m, t = c.model, c.train
        assert (m.n_layer, m.n_embd, m.n_head, m.mlp_hidden, m.block_size) == (layers, width, heads, mlp, 256)
        assert (m.norm, m.position, m.mlp, m.tie_embeddings, m.bias, m.init, m.vocab_size) == (
            "rmsnorm", "rope", "swiglu", False, False, "llama", 32100)
        assert 0.9 < params(c)[0] / size < 1.4  # 58M, 134M, 368M, 1.34B with T5's 32100 ids
        assert (t.steps, t.batch_size * t.grad_accum, t.processes, c.optim.lr) == (steps, 512, procs, lr)
        assert (c.optim.name, c.optim.eps, c.optim.betas, c.optim.grad_clip) == ("spam", 1e-6, [0.9, 0.999], None)
        assert (c.optim.spam.threshold, c.optim.spam.reset_interval, c.optim.spam.warmup) == (5000, 500, 150)
        assert (c.optim.warmup_steps, c.optim.min_lr_ratio, c.optim.weight_decay) == (1000, 0.1, 0.0)
        assert grid[0].optim.name == "adamw" and grid[0].optim.eps == 1e-8
        assert t.eval_batches * t.batch_size * m.block_size == pytest.approx(10e6, rel=0.01)  # 10M tokens
    cfg = load_experiment(PRESETS / "spam.yaml")
    assert cfg["data"]["hf"]["path"] == "allenai/c4" and cfg["data"]["hf"]["val_split"] == "validation"
    assert (cfg["tokenizer"]["kind"], cfg["tokenizer"]["name"]) == ("hf", "t5-base")


def test_mlra_preset_is_gpt2_at_depth():
    grid = resolved("mlra")["depth"]
    assert len(grid) == 3 * 2 * 2 * 2 and sorted({c.model.n_layer for c in grid}) == [12, 24, 48]
    c = next(c for c in grid if c.model.n_layer == 12 and c.variant == "baseline")
    m, t = c.model, c.train
    assert (m.n_embd, m.n_head, m.block_size, m.vocab_size, m.tie_embeddings, m.bias) == (768, 12, 1024, 50257,
                                                                                          True, True)
    assert (m.norm, m.position, m.mlp, m.init) == ("layernorm", "learned", "gelu", "gpt2")
    assert params(c)[0] == 124_475_904  # GPT-2 124M, vocabulary padded to 50304
    assert (t.batch_size * t.grad_accum, t.processes, t.steps) == (480, 4, 10000)


def test_grokking_full_is_the_stablemax_paper_scale():
    """StableMax's grokking runs at the paper's own scale already (configs/grokking_full.yaml)."""
    cfg = load_experiment(ROOT / "configs" / "grokking_full.yaml")
    assert (cfg["grokking"]["epochs"], cfg["grokking"]["hidden"], cfg["grokking"]["modulus"]) == (80000, [200, 200],
                                                                                                 113)


@pytest.mark.parametrize("preset", ["oec", "spam", "mlra"])
def test_check_config_says_each_preset_costs_in_gpu_hours(preset, capsys, tmp_path, monkeypatch):
    from stabilab.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["check-config", str(PRESETS / f"{preset}.yaml")]) == 0
    out = capsys.readouterr().out.splitlines()
    studies = [line for line in out[1:] if "runs" in line and "GPU-h: H100" in line and ", H200" in line]
    assert len(studies) == len(resolved(preset)) + (len(resolved(preset)) > 1)  # each study, and the total
    assert any(line.startswith("  GPU-hours: each run alone on ") for line in out)
    assert any(line.startswith("    H100, ") for line in out) and any(line.startswith("    H200, ") for line in out)


def slurm_dry_run(preset: str, cwd: Path) -> subprocess.CompletedProcess:
    """`snakemake --workflow-profile workflow/profiles/slurm --configfile configs/paper_scale/<preset>.yaml -n`
    (on a machine with SLURM's client tools but no controller, the plugin's probe alone takes ~9 s)."""
    pytest.importorskip("snakemake_executor_plugin_slurm")
    profile = ROOT / "workflow" / "profiles" / "slurm"
    return subprocess.run([sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "--workflow-profile",
                           str(profile), "--configfile", str(PRESETS / f"{preset}.yaml"), "-n"], cwd=cwd,
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})


@pytest.mark.slow
def test_a_slurm_dry_run_prints_the_plan_and_its_cost(tmp_path):
    """The SPAM preset streams its data (nothing to fetch first): the plan, each train job's GPUs,
    and the cost of the runs, as check-config says it."""
    proc = slurm_dry_run("spam", tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = (proc.stdout + proc.stderr).splitlines()
    plan = out[out.index("Would train 10 runs:"):]
    assert plan[1:6] == ["  llama130m          2  (new)", "  llama1b            2  (new)",
                         "  llama350m          2  (new)", "  llama60m           2  (new)",
                         "  llama60m_ablations 2  (new)"]
    assert plan[6] == "Cost of these runs:"
    assert plan[12].startswith("  total                10 runs   31.5B tokens  78.7 EFLOP  GPU-h: H100 ")
    assert plan[13].startswith("  GPU-hours: each run alone on 1/2 GPUs (train.processes); the longest run ")
    gpus = [line.split("gpu=")[1].split(",")[0] for line in out if "resources:" in line and "gpu=" in line]
    assert sorted(gpus) == ["1"] * 6 + ["2"] * 4  # 130M and 350M on 2 GPUs (the SPAM scripts' nproc 2)


@pytest.mark.slow
def test_a_slurm_dry_run_without_the_token_shards_names_their_fetch_in_one_line(tmp_path):
    """OEC's FineWeb shards are not there: planning stops with one line naming the command that fetches
    them (check-config still says the cost)."""
    oec = slurm_dry_run("oec", tmp_path)
    assert oec.returncode != 0
    assert oec.stderr.splitlines()[-1].startswith(
        "error: token shards of data.token_shards.train not found: data/fineweb100B-gpt2/fineweb_train_*.bin; "
        "fetch them with: python -c \"from huggingface_hub import hf_hub_download as get; ")
