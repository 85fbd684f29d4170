"""The paper's MLP, its loss and its optimizer (AdamW, or ⊥AdamW)."""

from __future__ import annotations

import torch
from torch import nn

from ..losses import token_losses
from ..optim import EagerAdamW, PerpGrad
from .config import RunSpec


def build_mlp(in_dim: int, hidden: list[int], out_dim: int, init_scale: float = 1.0) -> nn.Sequential:
    """Linear(in, h1), ReLU, ..., Linear(h_k, out), all without biases, PyTorch's default init
    (as the official code) times `init_scale`."""
    widths = [in_dim, *hidden]
    layers: list[nn.Module] = []
    for w_in, w_out in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(w_in, w_out, bias=False), nn.ReLU()]
    layers.append(nn.Linear(widths[-1], out_dim, bias=False))
    model = nn.Sequential(*layers)
    if init_scale != 1.0:
        with torch.no_grad():
            for param in model.parameters():
                param.mul_(init_scale)
    return model


def build_model(spec: RunSpec) -> nn.Sequential:
    torch.manual_seed(spec.seed)  # same initial weights for every variant of a seed
    model = build_mlp(2 * spec.modulus, spec.hidden, spec.modulus, spec.init_scale)
    return model.to(getattr(torch, spec.model_dtype))  # float64 variant: the float32 init, cast


def loss_per_sample(logits: torch.Tensor, targets: torch.Tensor, kind: str) -> torch.Tensor:
    """(N, p) logits, (N,) targets -> (N,) cross-entropy of softmax or StableMax, in the logits'
    dtype (the language models' per-token loss)."""
    return token_losses(logits, targets, kind)


def build_optimizer(model: nn.Module, spec: RunSpec):
    # torch's AdamW, without importing torch._dynamo (nothing here compiles: optim.Eager)
    adamw = EagerAdamW(list(model.parameters()), lr=spec.lr, betas=(spec.beta1, spec.beta2), eps=spec.eps,
                       weight_decay=0.0)
    return PerpGrad(adamw) if spec.kind.perpgrad else adamw  # ⊥AdamW: project every gradient first
