"""SPAM and perpGrad (⊥Grad) against independent references (METHODS.md §2).

References: the papers' formulas written out here in float64, and `pytorch_optimizer`
(>= 4.0) `SPAM` / `OrthoGrad` as oracles. Every comparison states its tolerance and why.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from stabilab.config import ModelConfig, OptimConfig, SPAMConfig
from stabilab.model import GPT
from stabilab.optim import SPAM, PerpGrad, build_optimizer, orthogonalize_gradients_

pytorch_optimizer = pytest.importorskip("pytorch_optimizer")
import pytorch_optimizer.optimizer.spam as po_spam  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def warmup_multiplier(k: int, n_warmup: int) -> float:
    """SPAM paper / official code: 1 - 0.99 * (1 + cos(pi k / (N + 1))) / 2 for k < N, else 1."""
    if k >= n_warmup:
        return 1.0
    return 1.0 - 0.99 * 0.5 * (1.0 + math.cos(math.pi * k / (n_warmup + 1)))


# ----------------------------------------------------------------------------- perpGrad


def reference_perp(w: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """METHODS.md §2 in float64: g_perp = g - (w.g / (w.w + 1e-30)) w, rescaled to ||g||."""
    w, g = w.double().reshape(-1), g.double().reshape(-1)
    perp = g - (w @ g) / (w @ w + 1e-30) * w
    return perp * g.norm() / (perp.norm() + 1e-30)


def test_orthogonalized_gradients_are_orthogonal_keep_their_norm_and_match_the_formula():
    gen = torch.Generator().manual_seed(0)
    shapes = [(17, 9), (33,), (4, 5, 6), (64, 64)]
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    for p in params:
        # a gradient with a large component along the weight, so the projection matters
        p.grad = 3.0 * p.detach() + torch.randn(p.shape, generator=gen)
    zero_w = torch.nn.Parameter(torch.zeros(5))  # w = 0: nothing to project out, g stays
    zero_w.grad = torch.randn(5, generator=gen)
    no_grad = torch.nn.Parameter(torch.randn(3, generator=gen))  # grad None: skipped
    before = [p.grad.clone() for p in params] + [zero_w.grad.clone()]
    for p, g in zip(params, before):
        if p.numel() > 1:  # the input gradient is far from orthogonal
            assert abs(torch.dot(p.detach().reshape(-1), g.reshape(-1))) > 0.5 * p.norm() * g.norm()

    orthogonalize_gradients_(params + [zero_w, no_grad])

    assert no_grad.grad is None
    for p, g0 in zip(params + [zero_w], before):
        w, g = p.detach().double().reshape(-1), p.grad.double().reshape(-1)
        if p.numel() > 1:
            # float32 arithmetic: |cos(w, g)| of a few 1e-7 is rounding; 1e-5 catches any leftover projection
            assert abs(w @ g) <= 1e-5 * w.norm() * g.norm()
        # the norm is restored (float32: 1e-6 relative)
        torch.testing.assert_close(g.norm(), g0.double().norm(), rtol=1e-6, atol=0)
        # and the whole vector is the formula's, to float32 precision
        torch.testing.assert_close(g, reference_perp(p.detach(), g0), rtol=1e-5, atol=1e-6 * g0.norm().item())
    torch.testing.assert_close(zero_w.grad, before[-1], rtol=1e-6, atol=0)


def _tiny_gpt(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(ModelConfig(vocab_size=64, block_size=8, n_layer=2, n_head=2, n_embd=16))


def _groups(model: torch.nn.Module, wd: float) -> list[dict]:
    params = list(model.parameters())
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": wd},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


def test_perpgrad_adamw_matches_pytorch_optimizer_orthograd_over_20_steps():
    """Same model, data and AdamW settings: our PerpGrad (through build_optimizer) vs OrthoGrad.

    Tolerance: both run in float32 and only reduce in different orders, so parameters agree to
    rounding; Adam divides by sqrt(v) and can magnify a 1e-7 gradient difference for tiny-v
    elements, so we allow 1e-5 absolute (lr = 1e-2: 0.1 % of one step) and check that the
    trajectories moved ~100x further than that. A missing rescale or projection breaks it at step 1.
    """
    lr, wd, steps = 1e-2, 0.1, 20
    ours = _tiny_gpt()
    ref = copy.deepcopy(ours)
    start = [p.detach().clone() for p in ours.parameters()]
    opt = build_optimizer(ours, OptimConfig(name="adamw", lr=lr, betas=[0.9, 0.95], eps=1e-8, weight_decay=wd,
                                            perpgrad=True), torch.device("cpu"))
    assert isinstance(opt, PerpGrad) and isinstance(opt.base, torch.optim.AdamW)
    oracle = pytorch_optimizer.OrthoGrad(torch.optim.AdamW(_groups(ref, wd), lr=lr, betas=(0.9, 0.95), eps=1e-8))
    plain = copy.deepcopy(ours)  # AdamW without perpGrad: must end up far from both
    plain_opt = torch.optim.AdamW(_groups(plain, wd), lr=lr, betas=(0.9, 0.95), eps=1e-8)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randint(0, 64, (4, 8), generator=gen)
        y = torch.randint(0, 64, (4, 8), generator=gen)
        for model, o in ((ours, opt), (ref, oracle), (plain, plain_opt)):
            o.zero_grad(set_to_none=True)
            F.cross_entropy(model(x).reshape(-1, 64), y.reshape(-1)).backward()
            o.step()
    moved = max((p.detach() - s).abs().max().item() for p, s in zip(ours.parameters(), start))
    assert moved > 1e-3
    for (name, p), q in zip(ours.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=0, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")
    diff_plain = max((p.detach() - q.detach()).abs().max().item()
                     for p, q in zip(ours.parameters(), plain.parameters()))
    assert diff_plain > 1e-3  # perpGrad changed the trajectory, so the agreement above means something


# ----------------------------------------------------------------------------- SPAM vs pytorch-optimizer


class _ClosedFormCosineDecay:
    """The official SPAM code's warmup (closed-form `CosineAnnealingLR.step(k)`): 0.99 * (1 + cos(pi k/(N+1)))/2.

    pytorch-optimizer 4.x steps its CosineAnnealingLR recursively and ends up one step ahead
    (death rate at k is the formula's at k + 1); this shim swaps only that piece of the oracle.
    """

    def __init__(self, death_rate: float, t_max: int, eta_min: float = 0.0, last_epoch: int = -1):
        self.death_rate, self.t_max, self.eta_min = death_rate, t_max, eta_min

    def get_death_rate(self, current_step: int) -> float:
        if current_step >= self.t_max:
            return self.eta_min
        return self.death_rate * 0.5 * (1.0 + math.cos(math.pi * current_step / (self.t_max + 1)))

    def state_dict(self) -> dict:
        return {}


SHAPES = [(8, 6), (6,), (4, 3, 2)]
LR, BETAS, EPS, WD = 1e-2, (0.9, 0.99), 1e-8, 0.1
THETA, GAP, N_WARM, GRACE = 5000.0, 100, 30, 20
# (step, param index, element, factor): spikes past the grace period (clipped) and one within
# the grace period after the reset at 100 (step 110: not clipped).
SPIKES = [(45, 0, (2, 3), 1e3), (45, 2, (1, 1, 0), -1e3), (110, 0, (0, 0), 1e3), (150, 1, (4,), 1e3),
          (230, 0, (7, 5), -1e3), (299, 2, (3, 2, 1), 1e3)]


def _spam_pair(oracle_warmup_closed_form: bool, monkeypatch):
    gen = torch.Generator().manual_seed(0)
    init = [torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES]
    ours = [torch.nn.Parameter(t.clone()) for t in init]
    ref = [torch.nn.Parameter(t.clone()) for t in init]
    opt = SPAM(ours, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, threshold=THETA, reset_interval=GAP,
               warmup=N_WARM, grace=GRACE)
    if oracle_warmup_closed_form:
        monkeypatch.setattr(po_spam, "CosineDecay", _ClosedFormCosineDecay)
    oracle = pytorch_optimizer.SPAM(ref, lr=LR, betas=BETAS, density=1.0, weight_decay=WD, warmup_epoch=N_WARM,
                                    threshold=int(THETA), grad_accu_steps=GRACE, update_proj_gap=GAP, eps=EPS)
    return ours, ref, opt, oracle


def _drive(ours, ref, opt, oracle, steps: int, on_step=None):
    """Quadratic-bowl gradients plus noise, with the SPIKES injected; the same grads for both."""
    gen = torch.Generator().manual_seed(1)
    targets = [torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES]
    for n in range(1, steps + 1):
        noise = [0.3 * torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES]
        for params in (ours, ref):
            for p, t, e in zip(params, targets, noise):
                p.grad = (p.detach() - t) + e
            for step, i, idx, factor in SPIKES:
                if step == n:
                    params[i].grad[idx] *= factor
        opt.step()
        oracle.step()
        if on_step is not None:
            on_step(n)


def test_spam_matches_pytorch_optimizer_with_official_warmup(monkeypatch):
    """300 steps, resets at 100/200/300, warmups of N = 30, spikes in and out of the grace periods.

    float64 parameters and the same clipping rule, so the only differences are rounding (clamp
    vs where, foreach order): 1e-10 relative. The oracle's warmup is the official closed form.
    """
    ours, ref, opt, oracle = _spam_pair(True, monkeypatch)
    trace = {}

    def check(n):
        for p, q in zip(ours, ref):
            torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-10, atol=1e-12, msg=lambda m: f"step {n}: {m}")
        trace[n] = ours[0].detach().clone()

    _drive(ours, ref, opt, oracle, 300, check)
    assert opt.param_groups[0]["spam_step"] == 300


def test_spam_matches_unmodified_pytorch_optimizer(monkeypatch):
    """Against the oracle as shipped: identical (1e-10) until the first reset at step 100; after
    it, pytorch-optimizer's warmup runs one step ahead (its multiplier at k is the formula's at
    k + 1), which adds about sum_k [f(k+1) - f(k)] ~ 0.99 of one Adam step of size lr per reset,
    i.e. |dp| <~ 1e-2 per reset here before weight decay shrinks it. Tolerance: 3 * lr * resets.
    """
    ours, ref, opt, oracle = _spam_pair(False, monkeypatch)
    worst = {}

    def check(n):
        d = max((p.detach() - q.detach()).abs().max().item() for p, q in zip(ours, ref))
        worst[n] = d
        if n < GAP:
            assert d <= 1e-10 * max(p.detach().abs().max().item() for p in ref), f"step {n}: {d}"
        else:
            assert d <= 3 * LR * (n // GAP), f"step {n}: {d}"

    _drive(ours, ref, opt, oracle, 300, check)
    assert worst[GAP] > 0  # the documented difference shows up at the reset (the check is not vacuous)


# ----------------------------------------------------------------------------- SPAM mechanics by hand


def _spam(params, **kw):
    args = dict(lr=LR, betas=BETAS, eps=EPS, weight_decay=0.0, threshold=THETA, reset_interval=GAP,
                warmup=N_WARM, grace=GRACE)
    args.update(kw)
    return SPAM(params, **args)


def _small_steps(params, opt, steps, gen, scale=0.01):
    for _ in range(steps):
        for p in params:
            p.grad = scale * torch.randn(p.shape, generator=gen, dtype=p.dtype)
        opt.step()


def _params(dtype=torch.float64):
    gen = torch.Generator().manual_seed(3)
    return [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=dtype)) for s in SHAPES]


def test_moments_reset_exactly_at_multiples_of_the_interval_and_step_count_is_kept():
    params = _params()
    opt = _spam(params)
    gen = torch.Generator().manual_seed(4)
    _small_steps(params, opt, GAP - 1, gen)
    m_prev = opt.state[params[0]]["exp_avg"].clone()
    assert m_prev.abs().min() > 0  # there is an old moment to forget
    grads = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]
    before = [p.detach().clone() for p in params]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    opt.step()  # step n = GAP: reset, then k = 0 of the warmup
    b1, b2 = BETAS
    bias = math.sqrt(1 - b2**GAP) / (1 - b1**GAP)  # the bias-correction count is NOT reset
    for p, g, p0 in zip(params, grads, before):
        m, v = opt.state[p]["exp_avg"], opt.state[p]["exp_avg_sq"]
        torch.testing.assert_close(m, (1 - b1) * g, rtol=1e-15, atol=0)
        torch.testing.assert_close(v, (1 - b2) * g * g, rtol=1e-15, atol=0)
        # displacement: lr * multiplier(k=0) = lr * 0.01, with the global step's bias correction
        expected = -LR * warmup_multiplier(0, N_WARM) * bias * m / (v.sqrt() + EPS)
        torch.testing.assert_close(p.detach() - p0, expected, rtol=1e-9, atol=1e-15)
    # one step later the moments are an ordinary EMA again (no second reset)
    g = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]
    m_prev = opt.state[params[0]]["exp_avg"].clone()
    for p, gi in zip(params, g):
        p.grad = gi.clone()
    opt.step()
    torch.testing.assert_close(opt.state[params[0]]["exp_avg"], b1 * m_prev + (1 - b1) * g[0], rtol=1e-14, atol=0)


def test_lr_multiplier_follows_the_cosine_warmup_after_each_reset():
    params = _params()
    opt = _spam(params)
    assert opt.lr_multiplier(1) == 1.0 and opt.lr_multiplier(50) == 1.0  # no reset yet: no warmup
    gen = torch.Generator().manual_seed(5)
    _small_steps(params, opt, GAP, gen)  # the reset happens at step GAP
    for k in range(N_WARM + 3):
        assert opt.lr_multiplier(GAP + k) == pytest.approx(warmup_multiplier(k, N_WARM), rel=1e-12, abs=1e-15)
    assert opt.lr_multiplier(GAP) == pytest.approx(0.01, rel=1e-12)
    start = SPAM(_params(), warmup=N_WARM, warmup_at_start=True)
    for n in (1, 10, N_WARM - 1, N_WARM, N_WARM + 5):
        assert start.lr_multiplier(n) == pytest.approx(warmup_multiplier(n, N_WARM), rel=1e-12)


@pytest.mark.parametrize("k_after_reset", [1, 7, N_WARM - 1, N_WARM, N_WARM + 4])
def test_parameter_displacement_after_a_reset_scales_by_the_multiplier(k_after_reset):
    params = _params()
    opt = _spam(params)
    gen = torch.Generator().manual_seed(6)
    _small_steps(params, opt, GAP + k_after_reset - 1, gen)
    n = GAP + k_after_reset
    before = [p.detach().clone() for p in params]
    _small_steps(params, opt, 1, gen)
    b1, b2 = BETAS
    bias = math.sqrt(1 - b2**n) / (1 - b1**n)
    for p, p0 in zip(params, before):
        m, v = opt.state[p]["exp_avg"], opt.state[p]["exp_avg_sq"]
        expected = -LR * warmup_multiplier(k_after_reset, N_WARM) * bias * m / (v.sqrt() + EPS)
        torch.testing.assert_close(p.detach() - p0, expected, rtol=1e-9, atol=1e-15)


def _spike_step(n_before: int, reset_interval: int = 1000):
    """Run `n_before` small-gradient steps, then one step with spikes of both signs.

    Returns the params, the optimizer, the grads of the spike step, (m, v) before it.
    """
    params = _params()
    opt = _spam(params, reset_interval=reset_interval)
    gen = torch.Generator().manual_seed(7)
    _small_steps(params, opt, n_before, gen)
    grads = [0.01 * torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]
    grads[0][1, 2] = 50.0     # huge positive
    grads[0][5, 0] = -30.0    # huge negative
    grads[0][3, 3] = 1e3      # another one in the same tensor
    grads[2][0, 1, 1] = -80.0
    prev = [(opt.state[p]["exp_avg"].clone(), opt.state[p]["exp_avg_sq"].clone()) for p in params]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    return params, opt, grads, prev


def test_spike_is_clipped_to_sign_times_sqrt_theta_v_prev_and_counted():
    params, opt, grads, prev = _spike_step(n_before=25)  # step 26: past the grace period
    b1, b2 = BETAS
    opt.count_clipped = True
    opt.step()
    n_clipped = 0
    for p, g, (m_prev, v_prev) in zip(params, grads, prev):
        spike = g * g > THETA * v_prev  # the paper's criterion on the un-bias-corrected v_prev
        n_clipped += int(spike.sum())
        g_c = torch.where(spike, torch.sign(g) * torch.sqrt(THETA * v_prev), g)
        torch.testing.assert_close(opt.state[p]["exp_avg"], b1 * m_prev + (1 - b1) * g_c, rtol=1e-13, atol=0)
        torch.testing.assert_close(opt.state[p]["exp_avg_sq"], b2 * v_prev + (1 - b2) * g_c * g_c,
                                   rtol=1e-13, atol=0)
    assert n_clipped == 4  # exactly the four injected spikes, nothing else
    total = sum(p.numel() for p in params)
    assert opt.clipped_fraction.item() == pytest.approx(n_clipped / total, rel=1e-6)
    # the clipped value really differs from the spike (a non-clipping optimizer fails above)
    assert (opt.state[params[0]]["exp_avg"][1, 2] - b1 * prev[0][0][1, 2]).item() < 0.1 * (1 - b1) * 50.0
    assert (opt.state[params[0]]["exp_avg"][5, 0] - b1 * prev[0][0][5, 0]).item() < 0  # sign kept


@pytest.mark.parametrize("n_before,reset_interval", [(5, 1000), (GAP + 4, GAP)],
                         ids=["grace-after-start", "grace-after-reset"])
def test_no_clipping_within_the_grace_period(n_before, reset_interval):
    params, opt, grads, prev = _spike_step(n_before, reset_interval)
    b1, b2 = BETAS
    assert (n_before + 1) % reset_interval != 0  # the spike step is no reset step: moments carry over
    assert (grads[0][1, 2] ** 2 > THETA * prev[0][1][1, 2]).item()  # it would be clipped outside the grace period
    opt.count_clipped = True
    opt.step()
    for p, g, (m_prev, v_prev) in zip(params, grads, prev):
        torch.testing.assert_close(opt.state[p]["exp_avg"], b1 * m_prev + (1 - b1) * g, rtol=1e-13, atol=0)
        torch.testing.assert_close(opt.state[p]["exp_avg_sq"], b2 * v_prev + (1 - b2) * g * g, rtol=1e-13, atol=0)
    frac = opt.clipped_fraction
    assert frac is None or frac.item() == 0.0


def test_spam_through_build_optimizer_uses_the_config():
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=64, block_size=8, n_layer=1, n_head=2, n_embd=16))
    cfg = OptimConfig(name="spam", lr=2e-3, betas=[0.8, 0.9], eps=1e-7, weight_decay=0.05,
                      spam=SPAMConfig(threshold=123.0, reset_interval=77, warmup=11, grace=9))
    opt = build_optimizer(model, cfg, torch.device("cpu"))
    assert isinstance(opt, SPAM)
    assert (opt.threshold, opt.reset_interval, opt.warmup, opt.grace) == (123.0, 77, 11, 9)
    assert opt.param_groups[0]["lr"] == 2e-3 and tuple(opt.param_groups[0]["betas"]) == (0.8, 0.9)
    assert opt.param_groups[0]["eps"] == 1e-7
    decay = {id(p) for g in opt.param_groups if g["weight_decay"] == 0.05 for p in g["params"]}
    assert id(model.lm_head.weight) in decay and id(model.ln_f.weight) not in decay
    wrapped = build_optimizer(model, OptimConfig(name="spam", perpgrad=True), torch.device("cpu"))
    assert isinstance(wrapped, PerpGrad) and isinstance(wrapped.base, SPAM)


# ----------------------------------------------------------------------------- the compiled updates


def test_compiled_spam_and_perpgrad_updates_equal_the_eager_ones():
    """`compile=True` (the GPU fast path) runs the same per-tensor update through torch.compile:
    30 steps with spikes, resets, warmups and clipped-fraction counting give the eager result
    (float32; fused kernels may round differently: 1e-6 relative)."""
    gen = torch.Generator().manual_seed(21)
    shapes = [(30, 20), (20,), (7, 3, 5)]
    eager_p = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    compiled_p = [torch.nn.Parameter(p.detach().clone()) for p in eager_p]

    def build(params, compile):
        groups = [{"params": [params[0], params[2]], "weight_decay": 0.1}, {"params": [params[1]], "weight_decay": 0.0}]
        return PerpGrad(SPAM(groups, lr=1e-2, reset_interval=7, warmup=3, grace=2, threshold=2.0, compile=compile),
                        compile=compile)

    eager, compiled = build(eager_p, False), build(compiled_p, True)
    fractions = []
    for n in range(30):
        for p, q in zip(eager_p, compiled_p):
            g = torch.randn(p.shape, generator=gen) * (50.0 if n % 5 == 0 else 1.0)
            p.grad, q.grad = g.clone(), g.clone()
        eager.count_clipped = compiled.count_clipped = n % 3 == 0
        eager.step()
        compiled.step()
        if n % 3 == 0:
            fractions.append((eager.clipped_fraction.item(), compiled.clipped_fraction.item()))
    assert any(a > 0 for a, _ in fractions)  # clipping did happen
    assert [a for a, _ in fractions] == [b for _, b in fractions]
    for p, q in zip(eager_p, compiled_p):
        torch.testing.assert_close(q.detach(), p.detach(), rtol=1e-6, atol=1e-6)
