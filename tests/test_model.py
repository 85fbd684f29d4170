"""The baseline GPT: shapes, causality, learning."""

from __future__ import annotations

import pytest
import torch

from stabilab.config import MLRAConfig, ModelConfig
from stabilab.model import GPT, padded_vocab


def small(**kw) -> ModelConfig:
    return ModelConfig(**{"vocab_size": 100, "block_size": 16, "n_layer": 2, "n_head": 2, "n_embd": 32, **kw})


@pytest.mark.parametrize("cfg", [small(), small(tie_embeddings=False), small(bias=True),
                                 small(mlra=MLRAConfig(enabled=True, targets=["q", "k", "v", "o"]))],
                         ids=["tied", "untied", "bias", "mlra"])
def test_shapes_and_causality(cfg):
    torch.manual_seed(0)
    model = GPT(cfg).eval()
    idx = torch.randint(0, 100, (3, 16))
    logits = model(idx)
    assert logits.shape == (3, 16, 100) and logits.dtype == torch.float32  # padding sliced off
    assert model.wte.weight.shape[0] == padded_vocab(100) == 128
    changed = idx.clone()
    changed[:, 10] = (changed[:, 10] + 1) % 100
    out = model(changed)
    assert torch.allclose(out[:, :10], logits[:, :10], atol=1e-6)  # the past ignores the future
    assert not torch.allclose(out[:, 10:], logits[:, 10:])


def test_tying_shares_the_matrix():
    tied, untied = GPT(small()), GPT(small(tie_embeddings=False))
    assert tied.lm_head.weight is tied.wte.weight
    assert untied.num_params() - tied.num_params() == 128 * 32


def test_residual_projections_are_scaled_at_init():
    torch.manual_seed(0)
    model = GPT(small(n_layer=8, n_embd=128, n_head=4))
    std = model.blocks[0].mlp.c_proj.weight.std().item()
    assert abs(std - 0.02 / (2 * 8) ** 0.5) < 1e-3
    assert abs(model.blocks[0].mlp.c_fc.weight.std().item() - 0.02) < 1e-3


def test_tiny_model_overfits_a_tiny_batch():
    torch.manual_seed(0)
    model = GPT(small())
    idx = torch.randint(0, 100, (2, 17))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(150):
        logits = model(idx[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 100), idx[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05  # from ln(100) = 4.6
