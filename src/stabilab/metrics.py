"""Stability metrics of METHODS.md §3, computed on tensors; the trainer decides when.

All functions return tensors (no host sync); the trainer converts a whole record at once.
"""

from __future__ import annotations

import torch

from .losses import normalized_logits, token_losses


def tev(embedding: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Token Embedding Variability: sigma_i = std of row i over its d entries (population std);
    returns (mean_i sigma_i, std_i sigma_i)."""
    sigma = embedding.detach().float().std(dim=1, correction=0)
    return sigma.mean(), sigma.std(correction=0)


def logit_stats(logits: torch.Tensor) -> dict[str, torch.Tensor]:
    """OEC's output-logit statistics over positions (B, T, V)."""
    logits = logits.detach().float()
    return {
        "logits_mean": logits.mean(),
        "logits_absmax": logits.abs().amax(dim=-1).mean(),
        "log_z_sq": torch.logsumexp(logits, dim=-1).square().mean(),
    }


def mu_norm(embedding: torch.Tensor) -> torch.Tensor:
    """||mu||, mu the mean row of an embedding matrix (V x d)."""
    return embedding.detach().float().mean(dim=0).norm()


def collapse_fractions(logits: torch.Tensor, targets: torch.Tensor, kind: str = "softmax") -> dict[str, torch.Tensor]:
    """Softmax Collapse (arXiv 2501.04697): the fraction of positions whose
    sum(exp(z - max z)) is exactly 1 (every other class underflows), and the fraction whose
    per-sample loss is exactly 0, in float32 (float64 logits: in float64, the precision such a
    model computes its loss in). z are the logits of the model's own normalizer."""
    dtype = torch.promote_types(logits.dtype, torch.float32)
    logits = logits.detach().to(dtype)
    z = normalized_logits(logits, kind)
    denom = torch.exp(z - z.amax(dim=-1, keepdim=True)).sum(dim=-1)
    losses = token_losses(logits, targets, kind)
    return {"collapse_frac": (denom == 1.0).to(dtype).mean(), "zero_loss_frac": (losses == 0.0).to(dtype).mean()}


def grad_group_norms(groups: dict[str, list[torch.nn.Parameter]]) -> dict[str, torch.Tensor]:
    """L2 norm of the gradient of each named parameter group (embedding, block i, head)."""
    out = {}
    for name, params in groups.items():
        grads = [p.grad for p in params if p.grad is not None]
        if grads:
            out[f"grad_norm_{name}"] = torch.stack(torch._foreach_norm(grads)).float().norm()
    return out
