"""model.mask_unseen_tokens (default off): the training split's never-occurring ids masked like the
padding rows — out of the softmax, mu, mu-loss, mu-centering and the vocabulary metrics — checked
against float64 definitions written here with index selection (not the masks the code uses)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import run_killed_at, tiny_run
from stabilab import metrics
from stabilab.config import LossConfig, ModelConfig, RuntimeConfig, load_run_config
from stabilab.losses import head_loss, objective
from stabilab.model import GPT, padded_vocab
from stabilab.shards import open_shards, token_counts
from stabilab.train import Trainer
from stabilab.train.hooks import center_output_embedding

V, ROWS, N = 100, 128, 24  # vocabulary, padded head rows (28 padding rows), positions
CPU = RuntimeConfig(device="cpu", compile=False)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _keep(train_padding: bool = False) -> torch.Tensor:
    """(ROWS,) bool: every 3rd and 7th id masked (the 'unseen' ones), padding as softmax_rows has it."""
    ids = torch.arange(ROWS)
    return ((ids % 3 != 0) & (ids % 7 != 0) & (ids < V)) | ((ids >= V) & train_padding)


def _targets(keep: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    kept = keep[:V].nonzero().squeeze(1)
    return kept[torch.randint(0, len(kept), (N,), generator=g)]


def _reference(raw: torch.Tensor, y: torch.Tensor, keep: torch.Tensor, kind: str, softcap, z_loss: float,
               valid: torch.Tensor | None = None):
    """(loss, ce) in float64 over the kept columns, selected by index: CE = log sum_kept n(l) - log n(l_y)
    with n = exp (softmax) or StableMax's s; the means over the `valid` positions (all when None)."""
    cols = keep.nonzero().squeeze(1)
    lg = raw.double()
    lg = softcap * torch.tanh(lg / softcap) if softcap is not None else lg
    lk, ly = lg[:, cols], lg.gather(1, y[:, None]).squeeze(1)
    if kind == "stablemax":
        s = lambda x: torch.where(x >= 0, x + 1, 1 / (1 - torch.clamp(x, max=0)))  # noqa: E731
        lse, ty = s(lk).sum(1).log(), s(ly).log()
    else:
        lse, ty = torch.logsumexp(lk, 1), ly
    pos = torch.arange(N) if valid is None else valid.nonzero().squeeze(1)
    ce = (lse - ty)[pos].mean()
    return ce + z_loss * lse[pos].square().mean(), ce


CASES = [("softmax", None, 0.0), ("softmax", None, 1e-4), ("softmax", 30.0, 1e-4), ("softmax", 80.0, 0.0),
         ("stablemax", None, 0.0)]


@pytest.mark.parametrize("kind, softcap, z_loss", CASES, ids=["ce", "zloss", "softcap30", "softcap80", "stablemax"])
@pytest.mark.parametrize("train_padding", [False, True], ids=["padding_masked", "padding_trained"])
def test_head_loss_runs_over_the_kept_columns_only(kind, softcap, z_loss, train_padding):
    """Plain and fused paths equal the float64 definition over the kept columns; the gradient is the
    reference's on them and exactly zero on every masked column."""
    g = torch.Generator().manual_seed(0)
    keep = _keep(train_padding)
    raw = (torch.randn(N, ROWS, generator=g, dtype=torch.float64) * 4).requires_grad_()
    y = _targets(keep, g)
    ref_loss, ref_ce = _reference(raw, y, keep, kind, softcap, z_loss)
    ref_grad, = torch.autograd.grad(ref_loss, raw)
    vocab = ROWS if train_padding else V
    for fused in (False, True):
        loss, ce = head_loss(raw, y, vocab, kind, softcap, z_loss, fused=fused, keep=keep)
        grad, = torch.autograd.grad(loss, raw)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(ce, ref_ce, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-14)
        assert torch.equal(grad[:, ~keep], torch.zeros_like(grad[:, ~keep])), fused  # exactly zero
    assert (ref_grad[:, keep] != 0).all()  # the kept columns do get gradient (the test can tell)


@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused"])
def test_a_masked_target_is_left_out_of_the_means(fused):
    """Validation: a target id unseen in training has no probability under the masked softmax; its
    positions are left out of the CE and z-loss means (and get no gradient)."""
    g = torch.Generator().manual_seed(1)
    keep = _keep()
    raw = (torch.randn(N, ROWS, generator=g, dtype=torch.float64) * 4).requires_grad_()
    y = _targets(keep, g)
    y[[2, 5, 11]] = torch.tensor([0, 3, 7])  # masked ids
    valid = keep[y]
    ref_loss, ref_ce = _reference(raw, y, keep, "softmax", None, 1e-4, valid)
    loss, ce = head_loss(raw, y, V, z_loss=1e-4, fused=fused, keep=keep)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ce, ref_ce, rtol=1e-12, atol=1e-12)
    grad, = torch.autograd.grad(loss, raw)
    assert torch.isfinite(grad).all() and not grad[~valid].any() and not grad[:, ~keep].any()


def test_mu_loss_and_mu_metrics_run_over_the_kept_rows():
    g = torch.Generator().manual_seed(2)
    keep = _keep()
    E = (torch.randn(V, 16, generator=g, dtype=torch.float64) + 0.3).requires_grad_()
    rows = keep[:V].nonzero().squeeze(1)
    mu_ref = E.detach()[rows].mean(0)
    raw = torch.randn(N, ROWS, generator=g, dtype=torch.float64)
    y = _targets(keep, g)
    loss, _ = objective(raw, y, LossConfig(mu_loss=0.5), E, keep=keep)
    ce, _ = head_loss(raw, y, V, keep=keep)
    torch.testing.assert_close(loss - ce, 0.5 * mu_ref.square().sum(), rtol=1e-12, atol=1e-12)
    grad, = torch.autograd.grad(loss, E)
    assert not grad[~keep[:V]].any() and (grad[rows] != 0).all()
    torch.testing.assert_close(metrics.mu_norm(E, keep), mu_ref.float().norm(), rtol=1e-6, atol=0)
    h = torch.randn(3, 5, 16, generator=g, dtype=torch.float64)
    cos_ref = (h @ mu_ref / (h.norm(dim=-1) * mu_ref.norm())).mean()
    torch.testing.assert_close(metrics.hidden_alignment(h, E, keep)["hidden_mu_cos"], cos_ref.float(),
                               rtol=1e-5, atol=1e-6)


def test_logit_metrics_run_over_the_kept_columns():
    """logits_mean is then h . mu over the same rows: the drift's decomposition stays exact."""
    g = torch.Generator().manual_seed(3)
    keep = _keep()[:V]
    logits = torch.randn(2, 6, V, generator=g, dtype=torch.float64) * 3
    kept = logits[..., keep.nonzero().squeeze(1)]
    out = metrics.logit_stats(logits, keep)
    torch.testing.assert_close(out["logits_mean"], kept.mean().float(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(out["logits_absmax"], kept.abs().amax(-1).mean().float(), rtol=1e-6, atol=0)
    torch.testing.assert_close(out["log_z_sq"], torch.logsumexp(kept, -1).square().mean().float(), rtol=1e-6,
                               atol=0)
    y = keep.nonzero().squeeze(1)[:12].view(2, 6)
    ref_tl = torch.logsumexp(kept, -1) - logits.gather(-1, y[..., None]).squeeze(-1)
    frac = metrics.collapse_fractions(logits, y, "softmax", keep)
    assert frac["zero_loss_frac"] == (ref_tl == 0).double().mean() and frac["collapse_frac"] == 0
    E = torch.randn(V, 8, generator=g, dtype=torch.float64)
    sigma = E[keep].std(dim=1, correction=0)
    torch.testing.assert_close(metrics.tev(E, keep), (sigma.mean().float(), sigma.std(correction=0).float()))


def _model(**options) -> GPT:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=V, block_size=8, n_layer=1, n_head=2, n_embd=16, tie_embeddings=False,
                      mask_unseen_tokens=True, **options)
    return GPT(cfg).double()


def test_the_model_masks_what_it_is_told_and_its_loss_is_the_reference():
    m = _model()
    assert m.vocab_mask.shape == (ROWS,) and m.vocab_mask[:V].all() and not m.vocab_mask[V:].any()
    assert m.mask_unseen(_keep()[:V]) == int((~_keep()[:V]).sum())
    assert torch.equal(m.softmax_mask(), _keep())
    g = torch.Generator().manual_seed(4)
    x, y = torch.randint(0, V, (3, 8), generator=g), _targets(_keep(), g)[:24].view(3, 8)
    loss, ce = m(x, y, LossConfig(z_loss=1e-4))
    raw = m.head(m.hidden(x)).reshape(-1, ROWS)
    ref_loss, ref_ce = _reference(raw, y.reshape(-1), _keep(), "softmax", None, 1e-4)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-12)
    loss.backward()
    assert not m.lm_head.weight.grad[~_keep()].any()  # masked ids and padding rows: no gradient
    assert "vocab_mask" in m.state_dict() and "vocab_mask" not in GPT(ModelConfig(vocab_size=V)).state_dict()


@pytest.mark.parametrize("train_padding", [False, True], ids=["padding_masked", "padding_trained"])
def test_mu_centering_centers_the_kept_rows_and_leaves_the_masked_rows_untouched(train_padding):
    m = _model(train_padding_rows=train_padding)
    m.mask_unseen(_keep()[:V])
    keep = _keep(train_padding)
    with torch.no_grad():
        m.lm_head.weight.add_(torch.linspace(0.5, 2.0, 16, dtype=torch.float64))
    before = m.lm_head.weight.detach().clone()
    center_output_embedding(m)
    W = m.lm_head.weight.detach()
    torch.testing.assert_close(W[keep], before[keep] - before[keep].mean(0), rtol=0, atol=1e-14)
    assert W[keep].mean(0).abs().max() < 1e-14
    assert torch.equal(W[~keep], before[~keep])  # masked ids (and masked padding): bit for bit


def test_a_run_masks_its_training_splits_unseen_ids(tiny_data, tmp_path, float64_default):
    """End to end (mu-centering, z-loss, mu-loss, weight decay 0): the mask is train.bin's seen ids
    (250 of the tiny BPE's 300 never occur: unused bytes), summary.json says so, the masked rows of
    the untied head never move from their init, the kept rows are centered, and the validation loss
    is finite although a validation target is an id unseen in training."""
    run = tiny_run(tiny_data["shards"], model={"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 32,
                                               "tie_embeddings": False, "mask_unseen_tokens": True},
                   loss={"z_loss": 1e-4, "mu_loss": 1e-4}, post_step={"mu_centering": True},
                   optim={"lr": 1e-2, "warmup_steps": 5, "weight_decay": 0.0})
    run["train"]["steps"] = 20
    tr = Trainer(load_run_config(run), tmp_path, CPU)
    init = tr.model.lm_head.weight.detach().clone()
    summary = tr.run()
    meta, data = open_shards(tiny_data["shards"], "bpe", 300)
    counts = token_counts(data["train"], 300)
    seen = torch.from_numpy(counts > 0)
    assert summary["masked_token_ids"] == int((counts == 0).sum()) == 250
    assert (counts[np.asarray(data["val"])] == 0).any()  # a validation target unseen in training
    assert np.isfinite(summary["final_val_loss"]) and not summary["diverged"]
    W = tr.model.lm_head.weight.detach()
    assert torch.equal(tr.model.vocab_mask[:300], seen) and not tr.model.vocab_mask[300:].any()
    assert torch.equal(W[:300][~seen], init[:300][~seen])  # no gradient, no decay: never moved
    assert not torch.equal(W[:300][seen], init[:300][seen])
    assert W[:300][seen].mean(0).abs().max() < 1e-12
    recs = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert recs[-1]["mu_norm"] < 1e-6  # mu over the kept rows, which centering zeroes
    from stabilab.inference import evaluate

    assert evaluate(tmp_path, device="cpu")["loss"] == pytest.approx(summary["final_val_loss"], rel=1e-12)


def test_a_resumed_masked_run_equals_the_uninterrupted_one(tiny_data, tmp_path):
    """The mask is in the checkpoint and recomputed at start: a resume changes nothing."""
    run = tiny_run(tiny_data["shards"], model={"n_layer": 1, "n_head": 2, "n_embd": 16, "block_size": 16,
                                               "tie_embeddings": False, "mask_unseen_tokens": True},
                   post_step={"mu_centering": True})
    run["train"].update(steps=20, metrics_every=5)
    Trainer(load_run_config(run), tmp_path / "full", CPU).run()
    run_killed_at(Trainer(load_run_config(run), tmp_path / "resumed", CPU), 15)
    Trainer(load_run_config(run), tmp_path / "resumed", CPU).run()
    records = lambda d: [{k: v for k, v in json.loads(line).items() if k != "tokens_per_s"}  # noqa: E731
                         for line in (d / "metrics.jsonl").read_text().splitlines()]
    assert records(tmp_path / "resumed") == records(tmp_path / "full")


# Recorded at commit 473c4f6, before model.mask_unseen_tokens existed (CPU, float64, one thread):
# the option off, nothing may change.
BEFORE = {"baseline": ([5.72520110387759, 5.3173909394923635, 4.186695022946621], 3.881772948645464),
          "oec_center": ([5.703658506725706, 5.3810633949305995, 4.303648082210135], 3.8869730676461574)}


@pytest.mark.parametrize("name", BEFORE)
def test_with_the_option_off_a_run_is_what_it_was_before_the_option(tiny_data, tmp_path, float64_default, name):
    v = {"oec_center": {"model": {"tie_embeddings": False}, "post_step": {"mu_centering": True},
                        "loss": {"z_loss": 1e-4, "mu_loss": 1e-4}}}.get(name, {})
    run = tiny_run(tiny_data["shards"], **v)
    run["train"].update(steps=10, log_every=5, eval_every=10, metrics_every=10)
    cfg = load_run_config(run)
    assert cfg.model.mask_unseen_tokens is False
    tr = Trainer(cfg, tmp_path, CPU)
    summary = tr.run()
    assert "vocab_mask" not in tr.model.state_dict() and "masked_token_ids" not in summary
    losses = [json.loads(line)["train_loss"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert losses == pytest.approx(BEFORE[name][0], rel=1e-9)
    assert summary["final_val_loss"] == pytest.approx(BEFORE[name][1], rel=1e-9)


def test_padded_vocab_of_the_test_is_what_it_assumes():
    assert padded_vocab(V) == ROWS
