"""Optimizers and schedule: AdamW, SPAM (arXiv 2501.06842), the perpGrad wrapper (arXiv 2501.04697)."""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import OptimConfig


class SPAM(torch.optim.Optimizer):
    """Spike-Aware Adam with Momentum reset, as in METHODS.md §2 (foreach implementation).

    For global step n (from 1): at n % reset_interval == 0 the moments are zeroed (the
    bias-correction count is not); from n >= grace and n % reset_interval >= grace, gradient
    entries with g^2 > threshold * v_prev are clipped to sign(g) * sqrt(threshold * v_prev); the
    update is multiplied by 1 - 0.99 * (1 + cos(pi k / (warmup + 1))) / 2 for the k < warmup
    steps after a reset; weight decay is decoupled.
    """

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-6,
                 weight_decay: float = 0.0, threshold: float = 5000.0, reset_interval: int = 500,
                 warmup: int = 150, grace: int = 20, warmup_at_start: bool = False):
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults)
        self.threshold, self.reset_interval = threshold, reset_interval
        self.warmup, self.grace = warmup, grace
        # Counters live in the first param group so that state_dict() carries them.
        self.param_groups[0].setdefault("spam_step", 0)
        self.param_groups[0].setdefault("spam_last_reset", 0 if warmup_at_start else None)
        self.count_clipped = False  # when set, the next step() records clipped_fraction
        self.clipped_fraction: torch.Tensor | None = None

    def lr_multiplier(self, n: int) -> float:
        """The cosine warmup multiplier at global step n (1 when no reset happened yet)."""
        last = self.param_groups[0]["spam_last_reset"]
        if last is None:
            return 1.0
        k = n - last
        if k >= self.warmup:
            return 1.0
        return 1.0 - 0.99 * 0.5 * (1.0 + math.cos(math.pi * k / (self.warmup + 1)))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        head = self.param_groups[0]
        n = head["spam_step"] = head["spam_step"] + 1
        reset = n % self.reset_interval == 0
        if reset:
            head["spam_last_reset"] = n
        clip = self.threshold > 0 and n >= self.grace and n % self.reset_interval >= self.grace
        scale = self.lr_multiplier(n)
        clipped, total = [], 0
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            for p in params:
                if "exp_avg" not in self.state[p]:
                    self.state[p]["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    self.state[p]["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            m = [self.state[p]["exp_avg"] for p in params]
            v = [self.state[p]["exp_avg_sq"] for p in params]
            if reset:
                torch._foreach_zero_(m)
                torch._foreach_zero_(v)
            if clip:
                # clamp(g, -b, b) with b = sqrt(theta * v_prev) equals the paper's
                # where(g^2 > theta v_prev, sign(g) b, g), in fused passes over the list.
                bound = torch._foreach_sqrt(torch._foreach_mul(v, self.threshold))
                if self.count_clipped:
                    clipped += [(g.abs() > b).sum() for g, b in zip(grads, bound)]
                    total += sum(g.numel() for g in grads)
                grads = torch._foreach_clamp_max(grads, bound)
                torch._foreach_neg_(bound)
                torch._foreach_clamp_min_(grads, bound)
            beta1, beta2 = group["betas"]
            torch._foreach_lerp_(m, grads, 1.0 - beta1)
            torch._foreach_mul_(v, beta2)
            torch._foreach_addcmul_(v, grads, grads, value=1.0 - beta2)
            denom = torch._foreach_sqrt(v)
            torch._foreach_add_(denom, group["eps"])
            step_size = group["lr"] * math.sqrt(1.0 - beta2**n) / (1.0 - beta1**n) * scale
            torch._foreach_addcdiv_(params, m, denom, value=-step_size)
            if group["weight_decay"] > 0:
                torch._foreach_mul_(params, 1.0 - group["lr"] * group["weight_decay"])
        if self.count_clipped:
            self.clipped_fraction = (torch.stack(clipped).sum().float() / total if total
                                     else torch.zeros((), device=self.param_groups[0]["params"][0].device))
        return loss


@torch.no_grad()
def orthogonalize_gradients_(params: list[torch.Tensor], eps: float = 1e-30) -> None:
    """perpGrad: per tensor, remove the gradient's component along the weight, keep its norm."""
    params = [p for p in params if p.grad is not None]
    if not params:
        return
    w = [p.detach().reshape(-1).float() for p in params]
    g = [p.grad.reshape(-1).float() for p in params]
    dots = torch.stack([torch.dot(a, b) for a, b in zip(w, g)])
    w_sq = torch.stack(torch._foreach_norm(w)).square()
    g_norm = torch.stack(torch._foreach_norm(g))
    coef = (dots / (w_sq + eps)).unbind()
    g_perp = torch._foreach_sub(g, torch._foreach_mul(w, coef))
    perp_norm = torch.stack(torch._foreach_norm(g_perp))
    torch._foreach_mul_(g_perp, (g_norm / (perp_norm + eps)).unbind())
    for p, new in zip(params, g_perp):
        p.grad.copy_(new.view_as(p.grad))


class PerpGrad:
    """Wraps an optimizer: each step first replaces every gradient by its perpGrad projection."""

    def __init__(self, base: torch.optim.Optimizer):
        self.base = base

    @property
    def param_groups(self):
        return self.base.param_groups

    @property
    def state(self):
        return self.base.state

    @property
    def count_clipped(self) -> bool:  # SPAM's clipped-fraction switch, passed through
        return getattr(self.base, "count_clipped", False)

    @count_clipped.setter
    def count_clipped(self, value: bool) -> None:
        if hasattr(self.base, "count_clipped"):
            self.base.count_clipped = value

    @property
    def clipped_fraction(self):
        return getattr(self.base, "clipped_fraction", None)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base.zero_grad(set_to_none=set_to_none)

    def step(self, closure=None):
        for group in self.base.param_groups:
            orthogonalize_gradients_(group["params"])
        return self.base.step(closure)

    def state_dict(self) -> dict:
        return self.base.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.base.load_state_dict(state)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices (and MLRA factor tensors), not biases and norms (nanoGPT)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, cfg: OptimConfig, device: torch.device):
    groups = param_groups(model, cfg.weight_decay)
    if cfg.name == "adamw":
        kwargs = {"fused": True} if device.type == "cuda" else {"foreach": True}
        opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, **kwargs)
    else:
        s = cfg.spam
        opt = SPAM(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, threshold=s.threshold,
                   reset_interval=s.reset_interval, warmup=s.warmup, grace=s.grace,
                   warmup_at_start=s.warmup_at_start)
    return PerpGrad(opt) if cfg.perpgrad else opt


def lr_at(step: int, cfg: OptimConfig, total_steps: int) -> float:
    """Linear warmup to cfg.lr, then cosine decay to cfg.lr * min_lr_ratio; `step` counts from 0."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + 0.5 * (cfg.lr - floor) * (1.0 + math.cos(math.pi * progress))
