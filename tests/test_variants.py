"""The stability variants of METHODS.md §2 against independent references, and each variant
(and two combinations) training through the real Trainer, tied and untied.

References are written here: float64 formulas (StableMax, z-loss, mu-loss, soft-capping),
matrices rebuilt from the module's weights (MLRA), parameter counts done by hand.
"""

from __future__ import annotations

import copy
import json
import math
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from stabilab.config import LossConfig, MLRAConfig, ModelConfig, load_run_config
from stabilab.errors import UserError
from stabilab.experiment import Run, run_config
from stabilab.layers import LowRankHeads, LowRankOut
from stabilab.losses import head_loss, objective, token_losses
from stabilab.methods import METHODS, builtin_variants, variant_overlay
from stabilab.model import GPT, attention_params_by_hand
from stabilab.optim import SPAM, PerpGrad
from stabilab.train import Trainer

REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ----------------------------------------------------------------------------- StableMax


def stablemax_loss_reference(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The paper's definition in float64, per row: s(x) = x + 1 (x >= 0), 1 / (1 - x) (x < 0);
    p = s / sum s; loss = -log p_y. Branches are filled by index so that neither branch is
    evaluated (or differentiated) where it does not apply."""
    x = logits.double()
    pos = x >= 0
    s = torch.empty_like(x)
    s[pos] = x[pos] + 1.0
    s[~pos] = 1.0 / (1.0 - x[~pos])
    p = s / s.sum(dim=-1, keepdim=True)
    return -torch.log(p.gather(-1, targets.unsqueeze(-1)).squeeze(-1))


def _compare_stablemax(logits32: torch.Tensor, targets: torch.Tensor, loss_rtol: float, grad_rtol: float):
    x = logits32.clone().requires_grad_(True)
    loss = token_losses(x, targets, "stablemax")
    loss.sum().backward()
    ref_in = logits32.double().requires_grad_(True)
    ref = stablemax_loss_reference(ref_in, targets)
    ref.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(x.grad).all()
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=loss_rtol, atol=0)
    # gradient entries span many orders of magnitude: compare to the row's largest entry
    scale = ref_in.grad.abs().amax(dim=-1, keepdim=True)
    err = (x.grad.double() - ref_in.grad).abs() / scale
    assert err.max().item() <= grad_rtol, f"max relative gradient error {err.max().item():.3g}"


@pytest.mark.parametrize("scale", [1.0, 30.0, 1e3, 1e5])
def test_stablemax_loss_and_gradient_match_the_float64_definition(scale):
    gen = torch.Generator().manual_seed(0)
    logits = scale * torch.randn(6, 37, generator=gen)
    # values at and near the branch point (exact 0 has its own test below)
    logits[0, :5] = torch.tensor([1.0, -1.0, 1e-30, -1e-30, -7.0])
    targets = torch.randint(0, 37, (6,), generator=gen)
    targets[1] = logits[1].argmin()  # a very unlikely target (large loss)
    # float32 arithmetic in the implementation: 1e-6 relative on the loss, 1e-5 of the row scale on the gradient
    _compare_stablemax(logits, targets, loss_rtol=1e-6, grad_rtol=1e-5)


def test_stablemax_at_gpt2_vocabulary_size():
    gen = torch.Generator().manual_seed(1)
    V = 50257
    logits = 10.0 * torch.randn(3, V, generator=gen)
    logits[0, :100] *= 1e3  # a few very large logits of both signs
    logits[2] = logits[2] * 1e-3  # nearly uniform row
    targets = torch.tensor([17, 50256, 4242])
    _compare_stablemax(logits, targets, loss_rtol=1e-6, grad_rtol=1e-5)


def test_stablemax_is_finite_at_logits_exactly_zero_and_one():
    logits = torch.tensor([[0.0, 1.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0], [0.0, 1.0, -1.0, 0.0]])
    targets = torch.tensor([0, 2, 3, 1])
    x = logits.clone().requires_grad_(True)
    loss = token_losses(x, targets, "stablemax")
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(x.grad).all()
    torch.testing.assert_close(loss.double(), stablemax_loss_reference(logits, targets), rtol=1e-6, atol=1e-7)
    # the all-zero row: uniform, loss log 4, and a nonzero gradient (sign(x) log1p|x| would give 0)
    assert loss[1].item() == pytest.approx(math.log(4), rel=1e-6)
    assert x.grad[1].abs().max().item() > 0.1


def test_stablemax_gradient_at_exactly_zero_equals_the_definition():
    """log s(x) has derivative 1 from both sides at 0 (d/dx log(1+x) = 1, d/dx -log(1-x) = 1), so
    the loss gradient at x = 0 must equal the float64 reference's (x >= 0 branch, s'(0) = 1)."""
    logits = torch.tensor([[0.0, 1.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0], [0.0, 1.0, -1.0, 0.0]])
    targets = torch.tensor([0, 2, 1])
    x = logits.clone().requires_grad_(True)
    token_losses(x, targets, "stablemax").sum().backward()
    ref_in = logits.double().requires_grad_(True)
    stablemax_loss_reference(ref_in, targets).sum().backward()
    # e.g. the all-zero row: p = 1/4 each, dL/dx_i = 1/4 - [i == y] (as for softmax at 0)
    torch.testing.assert_close(ref_in.grad[1], torch.tensor([0.25, 0.25, -0.75, 0.25], dtype=torch.float64))
    torch.testing.assert_close(x.grad.double(), ref_in.grad, rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------- z-loss, mu-loss, soft-capping


def _lse64(logits: torch.Tensor) -> torch.Tensor:
    x = logits.double()
    m = x.amax(dim=-1, keepdim=True)
    return (m + (x - m).exp().sum(dim=-1, keepdim=True).log()).squeeze(-1)


@pytest.mark.parametrize("lam", [1e-4, 1.0])
def test_z_loss_is_lambda_times_mean_squared_logsumexp(lam):
    gen = torch.Generator().manual_seed(2)
    B, T, V = 3, 5, 40
    # per-token scales so that mean(lse^2) differs clearly from mean(lse)^2 and from sum(lse^2)
    logits = torch.randn(B, T, V, generator=gen) * torch.linspace(0.5, 20.0, B * T).view(B, T, 1) + 3.0
    y = torch.randint(0, V, (B, T), generator=gen)
    E = torch.zeros(V, 4)
    x = logits.clone().requires_grad_(True)
    loss, ce = objective(x, y, LossConfig(z_loss=lam), E)
    loss.backward()
    x64 = logits.double().requires_grad_(True)
    lse = _lse64(x64)
    ce64 = (lse - x64.gather(-1, y.unsqueeze(-1)).squeeze(-1)).mean()
    ref = ce64 + lam * lse.square().mean()
    ref.backward()
    torch.testing.assert_close(ce.double(), ce64.detach(), rtol=1e-6, atol=0)
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-6, atol=0)
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-4, atol=1e-6 * x64.grad.abs().max().item())
    # and without z-loss the objective is the cross-entropy alone
    loss0, _ = objective(logits, y, LossConfig(), E)
    torch.testing.assert_close(loss0.double(), ce64.detach(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("lam", [1e-4, 0.5])
def test_mu_loss_adds_two_lambda_over_v_times_mu_to_every_row_gradient(lam):
    gen = torch.Generator().manual_seed(3)
    V, d = 70, 12
    E0 = 0.1 * torch.randn(V, d, generator=gen, dtype=torch.float64) + 0.3 * torch.randn(d, generator=gen,
                                                                                       dtype=torch.float64)
    h = torch.randn(2, 3, d, generator=gen, dtype=torch.float64)
    y = torch.randint(0, V, (2, 3), generator=gen)

    def grad_and_loss(cfg):
        E = E0.clone().requires_grad_(True)
        loss, _ = objective(h @ E.T, y, cfg, E)
        (g,) = torch.autograd.grad(loss, E)
        return g, loss.detach()

    g0, l0 = grad_and_loss(LossConfig(mu_loss=0.0))
    g1, l1 = grad_and_loss(LossConfig(mu_loss=lam))
    mu = E0.mean(dim=0)
    expected = (2 * lam / V) * mu.expand(V, d)
    # float64 in, float64 arithmetic: 1e-5 relative is loose on purpose (float32 inputs pass too)
    torch.testing.assert_close(g1 - g0, expected, rtol=1e-5, atol=1e-7 * expected.abs().max().item())
    torch.testing.assert_close(l1 - l0, lam * mu.square().sum(), rtol=1e-5, atol=0)


def test_soft_capped_logits_are_c_tanh_of_the_raw_logits_and_bounded():
    c = 30.0
    cfg = ModelConfig(vocab_size=200, block_size=16, n_layer=2, n_head=2, n_embd=32, logit_softcap=c)
    torch.manual_seed(0)
    capped = GPT(cfg)
    with torch.no_grad():
        capped.lm_head.weight.mul_(1e3)  # raw logits in the hundreds to thousands
    raw_model = GPT(cfg.model_copy(update={"logit_softcap": None}))
    raw_model.load_state_dict(capped.state_dict())
    idx = torch.randint(0, 200, (2, 16), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        raw, out = raw_model(idx), capped(idx)
    assert raw.abs().max().item() > 10 * c  # far into the saturating range
    assert out.abs().max().item() <= c
    assert out.shape == raw.shape == (2, 16, 200)
    torch.testing.assert_close(out.double(), c * torch.tanh(raw.double() / c), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- the fused head loss


def head_objective_reference(raw: torch.Tensor, targets: torch.Tensor, vocab: int, kind: str,
                             softcap: float | None, z_loss: float) -> tuple[torch.Tensor, torch.Tensor]:
    """METHODS.md §2 in float64 with plain autograd: slice the real vocabulary, soft-cap, StableMax
    (by its s(x) definition, not our transform), cross-entropy and z-loss as token means."""
    u = raw.double()[..., :vocab]
    logits = softcap * torch.tanh(u / softcap) if softcap is not None else u
    if kind == "stablemax":
        s = torch.where(logits >= 0, logits + 1.0, 1.0 / (1.0 - logits.clamp(max=0)))
        t = torch.log(s)
    else:
        t = logits
    lse = _lse64(t)
    ce = (lse - t.gather(-1, targets.unsqueeze(-1)).squeeze(-1)).mean()
    return ce + z_loss * lse.square().mean(), ce


HEAD_CASES = [(kind, cap, z) for kind in ("softmax", "stablemax") for cap in (None, 4.0) for z in (0.0, 0.2)
              if not (kind == "stablemax" and z)]


@pytest.mark.parametrize("kind,softcap,z_loss", HEAD_CASES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "autograd"])
def test_head_loss_and_its_gradient_match_the_float64_definition(kind, softcap, z_loss, dtype, fused):
    """`head_loss` on padded raw outputs (64 columns, 50 real), both forms (the fused function
    with its written-out gradient, which torch.compile uses, and plain autograd), against the
    definitions in float64: the padding never takes probability, and its columns get exactly
    zero gradient."""
    gen = torch.Generator().manual_seed(11)
    B, T, V, V_pad = 3, 4, 50, 64
    raw = (6.0 * torch.randn(B, T, V_pad, generator=gen)).to(dtype)
    raw[0, 0, :3] = 0.0  # StableMax's branch point
    raw[1, 1] *= 300.0  # a row of logits in the thousands (large StableMax sums, saturated soft-cap)
    y = torch.randint(0, V, (B, T), generator=gen)
    x = raw.clone().requires_grad_(True)
    loss, ce = head_loss(x, y, V, kind, softcap, z_loss, fused=fused)
    (3.0 * loss).backward()
    x64 = raw.double().requires_grad_(True)
    ref, ce_ref = head_objective_reference(x64, y, V, kind, softcap, z_loss)
    (3.0 * ref).backward()
    # float64 is exact up to rounding; otherwise the inputs are the same and only float32
    # arithmetic differs (bf16 gradients are rounded to bf16: 2^-8 relative)
    loss_tol = 1e-12 if dtype == torch.float64 else 1e-6
    grad_tol = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 2**-8}[dtype]
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=loss_tol, atol=0)
    torch.testing.assert_close(ce.double(), ce_ref.detach(), rtol=loss_tol, atol=0)
    assert x.grad.dtype == dtype
    assert (x.grad[..., V:] == 0).all()
    scale = x64.grad.abs().max().item()
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=grad_tol, atol=grad_tol * scale)


@pytest.mark.parametrize("compiling", [True, False])
def test_the_models_training_loss_equals_the_plain_objective_on_its_logits(compiling, monkeypatch):
    """GPT.forward(idx, targets) (padded head; the fused function when torch.compile traces it,
    here forced by `is_compiling`) against its metrics path (float32 logits of the real
    vocabulary, plain autograd): same loss, same gradient for every parameter."""
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: compiling)
    cfg = ModelConfig(vocab_size=203, block_size=16, n_layer=2, n_head=2, n_embd=32, logit_softcap=3.0)
    loss_cfg = LossConfig(kind="stablemax", mu_loss=0.1)
    torch.manual_seed(0)
    model = GPT(cfg).double()
    idx = torch.randint(0, 203, (2, 16), generator=torch.Generator().manual_seed(12))
    y = torch.randint(0, 203, (2, 16), generator=torch.Generator().manual_seed(13))
    loss, ce = model(idx, y, loss_cfg)
    fused = torch.autograd.grad(loss, list(model.parameters()))
    ce_plain = token_losses(model(idx), y, "stablemax").mean()
    E = model.output_embedding()
    plain = torch.autograd.grad(ce_plain + 0.1 * E.mean(dim=0).square().sum(), list(model.parameters()))
    torch.testing.assert_close(ce, ce_plain, rtol=1e-12, atol=0)
    for a, b in zip(fused, plain):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)


# ----------------------------------------------------------------------------- OEC: centering is shift-free


def test_centering_the_output_embedding_leaves_softmax_cross_entropy_unchanged():
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=300, block_size=8, n_layer=1, n_head=2, n_embd=32))
    with torch.no_grad():
        model.output_embedding().add_(0.5 * torch.randn(32))  # a large common row, mu . h far from 0
    h = torch.randn(3, 8, 32, generator=torch.Generator().manual_seed(5))
    y = torch.randint(0, 300, (3, 8), generator=torch.Generator().manual_seed(6))
    E64 = model.output_embedding().detach().double().clone()
    with torch.no_grad():
        before = model.logits(h)
        E = model.output_embedding()
        E.sub_(E.mean(dim=0, keepdim=True))  # the Trainer's centering op (its Trainer path is tested below)
        after = model.logits(h)
    assert (before - after).abs().max().item() > 0.5  # the logits did move
    torch.testing.assert_close(F.cross_entropy(after.view(-1, 300), y.view(-1)),
                               F.cross_entropy(before.view(-1, 300), y.view(-1)), rtol=1e-5, atol=0)
    # directly in float64: CE(E h) == CE((E - mu) h)
    h64 = h.double()
    ce = F.cross_entropy((h64 @ E64.T).view(-1, 300), y.view(-1))
    ce_c = F.cross_entropy((h64 @ (E64 - E64.mean(0)).T).view(-1, 300), y.view(-1))
    torch.testing.assert_close(ce_c, ce, rtol=1e-12, atol=0)


# ----------------------------------------------------------------------------- MLRA


def _mlra_cfg(**kw) -> ModelConfig:
    mlra = kw.pop("mlra", {})
    return ModelConfig(vocab_size=100, block_size=16, n_layer=2, n_head=kw.pop("n_head", 2),
                       n_embd=kw.pop("n_embd", 32), mlra=MLRAConfig(**mlra), **kw)


def _head_matrices(attn, H: int, r: int, dh: int) -> dict[str, list[torch.Tensor]]:
    """W_h = A_h B_h (d x d_head) per low-rank input target, rebuilt from the raw weights:
    `low_rank.down.weight` stacks A_h^T per (target, head) in rows of r, `low_rank.up` holds B_h."""
    lr = attn.low_rank
    out = {}
    for i, t in enumerate(attn.low_rank_targets):
        mats = []
        for h in range(H):
            rows = slice((i * H + h) * r, (i * H + h + 1) * r)
            A = lr.down.weight[rows, :].T  # d x r
            B = lr.up[i, h]  # r x d_head
            assert A.shape == (attn.n_embd, r) and B.shape == (r, dh)
            mats.append(A @ B)
        out[t] = mats
    return out


@pytest.mark.parametrize("targets,rank", [(["q", "k", "v"], None), (["q", "k", "v", "o"], 3), (["k", "o"], 5)])
def test_mlra_heads_are_products_of_rank_r_factors(targets, rank):
    cfg = _mlra_cfg(n_head=4, n_embd=48, mlra={"enabled": True, "rank": rank, "targets": targets})
    H, dh = 4, 12
    r = rank if rank is not None else dh // 2
    torch.manual_seed(0)
    model = GPT(cfg).double()
    attn = model.blocks[0].attn
    x = torch.randn(2, 5, 48, dtype=torch.float64)
    heads = attn.qkv(x)  # (B, H, T, d_head) per target
    mats = _head_matrices(attn, H, r, dh)
    assert sorted(mats) == sorted(t for t in targets if t != "o")
    for t, Ws in mats.items():
        for h, W in enumerate(Ws):
            torch.testing.assert_close(heads[t][:, h], x @ W, rtol=1e-10, atol=1e-12)  # the module computes x A_h B_h
            assert torch.linalg.matrix_rank(W).item() == r < dh
    for t in "qkv":
        if t not in targets:  # dense heads stay full rank (what the rank check would see without MLRA)
            W = attn.dense.weight[attn.dense_targets.index(t) * 48:][:48].T  # d x d
            assert torch.linalg.matrix_rank(W[:, :dh]).item() == dh
    if "o" in targets:
        assert isinstance(attn.c_proj, LowRankOut)
        y = torch.randn(2, 5, 48, dtype=torch.float64)
        expected = torch.zeros(2, 5, 48, dtype=torch.float64)
        for h in range(H):
            C = attn.c_proj.down[h]  # d_head x r
            D = attn.c_proj.up.weight[:, h * r:(h + 1) * r].T  # r x d
            W = C @ D
            assert torch.linalg.matrix_rank(W).item() == r
            expected += y[..., h * dh:(h + 1) * dh] @ W
        if attn.c_proj.up.bias is not None:
            expected += attn.c_proj.up.bias
        torch.testing.assert_close(attn.c_proj(y), expected, rtol=1e-10, atol=1e-12)
    else:
        assert isinstance(attn.c_proj, torch.nn.Linear) and not isinstance(attn.c_proj, LowRankOut)


def test_baseline_heads_are_full_rank():
    torch.manual_seed(0)
    attn = GPT(_mlra_cfg()).blocks[0].attn
    assert attn.low_rank is None
    Wq = attn.dense.weight[:32].T  # d x d, head h = columns h*16:(h+1)*16
    for h in range(2):
        assert torch.linalg.matrix_rank(Wq[:, h * 16:(h + 1) * 16].double()).item() == 16


@pytest.mark.parametrize("mlra", [{}, {"enabled": True}, {"enabled": True, "targets": ["q", "k", "v", "o"], "rank": 4}],
                         ids=["baseline", "mlra-qkv", "mlra-qkvo"])
def test_shapes_and_causality(mlra):
    torch.manual_seed(0)
    model = GPT(_mlra_cfg(mlra=mlra)).eval()
    base = GPT(_mlra_cfg()).eval()
    idx = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(1))
    changed = idx.clone()
    changed[:, 10] = (changed[:, 10] + 1) % 100
    with torch.no_grad():
        a, b = model(idx), model(changed)
        assert a.shape == base(idx).shape == (2, 16, 100)
    torch.testing.assert_close(a[:, :10], b[:, :10], rtol=0, atol=1e-6)  # earlier positions unaffected
    assert (a[:, 10:] - b[:, 10:]).abs().max().item() > 1e-4  # later ones do see the change


# Parameters of one attention layer, counted by hand (d = n_embd, H heads, d_head = d / H, rank r):
# dense projection d*d (+ d bias); low-rank input projection H*(d*r + r*d_head) (no bias);
# low-rank output projection H*(d_head*r + r*d) (+ d bias).
PARAM_CASES = [
    # baseline d=32: q, k, v, o dense, no bias: 4 * 32*32
    (dict(n_embd=32, n_head=2), 4 * 1024),
    # d=32, H=2, d_head=16, r=8 (default d_head/2), q k v low rank: 3 * 2*(32*8 + 8*16) = 3*768; o dense 1024
    (dict(n_embd=32, n_head=2, mlra={"enabled": True}), 3 * 768 + 1024),
    # d=48, H=4, d_head=12, r=3, q k v o low rank, bias: 3 * 4*(48*3 + 3*12) + 4*(12*3 + 3*48) + 48
    (dict(n_embd=48, n_head=4, bias=True, mlra={"enabled": True, "rank": 3, "targets": ["q", "k", "v", "o"]}),
     3 * 720 + 720 + 48),
    # d=32, H=4, d_head=8, r=2, q and v low rank, k and o dense, bias: 2 * 4*(32*2 + 2*8) + 2 * (32*32 + 32)
    (dict(n_embd=32, n_head=4, bias=True, mlra={"enabled": True, "rank": 2, "targets": ["q", "v"]}),
     2 * 320 + 2 * 1056),
]


@pytest.mark.parametrize("kw,expected", PARAM_CASES, ids=["baseline", "mlra-qkv", "mlra-qkvo-bias", "mlra-qv-bias"])
def test_attention_parameter_count_by_hand(kw, expected):
    cfg = _mlra_cfg(**copy.deepcopy(kw))
    assert attention_params_by_hand(cfg) == expected
    model = GPT(cfg)
    for block in model.blocks:
        assert sum(p.numel() for p in block.attn.parameters()) == expected


# ----------------------------------------------------------------------------- tiny corpus and runs

VARIANTS = {  # METHODS.md §2, as config overlays
    "baseline": {},
    "mlra": {"model": {"mlra": {"enabled": True}}},
    "oec_center": {"post_step": {"mu_centering": True}},
    "oec_loss": {"loss": {"mu_loss": 1e-4}},
    "zloss": {"loss": {"z_loss": 1e-4}},
    "softcap": {"model": {"logit_softcap": 30.0}},
    "stablemax": {"loss": {"kind": "stablemax"}},
    "perpgrad": {"optim": {"perpgrad": True}},
    "spam": {"optim": {"name": "spam"}},
    "adamw": {"optim": {"name": "adamw"}},  # only for the conflict check
}

WORDS = ("the a one king queen knight horse sword crown castle night morning rides sleeps sings "
         "fights loves sees quickly slowly softly and but then red old young bright dark").split()


def _markov_text(rng: random.Random, n_words: int) -> str:
    """Learnable text: each word is followed by one of three fixed successors."""
    succ = {w: [WORDS[(i * 7 + k * 3 + 1) % len(WORDS)] for k in range(3)] for i, w in enumerate(WORDS)}
    w, out = rng.choice(WORDS), []
    for i in range(n_words):
        out.append(w)
        if i % 12 == 11:
            out[-1] += "."
        w = rng.choice(succ[w])
    return " ".join(out)


@pytest.fixture(scope="module")
def variant_shards(tmp_path_factory) -> str:
    from stabilab.corpus import read_split, write_split
    from stabilab.shards import write_shards
    from stabilab.tokenizer import train_bpe

    root = tmp_path_factory.mktemp("variant_shards")
    rng = random.Random(0)
    (root / "text").mkdir()
    for i in range(20):
        (root / "text" / f"doc{i:02d}.txt").write_text(_markov_text(rng, 400))
    write_split({"source": "text", "paths": [str(root / "text")], "val_fraction": 0.15}, root / "corpus")
    tok = train_bpe(read_split(root / "corpus" / "train.jsonl.gz"), 300)
    write_shards(tok, {s: root / "corpus" / f"{s}.jsonl.gz" for s in ("train", "val")}, root / "shards")
    return str(root / "shards")


def _experiment(tied: bool, variants: dict | None = None) -> dict:
    return {
        "model": {"n_layer": 2, "n_embd": 32, "n_head": 2, "block_size": 32, "tie_embeddings": tied},
        "optim": {"lr": 1e-2, "warmup_steps": 5},
        "train": {"steps": 40, "batch_size": 8, "eval_every": 40, "eval_batches": 1, "log_every": 10,
                  "metrics_every": 20, "checkpoint_every": 1000, "dtype": "float32"},
        "loss": {}, "post_step": {},
        "tokenizer": {"kind": "bpe", "vocab_size": 300},
        "variants": VARIANTS if variants is None else variants,
        "studies": {"t": {"overrides": {}}},
    }


def resolve_run(experiment: dict, study: str, variant: str, depth: int, lr: float, seed: int, shards: str) -> dict:
    return run_config(experiment, Run(study, variant, depth, lr, seed), shards)


def _run_config(shards: str, variant: str, tied: bool, variants: dict | None = None):
    return load_run_config(resolve_run(_experiment(tied, variants), "t", variant, depth=2, lr=1e-2, seed=0,
                                       shards=shards))


def _features(cfg, trainer: Trainer | None = None) -> dict[str, bool]:
    """Which of the §2 methods a resolved config (and, if given, its built Trainer) really has."""
    f = {
        "mlra": cfg.model.mlra.enabled,
        "oec_center": cfg.post_step.mu_centering,
        "oec_loss": cfg.loss.mu_loss > 0,
        "zloss": cfg.loss.z_loss > 0,
        "softcap": cfg.model.logit_softcap is not None,
        "stablemax": cfg.loss.kind == "stablemax",
        "perpgrad": cfg.optim.perpgrad,
        "spam": cfg.optim.name == "spam",
    }
    if trainer is not None:
        opt = trainer.opt
        assert isinstance(opt, PerpGrad) == f["perpgrad"]
        base = opt.base if isinstance(opt, PerpGrad) else opt
        assert isinstance(base, SPAM) == f["spam"] and isinstance(base, torch.optim.AdamW) == (not f["spam"])
        assert any(isinstance(m, LowRankHeads) for m in trainer.model.modules()) == f["mlra"]
        assert trainer.model.cfg.logit_softcap == (30.0 if f["softcap"] else None)
        assert (trainer.model.lm_head.weight is trainer.model.wte.weight) == cfg.model.tie_embeddings
    return f


RUNS = ["baseline", "mlra", "oec_center", "oec_loss", "zloss", "softcap", "stablemax", "perpgrad", "spam",
        "mlra+oec_center", "stablemax+spam"]


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("variant", RUNS)
def test_every_variant_trains_with_falling_loss(variant_shards, tmp_path, variant, tied):
    cfg = _run_config(variant_shards, variant, tied)
    trainer = Trainer(cfg, tmp_path / "run")
    features = _features(cfg, trainer)
    assert {k for k, on in features.items() if on} == set(variant.split("+")) - {"baseline"}
    summary = trainer.run()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    first, last = records[0], records[-1]
    assert first["step"] == 1 and last["step"] == 40
    assert not summary["diverged"]
    assert all(math.isfinite(r["train_loss"]) for r in records)
    assert first["train_loss"] == pytest.approx(math.log(300), abs=0.3)  # ~uniform at init
    assert last["train_loss"] < first["train_loss"] - 1.0, (first["train_loss"], last["train_loss"])
    assert summary["final_val_loss"] < first["train_loss"] - 0.5
    if features["spam"]:  # the clipped fraction is logged on measuring steps
        fracs = [r["spam_clipped_frac"] for r in records if "spam_clipped_frac" in r]
        assert fracs and all(0.0 <= f <= 1.0 for f in fracs)
        base = trainer.opt.base if isinstance(trainer.opt, PerpGrad) else trainer.opt
        assert base.param_groups[0]["spam_step"] == 40
    if features["oec_center"]:
        assert trainer.model.output_embedding().detach().double().mean(0).abs().max().item() < 1e-7


# ----------------------------------------------------------------------------- mu-centering in the Trainer


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_trainer_mu_centering_zeroes_the_row_mean_after_every_step(variant_shards, tmp_path, tied):
    centered = Trainer(_run_config(variant_shards, "oec_center", tied), tmp_path / "c")
    plain = Trainer(_run_config(variant_shards, "baseline", tied), tmp_path / "b")
    V = centered.cfg.model.vocab_size
    assert centered.model.lm_head.weight.shape[0] > V  # padded rows exist and must not enter the mean
    for step in range(6):
        centered.train_step(measure=False)
        plain.train_step(measure=False)
        E = centered.model.output_embedding().detach().double()
        assert E.shape[0] == V
        assert E.mean(dim=0).abs().max().item() < 1e-7, f"step {step + 1}"
        if tied:  # the same matrix: wte's real rows are centered too
            assert centered.model.wte.weight[:V].detach().double().mean(0).abs().max().item() < 1e-7
        # without centering the mean is far from zero (the check above is not vacuous)
        assert plain.model.output_embedding().detach().double().mean(0).abs().max().item() > 1e-4
        if step == 0:
            # centering touches the weights only, not the optimizer moments: after the first step
            # (same init, same batch, same gradient) both runs hold the same moments
            for key in ("exp_avg", "exp_avg_sq"):
                torch.testing.assert_close(centered.opt.state[centered.model.lm_head.weight][key],
                                           plain.opt.state[plain.model.lm_head.weight][key], rtol=0, atol=0)


# ----------------------------------------------------------------------------- composition rules


def test_combining_variants_that_set_the_same_key_differently_is_refused(variant_shards):
    with pytest.raises(UserError, match="both set"):
        variant_overlay("adamw+spam", VARIANTS)
    with pytest.raises(UserError, match="both set"):
        resolve_run(_experiment(True), "t", "spam+adamw", depth=2, lr=1e-2, seed=0, shards=variant_shards)
    # setting the same key to the same value is no conflict
    assert variant_overlay("spam+spam", VARIANTS) == {"optim": {"name": "spam"}}


def test_stablemax_with_zloss_is_refused(variant_shards):
    run = resolve_run(_experiment(True), "t", "stablemax+zloss", depth=2, lr=1e-2, seed=0, shards=variant_shards)
    with pytest.raises(UserError, match="stablemax"):
        load_run_config(run)


def test_compatible_combinations_merge_both_overlays(variant_shards):
    cfg = _run_config(variant_shards, "mlra+oec_center", True)
    assert cfg.model.mlra.enabled and cfg.post_step.mu_centering and cfg.optim.name == "adamw"
    cfg = _run_config(variant_shards, "stablemax+spam", False)
    assert cfg.loss.kind == "stablemax" and cfg.optim.name == "spam" and not cfg.model.tie_embeddings


def test_each_declared_method_switches_on_exactly_its_feature(variant_shards):
    """methods.py declares every method once: its overlay, resolved through the experiment (with
    no `variants:` of its own), switches on that method's feature and nothing else, and the
    declaration's `active()` agrees."""
    assert builtin_variants()["baseline"] == {}
    for method in METHODS:
        if method.role != "method":
            continue
        cfg = _run_config(variant_shards, method.name, True, variants={})
        on = {k for k, v in _features(cfg).items() if v}
        assert on == {method.name}, (method.name, on)
        assert [m.name for m in METHODS if m.active(cfg)] == [method.name]
