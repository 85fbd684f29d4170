"""Training objectives: softmax or StableMax cross-entropy, plus z-loss and OEC mu-loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .config import LossConfig


def stablemax_transform(logits: torch.Tensor) -> torch.Tensor:
    """t with softmax(t) == StableMax(logits) (arXiv 2501.04697), exact and NaN-free.

    s(x) = x + 1 for x >= 0 and 1 / (1 - x) for x < 0, so log s(x) = log1p(x) or -log1p(-x).
    Both branches are finite everywhere (clamped), and the slope at x = 0 is 1, as the formula's;
    sign(x) * log1p(|x|) would have slope 0 there, and a difference of two clamped terms slope 2.
    """
    return torch.where(logits >= 0, torch.log1p(logits.clamp(min=0)), -torch.log1p((-logits).clamp(min=0)))


def normalized_logits(logits: torch.Tensor, kind: str) -> torch.Tensor:
    """Logits whose softmax is the model's predictive distribution (softmax or StableMax)."""
    return stablemax_transform(logits) if kind == "stablemax" else logits


def token_losses(logits: torch.Tensor, targets: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-token cross-entropy, shape of `targets`."""
    z = normalized_logits(logits, kind)
    return F.cross_entropy(z.reshape(-1, z.shape[-1]), targets.reshape(-1), reduction="none").view(targets.shape)


def objective(logits: torch.Tensor, targets: torch.Tensor, cfg: LossConfig,
              output_embedding: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss to minimize, cross-entropy). `logits` are float32 (B, T, V); E is (V, d)."""
    ce = token_losses(logits, targets, cfg.kind).mean()
    loss = ce
    if cfg.z_loss > 0:  # PaLM: lambda * mean over tokens of logsumexp(l)^2
        loss = loss + cfg.z_loss * torch.logsumexp(logits, dim=-1).square().mean()
    if cfg.mu_loss > 0:  # OEC: lambda * ||mu||^2, one term per step
        loss = loss + cfg.mu_loss * output_embedding.float().mean(dim=0).square().sum()
    return loss, ce
