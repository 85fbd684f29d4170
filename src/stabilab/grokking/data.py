"""Modular-arithmetic data: every pair (a, b) in [0, p)^2, an exact seeded split, one-hot inputs."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import UserError
from .config import OPERATIONS, RunSpec


def make_pairs(p: int, operation: str) -> tuple[torch.Tensor, torch.Tensor]:
    """All (a, b) in [0, p)^2 in row-major order (index a * p + b) and their labels.
    Returns pairs (p², 2) int64 and labels (p²,) int64."""
    a, b = torch.meshgrid(torch.arange(p), torch.arange(p), indexing="ij")
    a, b = a.reshape(-1), b.reshape(-1)
    if operation == "add":
        labels = (a + b) % p
    elif operation == "mul":
        labels = (a * b) % p
    else:
        raise UserError(f"grokking: unknown operation {operation!r} (allowed: {', '.join(OPERATIONS)})")
    return torch.stack([a, b], dim=1), labels


def split_indices(n: int, train_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exactly round(train_fraction * n) training indices from a permutation seeded by `seed`;
    the rest is the test set. Both sorted, disjoint, covering range(n)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_train = round(train_fraction * n)
    return perm[:n_train].sort().values, perm[n_train:].sort().values


def one_hot_inputs(pairs: torch.Tensor, p: int, dtype: torch.dtype) -> torch.Tensor:
    """(N, 2) pairs -> (N, 2p) concatenation of one-hot(a) and one-hot(b)."""
    return torch.cat([F.one_hot(pairs[:, 0], p), F.one_hot(pairs[:, 1], p)], dim=1).to(dtype)


@dataclass
class Split:
    x_train: torch.Tensor  # (n_train, 2p)
    y_train: torch.Tensor  # (n_train,)
    x_test: torch.Tensor  # (n_test, 2p)
    y_test: torch.Tensor  # (n_test,)


def make_split(spec: RunSpec, device: torch.device | str = "cpu") -> Split:
    pairs, labels = make_pairs(spec.modulus, spec.operation)
    train_idx, test_idx = split_indices(len(labels), spec.train_fraction, spec.seed)
    x = one_hot_inputs(pairs, spec.modulus, getattr(torch, spec.model_dtype)).to(device)
    labels = labels.to(device)
    return Split(x[train_idx], labels[train_idx], x[test_idx], labels[test_idx])
