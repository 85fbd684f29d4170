"""The papers' model-family options (METHODS.md §1b), each against its definition: RoPE, qk-norm,
SwiGLU, RMSNorm, biases, a float32 output layer, the OEC init, independent weight decay, and
causality and parameter counts for every combination."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from stabilab.config import ModelConfig, OptimConfig, load_run_config
from stabilab.layers import Rotary, mlp_hidden
from stabilab.losses import head_loss
from stabilab.model import GPT, params_by_hand
from stabilab.optim import build_optimizer, lr_at

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def small(**kw) -> ModelConfig:
    return ModelConfig(**{"vocab_size": 100, "block_size": 16, "n_layer": 2, "n_head": 2, "n_embd": 32, **kw})


def test_rope_scores_depend_only_on_relative_position():
    """With the same q at every position and the same k at every position, the score matrix of
    the rotated sequences is Toeplitz: S[m, n] depends on m - n alone (float64)."""
    gen = torch.Generator().manual_seed(0)
    for dims, d_head in [(8, 8), (4, 8), (28, 56)]:
        rope = Rotary(dims, block_size=24, base=10000.0)
        q = torch.randn(d_head, generator=gen, dtype=torch.float64).expand(1, 1, 24, d_head)
        k = torch.randn(d_head, generator=gen, dtype=torch.float64).expand(1, 1, 24, d_head)
        rq, rk = rope(q), rope(k)
        scores = (rq @ rk.transpose(-1, -2))[0, 0]
        for m in range(23):
            for n in range(23):
                assert scores[m + 1, n + 1].item() == pytest.approx(scores[m, n].item(), rel=1e-12, abs=1e-12)
        # positions matter (the check is not vacuous), and the unrotated dims pass through
        assert abs(scores[5, 0].item() - scores[0, 0].item()) > 1e-6
        assert torch.equal(rq[..., dims:], q[..., dims:])
        assert torch.allclose(rq.norm(dim=-1), q.norm(dim=-1), rtol=1e-12)  # a rotation


def test_rope_matches_the_complex_number_definition():
    """Pair (x_2i, x_2i+1) as x_2i + i x_2i+1, multiplied by exp(i pos base^(-2i/dims))."""
    x = torch.randn(1, 1, 10, 8, dtype=torch.float64)
    out = Rotary(8, 10, 500.0)(x)
    z = torch.view_as_complex(x.reshape(1, 1, 10, 4, 2).contiguous())
    theta = torch.arange(10, dtype=torch.float64)[:, None] * 500.0 ** (-torch.arange(0, 8, 2, dtype=torch.float64) / 8)
    expected = torch.view_as_real(z * torch.polar(torch.ones_like(theta), theta)).reshape(1, 1, 10, 8)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", ["layernorm", "rmsnorm"])
def test_qk_norm_bounds_every_attention_logit(kind):
    """|q.k| / sqrt(d_head) <= max|g_q| max|g_k| sqrt(d_head) however large the projections."""
    torch.manual_seed(0)
    cfg = small(qk_norm=kind, position="rope", n_embd=64, n_head=4)
    model = GPT(cfg).double()
    with torch.no_grad():
        for block in model.blocks:
            block.attn.dense.weight.mul_(1e3)
            block.attn.q_norm.weight.copy_(torch.rand(16, dtype=torch.float64) * 3)
            block.attn.k_norm.weight.copy_(torch.rand(16, dtype=torch.float64) * 2)
    *_, maxes = model.metrics_forward(torch.randint(0, 100, (2, 16)))
    for block, m in zip(model.blocks, maxes):
        a = block.attn
        bound = a.q_norm.weight.abs().max() * a.k_norm.weight.abs().max() * math.sqrt(16)
        assert 0 < m.item() <= bound.item() * (1 + 1e-9)
    plain = GPT(small(n_embd=64, n_head=4)).double()
    with torch.no_grad():
        for block in plain.blocks:
            block.attn.dense.weight.mul_(1e3)
    *_, plain_max = plain.metrics_forward(torch.randint(0, 100, (2, 16)))
    assert plain_max.max().item() > 1e3  # without qk-norm nothing bounds them


OPTIONS = {"norm": ["layernorm", "rmsnorm"], "qk_norm": ["none", "layernorm", "rmsnorm"],
           "position": ["learned", "rope"], "mlp": ["gelu", "swiglu"], "bias": [False, True],
           "tie_embeddings": [True, False]}


@pytest.mark.parametrize("combo", list(itertools.product(*OPTIONS.values())),
                         ids=lambda c: "-".join(str(v) for v in c))
def test_every_combination_is_causal_and_counted_by_hand(combo):
    cfg = small(**dict(zip(OPTIONS, combo)), rope_fraction=0.5)
    torch.manual_seed(0)
    model = GPT(cfg).eval()
    assert model.num_params() == params_by_hand(cfg)
    idx = torch.randint(0, 100, (2, 16))
    logits = model(idx)
    changed = idx.clone()
    changed[:, 9] = (changed[:, 9] + 1) % 100
    out = model(changed)
    assert torch.allclose(out[:, :9], logits[:, :9], atol=1e-6)
    assert not torch.allclose(out[:, 9:], logits[:, 9:])


def test_parameter_counts_by_hand_for_the_paper_models():
    oec16m = ModelConfig(vocab_size=50257, block_size=512, n_layer=6, n_head=4, n_embd=224, tie_embeddings=False,
                         qk_norm="layernorm", position="rope", rope_fraction=0.5, mlp="swiglu")
    assert mlp_hidden(oec16m) == 768  # the OEC code's 16M model
    d, h, V = 224, 768, 50304
    per_block = 2 * d + 4 * d * d + 2 * 56 + 3 * d * h  # two norms, attention, q/k gains, SwiGLU
    assert params_by_hand(oec16m) == 2 * V * d + 6 * per_block + d
    with torch.device("meta"):
        assert GPT(oec16m).num_params() == params_by_hand(oec16m)
    assert mlp_hidden(ModelConfig(n_embd=512, mlp="swiglu")) == 1536
    assert mlp_hidden(ModelConfig(n_embd=512, mlp="swiglu", mlp_hidden=1376)) == 1376  # LLaMA-60M
    assert mlp_hidden(ModelConfig(n_embd=512)) == 2048


def test_flops_per_token_follow_nanogpt_and_skip_the_untied_lookup():
    gpt2 = ModelConfig(vocab_size=50257, n_layer=12, n_head=12, n_embd=768, block_size=1024)
    with torch.device("meta"):
        tied, untied = GPT(gpt2), GPT(gpt2.model_copy(update={"tie_embeddings": False}))
    assert tied.num_params(non_embedding=True) == 123_587_328  # bias-free GPT-2, vocab padded to 50304
    assert tied.flops_per_token() == 6 * 123_587_328 + 12 * 12 * 12 * 64 * 1024
    assert tied.flops_per_token() == pytest.approx(0.8548e9, rel=1e-3)
    assert untied.flops_per_token() == tied.flops_per_token()  # the extra matrix is a lookup


def test_float32_head_computes_the_logits_in_float32_under_bf16_autocast():
    torch.manual_seed(0)
    plain, fp32 = GPT(small()), GPT(small(head_fp32=True))
    fp32.load_state_dict(plain.state_dict())
    h = torch.randn(2, 16, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert plain.head(h).dtype == torch.bfloat16
        raw = fp32.head(h)
    assert raw.dtype == torch.float32
    torch.testing.assert_close(raw, h @ fp32.lm_head.weight.T, rtol=0, atol=0)


def test_oec_init_follows_the_official_code():
    torch.manual_seed(0)
    cfg = small(init="oec", n_embd=256, n_head=4, n_layer=3, mlp="swiglu", tie_embeddings=False, vocab_size=4000)
    model = GPT(cfg)
    d, V, h = 256, 4032, mlp_hidden(cfg)
    assert model.wte.weight.std().item() == pytest.approx(1 / math.sqrt(d), rel=0.02)
    assert model.lm_head.weight.std().item() == pytest.approx(math.sqrt(2 / (d + V)), rel=0.02)
    block = model.blocks[0]
    assert block.attn.c_proj.weight.std().item() == pytest.approx(0.02 / math.sqrt(6), rel=0.05)
    assert block.attn.dense.weight.std().item() == pytest.approx(math.sqrt(2 / (4 * d)), rel=0.02)
    assert block.mlp.c_fc.weight.std().item() == pytest.approx(math.sqrt(2 / (d + h)), rel=0.02)
    assert block.mlp.c_proj.weight.std().item() == pytest.approx(math.sqrt(2 / (d + h)), rel=0.03)
    llama = GPT(small(init="llama", n_layer=8, n_embd=128, n_head=4))
    assert llama.blocks[0].mlp.c_proj.weight.std().item() == pytest.approx(0.02, rel=0.05)  # no residual scaling


@pytest.mark.parametrize("name", ["adamw", "spam"])
def test_independent_weight_decay_decays_by_the_schedule_times_lambda(name):
    """With zero gradients Adam's update is 0 and only weight decay moves a matrix: decoupled
    decay scales with the peak LR, independent decay (Wortsman et al.) does not."""
    def decay_factor(mode: str, lr: float, step: int) -> float:
        torch.manual_seed(0)
        model = GPT(small())
        cfg = OptimConfig(name=name, lr=lr, weight_decay=1e-2, weight_decay_mode=mode, warmup_steps=4)
        opt = build_optimizer(model, cfg, torch.device("cpu"))
        w = model.blocks[0].mlp.c_fc.weight
        before = w.detach().clone()
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg, 100)
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        opt.step()
        return (w.detach() / before).mean().item()

    s = lr_at(10, OptimConfig(lr=1.0, warmup_steps=4), 100)  # the schedule's multiplier at step 10
    for lr in (1e-3, 1e-1):
        assert decay_factor("independent", lr, 10) == pytest.approx(1 - s * 1e-2, rel=1e-6)
        assert decay_factor("decoupled", lr, 10) == pytest.approx(1 - lr * s * 1e-2, rel=1e-6)
    assert load_run_config({"optim": {"weight_decay_mode": "independent"}}).optim.weight_decay_mode == "independent"


def test_the_cosine_floor_is_absolute_with_min_lr_and_relative_without():
    """optim.min_lr (the OEC code's 1e-5 for every peak LR) replaces lr * min_lr_ratio as the floor."""
    for lr in (3e-4, 0.3):
        absolute = OptimConfig(lr=lr, warmup_steps=5, min_lr=1e-5)
        assert lr_at(4, absolute, 100) == pytest.approx(lr)  # warmup unchanged
        assert lr_at(99, absolute, 100) == pytest.approx(1e-5 + 0.5 * (lr - 1e-5) * (1 + math.cos(math.pi * 94 / 95)))
        assert lr_at(100, absolute, 100) == pytest.approx(1e-5) and lr_at(100, absolute.model_copy(
            update={"min_lr": None}), 100) == pytest.approx(0.1 * lr)
    assert load_run_config({"optim": {"min_lr": 1e-5}}).optim.min_lr == 1e-5


def test_soft_capped_loss_near_the_float32_limit_stays_finite():
    """A cap of 80 with GPT-2's vocabulary: V e^80 overflows float32, so the fused loss must take
    the max-subtracted path (it returned inf before)."""
    V = 50304
    raw = torch.full((4, V), 500.0)
    raw[:, 7] = 400.0
    targets = torch.tensor([7, 0, 1, 2])
    loss, ce = head_loss(raw, targets, 50257, softcap=80.0, fused=True)
    ref, _ = head_loss(raw.double(), targets, 50257, softcap=80.0, fused=False)
    assert math.isfinite(loss.item())
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
