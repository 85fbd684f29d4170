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
    """Softmax Collapse (arXiv 2501.04697): the fraction of positions whose float32
    sum(exp(z - max z)) is exactly 1 (every other class underflows), and the fraction whose
    float32 per-sample loss is exactly 0. z are the logits of the model's own normalizer."""
    z = normalized_logits(logits.detach().float(), kind)
    denom = torch.exp(z - z.amax(dim=-1, keepdim=True)).sum(dim=-1)
    losses = token_losses(logits.detach().float(), targets, kind)
    return {"collapse_frac": (denom == 1.0).float().mean(), "zero_loss_frac": (losses == 0.0).float().mean()}


def grad_group_norms(groups: dict[str, list[torch.nn.Parameter]]) -> dict[str, torch.Tensor]:
    """L2 norm of the gradient of each named parameter group (embedding, block i, head)."""
    out = {}
    for name, params in groups.items():
        grads = [p.grad for p in params if p.grad is not None]
        if grads:
            out[f"grad_norm_{name}"] = torch.stack(torch._foreach_norm(grads)).float().norm()
    return out


def lr_sensitivity(final_losses: list[float], initial_loss: float) -> float:
    """Wortsman et al. 2023: mean over LRs of min(L(lr), L0) - L*, L* the best loss of the sweep.
    A diverged run (NaN/inf loss) counts as L0."""
    capped = [min(loss, initial_loss) if loss == loss and abs(loss) != float("inf") else initial_loss
              for loss in final_losses]
    best = min(capped)
    return sum(c - best for c in capped) / len(capped)
