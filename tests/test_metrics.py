"""Stability metrics against direct computations on hand-made tensors (METHODS.md §3)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from stabilab.config import load_run_config
from stabilab.metrics import collapse_fractions, grad_group_norms, logit_stats, lr_sensitivity, mu_norm, tev
from stabilab.train import Trainer

from conftest import tiny_run


def test_tev_of_rows_with_known_stds():
    # row i = sigma_i * (+1, -1, +1, -1): population std exactly sigma_i
    sigmas = torch.tensor([0.5, 1.0, 2.0, 4.0])
    rows = sigmas[:, None] * torch.tensor([1.0, -1.0, 1.0, -1.0])
    mean, std = tev(rows + 3.0)  # a row offset does not change a row's std
    assert mean.item() == pytest.approx(1.875)
    assert std.item() == pytest.approx(math.sqrt(((sigmas - 1.875) ** 2).mean().item()))


def test_logit_stats_and_mu_norm_by_hand():
    logits = torch.tensor([[[1.0, -3.0, 0.0], [2.0, 2.0, 2.0]]])  # (B=1, T=2, V=3)
    stats = logit_stats(logits)
    assert stats["logits_mean"].item() == pytest.approx(4.0 / 6.0)
    assert stats["logits_absmax"].item() == pytest.approx((3.0 + 2.0) / 2)
    lse = [math.log(math.e + math.exp(-3) + 1), 2 + math.log(3)]
    assert stats["log_z_sq"].item() == pytest.approx((lse[0] ** 2 + lse[1] ** 2) / 2, rel=1e-6)
    E = torch.tensor([[1.0, 2.0], [3.0, -2.0]])
    assert mu_norm(E).item() == pytest.approx(2.0)  # mu = (2, 0)


def test_collapse_fraction_on_logits_built_to_collapse_in_float32():
    # exp(-30) and exp(-20) vanish next to 1 in float32: the first two rows sum to exactly 1;
    # the third does not. The float64 sum would not be 1.
    logits = torch.tensor([[30.0, 0.0, 0.0], [0.0, 20.0, 0.0], [1.0, 0.0, 0.0]])[None]
    targets = torch.tensor([[0, 1, 0]])
    out = collapse_fractions(logits, targets)
    assert out["collapse_frac"].item() == pytest.approx(2 / 3)
    assert out["zero_loss_frac"].item() == pytest.approx(2 / 3)  # correct and collapsed: loss exactly 0
    assert torch.exp(logits.double() - 30).sum(-1)[0, 0].item() != 1.0  # float64 does not collapse
    wrong = collapse_fractions(logits, torch.tensor([[1, 0, 0]]))
    assert wrong["collapse_frac"].item() == pytest.approx(2 / 3) and wrong["zero_loss_frac"].item() == 0.0


def test_lr_sensitivity_on_a_made_up_table():
    # L0 = 10; losses over 4 LRs, one diverged (inf) and one worse than L0 (capped at L0)
    losses, l0 = [4.0, 3.0, 12.0, float("inf")], 10.0
    # capped: 4, 3, 10, 10; L* = 3; mean(1, 0, 7, 7) = 3.75
    assert lr_sensitivity(losses, l0) == pytest.approx(3.75)
    assert lr_sensitivity([5.0, 5.0], l0) == 0.0


def test_grad_group_norms_by_hand():
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(3))
    a.grad, b.grad = torch.tensor([3.0, 4.0]), torch.tensor([1.0, 2.0, 2.0])
    out = grad_group_norms({"x": [a], "y": [a, b]})
    assert out["grad_norm_x"].item() == pytest.approx(5.0)
    assert out["grad_norm_y"].item() == pytest.approx(math.sqrt(25 + 9))


def test_trainer_logs_every_metric_and_windowed_grad_norm_variance(tiny_data, tmp_path):
    run = tiny_run(tiny_data["shards"], model={"tie_embeddings": False},
                   train={"steps": 20, "log_every": 1, "metrics_every": 10, "grad_var_window": 5})
    Trainer(load_run_config(run), tmp_path).run()
    recs = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    measured = [r for r in recs if "tev_mean" in r]
    assert [r["step"] for r in measured] == [10, 20]
    expected = {"tev_mean", "tev_std", "tev_lm_head_mean", "tev_lm_head_std", "mu_norm", "mu_norm_wte",
                "logits_mean", "logits_absmax", "log_z_sq", "attn_logit_max_l0", "attn_logit_max_l1",
                "collapse_frac", "zero_loss_frac", "grad_norm_var", "spike_count", "grad_norm_embedding",
                "grad_norm_block0", "grad_norm_block1", "grad_norm_head"}
    assert expected <= set(measured[-1])
    # the variance is over the last 5 steps' total grad norms (logged every step here)
    norms = torch.tensor([r["grad_norm"] for r in recs if 16 <= r["step"] <= 20])
    assert measured[-1]["grad_norm_var"] == pytest.approx(norms.var(correction=0).item(), rel=1e-4)
    # per-group norms combine into the total norm (embedding, blocks, head partition the parameters)
    last = measured[-1]
    total = math.sqrt(sum(last[k] ** 2 for k in last if k.startswith("grad_norm_") and k != "grad_norm_var"))
    assert total == pytest.approx(last["grad_norm"], rel=1e-4)
