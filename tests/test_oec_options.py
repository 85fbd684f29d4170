"""The default-off options that make a run treat the head as the OEC code does: its padding rows
in the softmax and in mu (`model.train_padding_rows`), checked against float64 definitions."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from stabilab.config import LossConfig, ModelConfig
from stabilab.model import GPT, padded_vocab, softmax_rows
from stabilab.train.hooks import center_output_embedding

VOCAB = 100  # padded to 128: 28 padding rows


def _model(padding: bool) -> GPT:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=VOCAB, block_size=8, n_layer=1, n_head=2, n_embd=16, tie_embeddings=False,
                      train_padding_rows=padding)
    return GPT(cfg).double()


def _batch():
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, VOCAB, (3, 8), generator=g)
    return x, torch.randint(0, VOCAB, (3, 8), generator=g)


def test_padding_rows_default_masked():
    m = _model(False)
    assert softmax_rows(m.cfg) == VOCAB and m.output_embedding().shape[0] == VOCAB
    x, y = _batch()
    raw = m.head(m.hidden(x))
    _, ce = m(x, y, LossConfig())
    ref = F.cross_entropy(raw[..., :VOCAB].reshape(-1, VOCAB), y.reshape(-1))
    torch.testing.assert_close(ce, ref, rtol=1e-12, atol=1e-12)


def test_padding_rows_trained_as_oec():
    """CE, z-loss and mu-loss over all 128 rows; the padding rows get gradient (pushed down)."""
    m = _model(True)
    rows = padded_vocab(VOCAB)
    assert softmax_rows(m.cfg) == rows and m.output_embedding().shape[0] == rows
    x, y = _batch()
    loss_cfg = LossConfig(z_loss=1e-4, mu_loss=1e-4)
    loss, ce = m(x, y, loss_cfg)
    raw = m.head(m.hidden(x)).reshape(-1, rows)
    E = m.lm_head.weight
    ref_ce = F.cross_entropy(raw, y.reshape(-1))
    ref = ref_ce + 1e-4 * torch.logsumexp(raw, -1).square().mean() + 1e-4 * E.mean(0).square().sum()
    torch.testing.assert_close(ce, ref_ce, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    loss.backward()
    pad_grad = m.lm_head.weight.grad[VOCAB:]
    assert pad_grad.abs().sum() > 0
    # the fused head loss (the compiled path) agrees
    from stabilab.losses import head_loss

    fused = head_loss(raw.detach(), y.reshape(-1), rows, z_loss=1e-4, fused=True)
    plain = head_loss(raw.detach(), y.reshape(-1), rows, z_loss=1e-4, fused=False)
    torch.testing.assert_close(fused[0], plain[0], rtol=1e-12, atol=1e-12)


def test_padding_rows_default_gets_no_gradient():
    m = _model(False)
    x, y = _batch()
    m(x, y, LossConfig(z_loss=1e-4, mu_loss=1e-4))[0].backward()
    assert m.lm_head.weight.grad[VOCAB:].abs().sum() == 0


def test_mu_centering_covers_padding_rows_when_trained():
    for padding, rows in ((False, VOCAB), (True, padded_vocab(VOCAB))):
        m = _model(padding)
        with torch.no_grad():
            m.lm_head.weight.add_(1.0)
        before = m.lm_head.weight.detach().clone()
        center_output_embedding(m)
        W = m.lm_head.weight.detach()
        assert W[:rows].mean(0).abs().max() < 1e-12
        torch.testing.assert_close(W[rows:], before[rows:])  # rows beyond are untouched


def test_warmup_plus_one_is_the_oec_schedule():
    """optim.warmup_plus_one: lr (t+1)/(W+1) in the warmup, the same cosine after it; the OEC
    code's get_lr_decayed written out here with min_lr = lr * min_lr_ratio."""
    import math

    from stabilab.config import OptimConfig
    from stabilab.optim import lr_at

    lr, W, T, floor = 0.3, 20, 200, 1e-5

    def oec(it):  # nanoGPT/train.py get_lr_decayed, lr_decay_iters = max_iters = T
        if it < W:
            return lr * (it + 1) / (W + 1)
        ratio = (it - W) / (T - W)
        return floor + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - floor)

    cfg = OptimConfig(lr=lr, warmup_steps=W, min_lr_ratio=floor / lr, warmup_plus_one=True)
    assert all(math.isclose(lr_at(t, cfg, T), oec(t), rel_tol=1e-12) for t in range(T + 1))
    default = OptimConfig(lr=lr, warmup_steps=W, min_lr_ratio=floor / lr)
    assert lr_at(0, default, T) == lr / W and lr_at(0, cfg, T) == lr / (W + 1)
    assert all(lr_at(t, default, T) == lr_at(t, cfg, T) for t in range(W, T + 1))
