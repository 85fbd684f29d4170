"""Optimizers and schedule: AdamW, SPAM (arXiv 2501.06842), the perpGrad wrapper (arXiv 2501.04697)."""

from __future__ import annotations

import functools
import inspect
import math

import torch
from torch import nn

from .config import OptimConfig


def raise_recompile_limit(n: int) -> None:
    """Lift dynamo's per-code-object recompile limit (default 8) to at least n, so that several
    compiled models or optimizers in one process never silently fall back to eager."""
    import torch._dynamo.config as dynamo_config

    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo_config, name):
            setattr(dynamo_config, name, max(getattr(dynamo_config, name), n))


@functools.cache
def _compiled(fn, combo_kernels: bool = False):
    """fn compiled once per process (dynamo keeps one cache per function anyway). Combo kernels
    let Inductor launch the kernels of many small tensors together (perpGrad: 148 tensors of
    GPT-2 124M; measured on an H100: +3.1 % step time with them, +4.2 % without)."""
    return torch.compile(fn, dynamic=False, options={"combo_kernels": True} if combo_kernels else None)


def _spam_update(params: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor],
                 exp_avg_sqs: list[torch.Tensor], step_size: torch.Tensor, decay: torch.Tensor,
                 clip: torch.Tensor, threshold: float, beta1: float, beta2: float, eps: float,
                 count_clipped: bool) -> torch.Tensor | None:
    """One SPAM step for a list of tensors, in place; per tensor one pass when compiled (reads p,
    g, m, v; writes p, m, v). `step_size`, `decay` and `clip` (bool: whether spikes are clipped
    this step) are 0-d device tensors, so that their per-step values cause no recompilation.
    Returns the number of clipped entries when `count_clipped`."""
    clipped = []
    for p, g, m, v in zip(params, grads, exp_avgs, exp_avg_sqs):
        # clamp(g, -b, b), b = sqrt(theta v_prev), equals the paper's where(g^2 > theta v_prev, sign(g) b, g)
        bound = torch.where(clip, torch.sqrt(v * threshold), math.inf)
        if count_clipped:
            clipped.append((g.abs() > bound).sum())
        g = torch.clamp(g, -bound, bound)
        m.lerp_(g, 1.0 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
        p.sub_(step_size * m / (torch.sqrt(v) + eps))
        p.mul_(decay)
    return torch.stack(clipped).sum() if count_clipped else None


class Eager:
    """For optimizers that never run inside torch.compile (a run that compiles nothing): torch's
    own `add_param_group`, `zero_grad`, `state_dict` and `load_state_dict`, called without the
    `torch._disable_dynamo` wrapper that keeps them out of compiled graphs and, on its first call,
    imports torch._dynamo (with sympy): 1.5 to 2.4 s of CPU as measured, over a tenth of a CPU
    training job of the default config (docs/performance.md, "CPU smoke test"). Mixed in before
    the optimizer class."""

    def add_param_group(self, param_group: dict) -> None:
        _unwrapped(torch.optim.Optimizer.add_param_group)(self, param_group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        _unwrapped(torch.optim.Optimizer.zero_grad)(self, set_to_none)

    def state_dict(self) -> dict:
        return _unwrapped(torch.optim.Optimizer.state_dict)(self)

    def load_state_dict(self, state_dict: dict) -> None:
        _unwrapped(torch.optim.Optimizer.load_state_dict)(self, state_dict)


def _unwrapped(method):
    """The function under a torch method's decorators (functools.wraps' __wrapped__ chain)."""
    return inspect.unwrap(method)


class EagerAdamW(Eager, torch.optim.AdamW):
    """torch.optim.AdamW, its own step without the wrapper that imports torch._dynamo (`Eager`):
    the wrapper sets grad mode to the `differentiable` option (off) around the step, as here."""

    @torch.no_grad()
    def step(self, closure=None):
        if self.defaults["differentiable"]:
            return super().step(closure)
        return _unwrapped(torch.optim.Adam.step)(self, closure)


class SPAM(torch.optim.Optimizer):
    """Spike-Aware Adam with Momentum reset, as in METHODS.md §2.

    For global step n (from 1): at n % reset_interval == 0 the moments are zeroed (the
    bias-correction count is not); from n >= grace and n % reset_interval >= grace, gradient
    entries with g^2 > threshold * v_prev are clipped to sign(g) * sqrt(threshold * v_prev); the
    update is multiplied by 1 - 0.99 * (1 + cos(pi k / (warmup + 1))) / 2 for the k < warmup
    steps after a reset; weight decay is decoupled. `compile=True` compiles the update into one
    fused kernel per tensor (the fast path on a GPU; as fast as fused AdamW).
    """

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-6,
                 weight_decay: float = 0.0, threshold: float = 5000.0, reset_interval: int = 500,
                 warmup: int = 150, grace: int = 20, warmup_at_start: bool = False, compile: bool = False):
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults)
        self.threshold, self.reset_interval = threshold, reset_interval
        self.warmup, self.grace = warmup, grace
        # Counters live in the first param group so that state_dict() carries them.
        self.param_groups[0].setdefault("spam_step", 0)
        self.param_groups[0].setdefault("spam_last_reset", 0 if warmup_at_start else None)
        self.count_clipped = False  # when set, the next step() records clipped_fraction
        self.clipped_fraction: torch.Tensor | None = None
        self._update = _compiled(_spam_update) if compile else _spam_update
        self._scalars: dict[str, torch.Tensor] = {}

    def _scalar(self, name: str, value: float | bool, device: torch.device) -> torch.Tensor:
        """A persistent 0-d device tensor (float64 or bool) refilled in place: no host sync, no
        recompilation."""
        t = self._scalars.get(name)
        if t is None or t.device != device:
            dtype = torch.bool if isinstance(value, bool) else torch.float64
            t = self._scalars[name] = torch.zeros((), dtype=dtype, device=device)
        return t.fill_(value)

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
        for i, group in enumerate(self.param_groups):
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            for p in params:
                if "exp_avg" not in self.state[p]:
                    self.state[p]["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    self.state[p]["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            m = [self.state[p]["exp_avg"] for p in params]
            v = [self.state[p]["exp_avg_sq"] for p in params]
            if reset:
                torch._foreach_zero_(m)
                torch._foreach_zero_(v)
            beta1, beta2 = group["betas"]
            dev = params[0].device
            step_size = group["lr"] * math.sqrt(1.0 - beta2**n) / (1.0 - beta1**n) * scale
            count = self.count_clipped and clip
            n_clipped = self._update(
                params, [p.grad for p in params], m, v, self._scalar(f"step{i}", step_size, dev),
                self._scalar(f"decay{i}", 1.0 - group["lr"] * group["weight_decay"], dev),
                self._scalar("clip", clip, dev), self.threshold, beta1, beta2, group["eps"], count)
            if count:
                clipped.append(n_clipped)
                total += sum(p.numel() for p in params)
        if self.count_clipped:
            self.clipped_fraction = (torch.stack(clipped).sum().float() / total if total
                                     else torch.zeros((), device=self.param_groups[0]["params"][0].device))
        return loss


class EagerSPAM(Eager, SPAM):
    """SPAM for a run that compiles nothing (`Eager`)."""


def _orthogonalize(weights: list[torch.Tensor], grads: list[torch.Tensor], eps: float) -> None:
    """perpGrad in place, per tensor: g <- (g - c w) |g| / |g - c w|, c = w.g / (w.w + eps).

    The three sums are accumulated in float64 (float32 products are exact there), so |g - c w|^2
    is computed from them, |g|^2 - 2 c w.g + c^2 w.w, without a second pass over the tensor: when
    compiled, one reduction and one elementwise pass per tensor. Its cancellation error (about
    1e-16 |g|^2) is below the float32 rounding of g - c w itself."""
    for w, g in zip(weights, grads):
        w64, g64 = w.double(), g.double()
        dot, w_sq, g_sq = (w64 * g64).sum(), (w64 * w64).sum(), (g64 * g64).sum()
        coef = dot / (w_sq + eps)
        perp_sq = (g_sq - 2.0 * coef * dot + coef * coef * w_sq).clamp(min=0.0)
        scale = g_sq.sqrt() / (perp_sq.sqrt() + eps)
        g.copy_((g - coef * w) * scale)


@torch.no_grad()
def orthogonalize_gradients_(params: list[torch.Tensor], eps: float = 1e-30, compile: bool = False) -> None:
    """perpGrad: per tensor, remove the gradient's component along the weight, keep its norm."""
    params = [p for p in params if p.grad is not None]
    if not params:
        return
    fn = _compiled(_orthogonalize, combo_kernels=True) if compile else _orthogonalize
    fn([p.detach() for p in params], [p.grad for p in params], eps)


class PerpGrad:
    """Wraps an optimizer: each step first replaces every gradient by its perpGrad projection."""

    def __init__(self, base: torch.optim.Optimizer, compile: bool = False):
        self.base, self.compile = base, compile

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
            orthogonalize_gradients_(group["params"], compile=self.compile)
        return self.base.step(closure)

    def state_dict(self) -> dict:
        return self.base.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.base.load_state_dict(state)


def param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict]:
    """Decay matrices (and MLRA factor tensors), not biases, norms and gains (nanoGPT).

    Both optimizers decay by p <- p (1 - lr_t wd_group), lr_t = s_t lr the scheduled LR. Decoupled
    (PyTorch's AdamW): wd_group = weight_decay. Independent (Wortsman et al.): wd_group =
    weight_decay / lr, so that each step decays by s_t weight_decay, whatever the peak LR."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    wd = cfg.weight_decay / cfg.lr if cfg.weight_decay_mode == "independent" else cfg.weight_decay
    return [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, cfg: OptimConfig, device: torch.device, compile: bool = False):
    """AdamW (fused on CUDA) or SPAM, optionally wrapped by perpGrad; `compile` compiles SPAM's and
    perpGrad's updates (AdamW is fused already)."""
    groups = param_groups(model, cfg)
    if cfg.name == "adamw":
        kwargs = {"fused": True} if device.type == "cuda" else {"foreach": True}
        opt = (torch.optim.AdamW if compile else EagerAdamW)(groups, lr=cfg.lr, betas=tuple(cfg.betas),
                                                              eps=cfg.eps, **kwargs)
    else:
        s = cfg.spam
        opt = (SPAM if compile else EagerSPAM)(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, threshold=s.threshold,
                                               reset_interval=s.reset_interval, warmup=s.warmup, grace=s.grace,
                                               warmup_at_start=s.warmup_at_start, compile=compile)
    return PerpGrad(opt, compile=compile) if cfg.perpgrad else opt


def lr_at(step: int, cfg: OptimConfig, total_steps: int) -> float:
    """Linear warmup to cfg.lr, then cosine decay to cfg.min_lr, or cfg.lr * min_lr_ratio when that
    is null; `step` counts from 0. The warmup is lr (t + 1) / W, or lr (t + 1) / (W + 1) with
    `warmup_plus_one` (the OEC code's)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / (cfg.warmup_steps + (1 if cfg.warmup_plus_one else 0))
    span = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    floor = cfg.lr * cfg.min_lr_ratio if cfg.min_lr is None else cfg.min_lr
    return floor + 0.5 * (cfg.lr - floor) * (1.0 + math.cos(math.pi * progress))
