"""Stability metrics against direct computations on hand-made tensors (METHODS.md §3)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import run_killed_at, tiny_run
from stabilab.config import MLRAConfig, ModelConfig, OptimConfig, RuntimeConfig, load_run_config
from stabilab.layers import attention_logit_max
from stabilab.metrics import collapse_fractions, grad_group_norms, hidden_alignment, logit_stats, mu_norm, tev
from stabilab.model import GPT
from stabilab.optim import lr_at
from stabilab.stats import lr_sensitivity, summed_lr
from stabilab.train import Trainer, to_floats


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


def causal_max_by_loops(q: torch.Tensor, k: torch.Tensor) -> float:
    """max over (b, h, i, j <= i) of q_i.k_j / sqrt(d), one dot product at a time, in float64."""
    B, H, T, D = q.shape
    q, k = q.double(), k.double()
    return max(float(q[b, h, i] @ k[b, h, j]) / math.sqrt(D)
               for b in range(B) for h in range(H) for i in range(T) for j in range(i + 1))


def causal_max_float64(q: torch.Tensor, k: torch.Tensor) -> float:
    """The same maximum, vectorized, in float64 on the CPU."""
    q, k = q.double().cpu(), k.double().cpu()
    s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    return s.masked_fill(~torch.ones(s.shape[-1], s.shape[-1], dtype=torch.bool).tril(), -math.inf).max().item()


def test_hidden_alignment_splits_the_mean_logit_into_hidden_norm_and_cosine_with_mu():
    """Per position, the mean logit over the vocabulary is h . mu = ||h|| ||mu|| cos(h, mu)
    (untied head, no soft-cap): checked against loops in float64, and mu = 0 gives cosine 0."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=50, block_size=8, n_layer=2, n_head=2, n_embd=16, tie_embeddings=False)
    model = GPT(cfg).double().eval()
    with torch.no_grad():
        idx = torch.randint(0, 50, (2, 8))
        shared = model.metrics_forward(idx)[0].mean(dim=(0, 1))  # untied: h does not depend on the head
        model.lm_head.weight += 0.3 * shared / shared.norm()  # a mu along the hidden states' mean
        h, logits, _ = model.metrics_forward(idx)
        E = model.output_embedding()
        got = hidden_alignment(h, E)
        mu = [sum(E[v, i].item() for v in range(50)) / 50 for i in range(16)]
        mu_len = math.sqrt(sum(m * m for m in mu))
        norms, cosines = [], []
        for vec in h.reshape(-1, 16).tolist():
            n = math.sqrt(sum(a * a for a in vec))
            norms.append(n)
            cosines.append(sum(a * m for a, m in zip(vec, mu)) / (n * mu_len))
        assert got["hidden_norm"].item() == pytest.approx(sum(norms) / len(norms), rel=1e-5)
        assert got["hidden_mu_cos"].item() == pytest.approx(sum(cosines) / len(cosines), rel=1e-5)
        assert got["hidden_mu_cos"].item() > 0.05  # the shift above aligned mu with the states
        mean_logit = sum(n * c for n, c in zip(norms, cosines)) / len(norms) * mu_len
        assert logit_stats(logits)["logits_mean"].item() == pytest.approx(mean_logit, rel=1e-5)
        centered = hidden_alignment(h, torch.zeros_like(E))  # mu exactly 0: no direction
        assert centered["hidden_mu_cos"].item() == 0.0
        assert torch.isfinite(centered["hidden_norm"])


def test_attention_logit_max_is_the_max_over_causal_pairs():
    torch.manual_seed(0)
    q, k = torch.randn(2, 3, 6, 4), torch.randn(2, 3, 6, 4)
    q[1, 2, 1], k[1, 2, 4] = 10.0, 10.0  # the largest score of all, at a future key (j > i): excluded
    got = attention_logit_max(q, k)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(causal_max_by_loops(q, k), rel=1e-6)
    assert got.item() < 10.0 * 10.0 * 4 / 2
    assert attention_logit_max(q.double(), k.double()).item() == pytest.approx(causal_max_by_loops(q, k), rel=1e-12)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_attention_logit_max_of_bfloat16_heads_on_a_gpu_equals_the_float32_scores():
    """The 16-bit matmul with float32 output computes the same scores as the upcast matmul."""
    torch.manual_seed(0)
    q, k = (torch.randn(2, 4, 256, 64, device="cuda").bfloat16() * 3 for _ in range(2))
    assert attention_logit_max(q, k).item() == pytest.approx(causal_max_float64(q, k), rel=1e-6)


@pytest.mark.parametrize("mlra", [False, True], ids=["dense", "mlra"])
def test_the_models_attention_logit_max_per_layer_is_recomputed_from_its_own_heads(mlra):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=50, block_size=12, n_layer=3, n_head=2, n_embd=16,
                      mlra=MLRAConfig(enabled=mlra, targets=["q", "k", "v", "o"]))
    model = GPT(cfg).double().eval()
    idx = torch.randint(0, 50, (2, 12))
    with torch.no_grad():
        _, logits, maxes = model.metrics_forward(idx)
        assert torch.equal(logits, model(idx))
        x = model.wte(idx) + model.wpe(torch.arange(12))
        expected = []
        for block in model.blocks:  # each layer's q, k from the input to that block
            heads = block.attn.qkv(block.ln_1(x))
            expected.append(causal_max_by_loops(heads["q"], heads["k"]))
            x = block(x)
    assert maxes.shape == (3,)
    assert maxes.tolist() == pytest.approx(expected, rel=1e-12)


def test_the_compiled_metrics_pass_equals_the_eager_one(tiny_data, tmp_path):
    """`runtime.compile` compiles the forward-pass metrics (attention maxima, logit statistics,
    hidden-state alignment, collapse fractions); they are the eager ones up to float32 rounding."""
    tr = Trainer(load_run_config(tiny_run(tiny_data["shards"])), tmp_path, RuntimeConfig(compile=True))
    x, y = (t[:4] for t in tr.val_batches[0])
    tr.model.eval()
    eager, compiled = to_floats(tr.probe._output_metrics(x, y)), to_floats(tr.probe.output_metrics(x, y))
    assert compiled.keys() == eager.keys() and len(eager) == 2 + 3 + 2 + 2
    for key in eager:
        assert compiled[key] == pytest.approx(eager[key], rel=1e-5, abs=1e-6), key


def test_to_floats_moves_every_scalar_at_once():
    out = to_floats({"a": torch.tensor(1.5), "b": torch.tensor(3, dtype=torch.int64), "c": torch.tensor([2.0])})
    assert out == {"a": 1.5, "b": 3.0, "c": 2.0} and to_floats({}) == {}


def test_lr_sensitivity_on_a_made_up_table():
    # L0 = 10; losses over 4 LRs, one diverged (inf) and one worse than L0 (capped at L0)
    losses, l0 = [4.0, 3.0, 12.0, float("inf")], 10.0
    # capped: 4, 3, 10, 10; L* = 3; mean(1, 0, 7, 7) = 3.75
    assert lr_sensitivity(losses, l0) == pytest.approx(3.75)
    assert lr_sensitivity([5.0, 5.0], l0) == 0.0


def test_lr_sensitivity_rows_are_over_the_studys_whole_sweep():
    """A variant whose seeds all miss an LR of the study's grid (a run that never finished) has no
    sensitivity (NaN), rather than one over the LRs it happens to have; a complete seed has one."""
    import pandas as pd

    from stabilab.tables import lr_sensitivity_rows

    rows = [("full", 0, 1e-3, 4.0), ("full", 0, 1e-2, 3.0), ("full", 0, 1e-1, 12.0),
            ("partial", 0, 1e-3, 4.0), ("partial", 0, 1e-2, 3.0)]
    runs = pd.DataFrame([{"variant": v, "depth": 2, "seed": s, "lr": lr, "final_val_loss": loss,
                          "initial_loss": 10.0, "diverged": False, "vocab_size": 300} for v, s, lr, loss in rows])
    out = pd.DataFrame(lr_sensitivity_rows(runs, {"lrs": [1e-3, 1e-2, 1e-1]}))
    sens = out[out["metric"] == "lr_sensitivity"].set_index("variant")["mean"]
    assert sens["full"] == pytest.approx(lr_sensitivity([4.0, 3.0, 12.0], 10.0))
    assert math.isnan(sens["partial"])
    # without the study's grid (older callers), a variant's own LRs are its sweep
    alone = pd.DataFrame(lr_sensitivity_rows(runs))
    assert alone[(alone.metric == "lr_sensitivity") & (alone.variant == "partial")]["mean"].iloc[0] == \
        pytest.approx(lr_sensitivity([4.0, 3.0], 10.0))


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


def test_lr_sensitivity_in_the_oec_convention_reproduces_the_papers_numbers():
    """The OEC code divides by K - 1 with L0 = 10.83; on its own 16M final test losses (LR 3e-4 ...
    3e-1, from the official repository's results) that gives its published 0.306 (baseline) and
    0.031 (mu-loss), while Wortsman et al.'s normalization (divide by K) gives 6/7 of it."""
    baseline = [3.961, 3.881, 3.850, 3.841, 3.857, 4.269, 5.065]
    assert lr_sensitivity(baseline, 10.83, divide_by="K-1") == pytest.approx(0.306, abs=5e-4)
    assert lr_sensitivity(baseline, 10.83) == pytest.approx(0.306 * 6 / 7, abs=5e-4)
    assert lr_sensitivity([5.0, math.nan, 4.0], 10.83, divide_by="K-1") == pytest.approx((1 + 6.83) / 2)


# ----------------------------------------------------------------------------- SPAM's gradient spike score


def test_gradient_spike_score_counts_match_the_definition_in_float64():
    """GSS_t(g_i) = |g_i,t| / ((1/(t+1)) sum_{j<=t} |g_i,j|), a spike where GSS > 50 (SPAM paper),
    recomputed from the whole history at every step in float64, against the online counts."""
    from stabilab.metrics import gss_update

    gen = torch.Generator().manual_seed(0)
    shapes = [(7, 5), (11,)]
    history = [[torch.randn(s, generator=gen) * 1e-3 for s in shapes] for _ in range(120)]
    history[80][0][2, 3] = 5.0  # planted spikes, far above the running mean of |g|
    history[100][1][4] = -2.0
    history[101][1][4] = 1e-2  # right after a spike the mean is inflated: not a spike
    sums = [torch.zeros(s) for s in shapes]
    seen = torch.zeros(())
    spikes_at = {}
    for t, grads in enumerate(history):
        seen += 1
        counts = gss_update(sums, grads, seen, 50.0)
        for i in range(len(shapes)):
            past = torch.stack([h[i].double().abs() for h in history[: t + 1]])
            gss = grads[i].double().abs() / past.mean(dim=0)
            assert counts[i].item() == int((gss > 50).sum()), (t, i)
            if counts[i]:
                spikes_at[t] = spikes_at.get(t, 0) + int(counts[i])
    assert spikes_at == {80: 1, 100: 1}  # the planted ones, and nothing else


def test_parameter_kinds_of_the_oec_model():
    from stabilab.metrics import param_kind

    cfg = ModelConfig(vocab_size=50, block_size=8, n_layer=2, n_head=2, n_embd=16, tie_embeddings=False,
                      qk_norm="layernorm", position="rope", mlp="swiglu")
    kinds = {name: param_kind(name) for name, _ in GPT(cfg).named_parameters()}
    assert kinds["wte.weight"] == "embedding" and kinds["lm_head.weight"] == "head"
    assert kinds["blocks.0.attn.q_norm.weight"] == "norm" and kinds["blocks.1.ln_2.weight"] == "norm"
    assert kinds["ln_f.weight"] == "norm" and kinds["blocks.0.attn.dense.weight"] == "attn"
    assert kinds["blocks.0.mlp.c_fc.weight"] == "mlp" and kinds["blocks.1.attn.c_proj.weight"] == "attn"


def test_spike_scores_in_the_trainer_log_counts_and_every_steps_grad_norm(tiny_data, tmp_path):
    run = tiny_run(tiny_data["shards"], train={"spike_scores": True, "steps": 30, "checkpoint_every": 10})
    summary = Trainer(load_run_config(run), tmp_path / "full").run()
    records = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    norms = dict(line.split(",") for line in (tmp_path / "full" / "grad_norm.csv").read_text().splitlines())
    assert sorted(map(int, norms)) == list(range(1, 31))
    for r in records:  # the logged steps' norms are the same numbers
        assert float(norms[str(r["step"])]) == pytest.approx(r["grad_norm"], rel=1e-12)
        assert {"gss_spikes", "gss_spikes_norm", "gss_spikes_embedding"} <= set(r)
    counts = [r["gss_spikes"] for r in records]
    assert counts == sorted(counts) and summary["steps"] == 30  # cumulative

    first = Trainer(load_run_config(run), tmp_path / "resumed")
    run_killed_at(first, 25)
    Trainer(load_run_config(run), tmp_path / "resumed").run()
    for name in ("metrics.jsonl", "grad_norm.csv"):
        a, b = ((tmp_path / d / name).read_text().splitlines() for d in ("full", "resumed"))
        if name == "metrics.jsonl":
            a, b = ([{k: v for k, v in json.loads(x).items() if k != "tokens_per_s"} for x in lines]
                    for lines in (a, b))
        assert a == b, name


def test_summed_lr_from_logged_steps_matches_the_schedules_sum():
    # the oec_long schedule: 1000 warmup steps, cosine to 0 over 20k; step s (1-based) trains at lr_at(s - 1)
    cfg, total = OptimConfig(lr=0.3, warmup_steps=1000, min_lr_ratio=0.0), 20000
    logged = [1] + list(range(50, total + 1, 50))
    got = summed_lr(logged, [lr_at(s - 1, cfg, total) for s in logged])
    exact, running = {}, 0.0
    for s in range(1, total + 1):
        running += lr_at(s - 1, cfg, total)
        exact[s] = running
    for s, value in zip(logged, got):  # within half the step's LR (trapezoid vs sum) plus the cosine's curvature
        assert abs(value - exact[s]) <= 0.5 * cfg.lr + 1e-3 * exact[s], s
    assert got[-1] == pytest.approx(0.3 * (500 + 19000 / 2), rel=1e-3)  # Σ lr = lr (warmup/2 + decay/2)
    assert summed_lr([], []) == []
