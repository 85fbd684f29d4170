"""Training objectives: softmax or StableMax cross-entropy, plus z-loss and OEC mu-loss.

Which head rows are output classes: the real vocabulary (padding rows masked), or a `keep` mask
over all head rows (`model.mask_unseen_tokens`: the training split's never-occurring ids masked
like the padding rows, METHODS.md §1b). Masked columns are out of every log-sum-exp (no
gradient through the cross-entropy or z-loss), masked rows out of mu (`row_mean`), and a
position whose target is masked (none in training; a validation token unseen in training) is
left out of the token means.

Training goes through `head_loss`. Compiled, it is one autograd function for the whole head
objective, so that soft-capping, StableMax and z-loss cost no more than plain cross-entropy: its
forward is one reduction over the (N, V) logits and its backward one elementwise pass, and
nothing of size (N, V) is kept in float32 between them (only the logits as the head produced
them, and one log-sum-exp per row). Uncompiled it is plain autograd over `token_losses`, whose
PyTorch kernels are the faster choice there. Both are tested against the float64 definitions.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .config import LossConfig

# ln of float32's largest number is 88.72: a soft-capped sum of V terms skips the max pass only
# when c + ln V stays below this (c = 30 with GPT-2's vocabulary: 40.8; c = 80: 90.8, not safe)
SOFTCAP_NO_MAX = 88.0


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


def token_losses(logits: torch.Tensor, targets: torch.Tensor, kind: str,
                 keep: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token cross-entropy, shape of `targets`; with `keep` (V,) bool, the normalizer runs over
    the kept columns only (a masked target's loss is then +inf)."""
    z = normalized_logits(logits, kind)
    if keep is not None:
        z = z.masked_fill(~keep, float("-inf"))
    return F.cross_entropy(z.reshape(-1, z.shape[-1]), targets.reshape(-1), reduction="none").view(targets.shape)


def _capped(raw: torch.Tensor, softcap: float | None, slope: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(l, dl/draw): raw head outputs in float32 (float64 stays float64), soft-capped if asked,
    l = c tanh(raw / c), dl/draw = 1 - tanh^2; the slope only when asked (backward)."""
    u = raw.to(torch.promote_types(raw.dtype, torch.float32))
    if softcap is None:
        return u, None
    th = torch.tanh(u / softcap)
    return softcap * th, (1.0 - th * th if slope else None)


def _stablemax_s(l: torch.Tensor) -> torch.Tensor:
    """StableMax's s(x): x + 1 for x >= 0, 1 / (1 - x) for x < 0 (positive, finite)."""
    return torch.where(l >= 0, l + 1.0, 1.0 / (1.0 - l.clamp(max=0)))


def real_logits(raw: torch.Tensor, vocab_size: int, softcap: float | None) -> torch.Tensor:
    """The model's logits: raw head outputs over the real vocabulary (padding columns dropped), in
    float32 (float64 stays float64), soft-capped if configured."""
    return _capped(raw[..., :vocab_size], softcap, slope=False)[0]


def row_mean(E: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    """mu, the mean row of E (V x d); with `keep` (at least V bools; the first V used), the mean of
    the kept rows only (masked rows get no gradient through it)."""
    if keep is None:
        return E.mean(dim=0)
    k = keep[: E.shape[0]]
    return torch.where(k[:, None], E, 0.0).sum(dim=0) / k.sum()


def _masked_mean(values: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """Mean of `values` over the positions where `valid` (all of them when None)."""
    if valid is None:
        return values.mean()
    return torch.where(valid, values, 0.0).sum() / valid.sum()


def _real_columns(raw: torch.Tensor, vocab_size: int) -> torch.Tensor | None:
    """Mask of the columns of the real vocabulary, None when there is no padding."""
    return torch.arange(raw.shape[-1], device=raw.device) < vocab_size if raw.shape[-1] != vocab_size else None


class _HeadLoss(torch.autograd.Function):
    """(mean cross-entropy + z_loss * mean lse^2, mean cross-entropy) of raw head outputs, with
    the gradient written out: dL/dt = p (1 + 2 z lse) - onehot(y), times dt/dl, times dl/draw.

    Softmax: t = l, lse = logsumexp(l), p = exp(l - lse). StableMax works on s(l) directly, with
    no exp or log per entry: lse = log sum s(l), p = s(l) / sum s, t = log s(l), and
    p dt/dl = 1 / sum s for l >= 0 and 1 / ((1 - l)^2 sum s) for l < 0 (the same quantities in
    fewer, cheaper operations; the tests compare both against the float64 definition).

    `keep` (V_padded,) bool, when given, replaces the real-vocabulary mask: the columns in the
    softmax; positions whose target is masked are left out of both means."""

    @staticmethod
    def forward(ctx, raw, targets, vocab_size, kind, softcap, z_loss, keep=None):
        l, _ = _capped(raw, softcap, slope=False)
        real = _real_columns(raw, vocab_size) if keep is None else keep
        valid = None if keep is None else keep[targets]  # (N,)
        l_y = l.gather(-1, targets[:, None]).squeeze(-1)
        if kind == "stablemax":
            s = _stablemax_s(l)
            lse = torch.log((s if real is None else torch.where(real, s, 0.0)).sum(dim=-1))  # (N,)
            t_y = stablemax_transform(l_y)
        elif softcap is not None and softcap + math.log(vocab_size) <= SOFTCAP_NO_MAX:
            # |l| <= c: the sum of V terms exp(l) <= V e^c stays below float32's maximum, so it
            # needs no max subtracted first (one pass over the logits instead of two)
            e = torch.exp(l)
            lse = torch.log((e if real is None else torch.where(real, e, 0.0)).sum(dim=-1))
            t_y = l_y
        else:
            # written out as max, then sum of exp(l - max): Inductor turns exactly this pattern
            # into one online-softmax pass over the logits (torch.logsumexp takes two)
            x = l if real is None else torch.where(real, l, float("-inf"))
            m = x.amax(dim=-1, keepdim=True)
            lse = (m + (x - m).exp().sum(dim=-1, keepdim=True).log()).squeeze(-1)
            t_y = l_y
        ce = _masked_mean(lse - t_y, valid)
        loss = ce + z_loss * _masked_mean(lse.square(), valid) if z_loss > 0 else ce.clone()
        ctx.save_for_backward(raw, targets, lse, keep)
        ctx.args = (vocab_size, kind, softcap, z_loss)
        ctx.mark_non_differentiable(ce)
        return loss, ce

    @staticmethod
    def backward(ctx, grad_loss, _grad_ce):
        raw, targets, lse, keep = ctx.saved_tensors
        vocab_size, kind, softcap, z_loss = ctx.args
        l, dl = _capped(raw, softcap, slope=True)
        if keep is None:
            scale = grad_loss / raw.shape[0]
            target_scale = scale
        else:  # per position (N,): 1 / (kept positions), 0 where the target is masked
            valid = keep[targets]
            scale = torch.where(valid, grad_loss, 0.0) / valid.sum()
            target_scale = scale[:, None]
        row = (scale * (1.0 + 2.0 * z_loss * lse) if z_loss > 0 else scale.expand_as(lse))[:, None]
        onehot = torch.arange(raw.shape[-1], device=raw.device) == targets[:, None]
        if kind == "stablemax":
            r = 1.0 / (1.0 - l.clamp(max=0))
            p_dt = torch.where(l >= 0, 1.0, r * r) * torch.exp(-lse)[:, None]  # p * dt/dl
            grad = p_dt * row - torch.where(onehot, target_scale / (1.0 + l.abs()), 0.0)
        else:
            grad = torch.exp(l - lse[:, None]) * row - torch.where(onehot, target_scale, 0.0)
        real = _real_columns(raw, vocab_size) if keep is None else keep
        if real is not None:
            grad = torch.where(real, grad, 0.0)
        if dl is not None:
            grad = grad * dl
        return grad.to(raw.dtype), None, None, None, None, None, None


def head_loss(raw: torch.Tensor, targets: torch.Tensor, vocab_size: int, kind: str = "softmax",
              softcap: float | None = None, z_loss: float = 0.0,
              fused: bool | None = None, keep: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(cross-entropy + z-loss, cross-entropy), both token means, from the head's raw outputs
    (..., V_padded) in any dtype; soft-capping and StableMax are applied inside, in float32,
    to the first `vocab_size` columns.

    `keep` (V_padded,) bool (`GPT.softmax_mask`): only its columns are in the softmax, and the
    means run over the positions whose target is kept; None: the first `vocab_size` columns, every
    position (the default, unchanged).

    `fused` (default: while torch.compile traces) uses the written-out autograd function, which
    compiles to one reduction and one elementwise kernel; uncompiled, plain autograd over the
    same formulas is faster (PyTorch's own cross-entropy kernels), e.g. on a CPU."""
    if fused is None:
        fused = torch.compiler.is_compiling()
    V = raw.shape[-1]
    if fused:
        return _HeadLoss.apply(raw.reshape(-1, V), targets.reshape(-1), vocab_size, kind, softcap, float(z_loss),
                               keep)
    logits = real_logits(raw, vocab_size, softcap)
    if keep is None:
        ce = token_losses(logits, targets, kind).mean()
        loss = ce + z_loss * torch.logsumexp(logits, dim=-1).square().mean() if z_loss > 0 else ce
        return loss, ce.detach()
    k = keep[:vocab_size]
    valid = k[targets]  # a masked target's loss is +inf: left out of the means
    ce = _masked_mean(token_losses(logits, targets, kind, k), valid)
    if z_loss > 0:
        lse = torch.logsumexp(logits.masked_fill(~k, float("-inf")), dim=-1)
        loss = ce + z_loss * _masked_mean(lse.square(), valid)
    else:
        loss = ce
    return loss, ce.detach()


def objective(raw: torch.Tensor, targets: torch.Tensor, cfg: LossConfig, output_embedding: torch.Tensor,
              softcap: float | None = None, keep: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss to minimize, cross-entropy) from raw head outputs (B, T, V_padded); E is (V, d);
    `keep` (V_padded,) bool: the head rows in the softmax and in mu (None: E's rows, all of them)."""
    loss, ce = head_loss(raw, targets, output_embedding.shape[0], cfg.kind, softcap, cfg.z_loss, keep=keep)
    if cfg.mu_loss > 0:  # OEC: lambda * ||mu||^2, one term per step
        E = output_embedding.to(torch.promote_types(output_embedding.dtype, torch.float32))
        loss = loss + cfg.mu_loss * row_mean(E, keep).square().sum()
    return loss, ce
