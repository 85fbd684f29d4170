"""What the trainer watches: running statistics, gradient spikes, divergence, and the metrics pass.

Device-side statistics are tensors updated without a host sync; a log record brings them to the
host in one transfer (`to_floats`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch

from .. import metrics
from ..config import DivergenceConfig, RunConfig
from ..device import autocast


def to_floats(tensors: dict[str, torch.Tensor]) -> dict[str, float]:
    """Scalar tensors as floats, in one device-to-host transfer."""
    if not tensors:
        return {}
    values = torch.stack([t.detach().reshape(()).to(torch.float64) for t in tensors.values()]).tolist()
    return dict(zip(tensors, values))


@dataclass
class RunningStats:
    """Device-side running statistics, carried in checkpoints."""

    loss_sum: torch.Tensor  # training cross-entropy summed since the last log record
    loss_n: int  # micro-batches in that sum
    gn_hist: torch.Tensor  # (window,) total grad norms of the last `window` steps, a ring buffer
    gn_sum: torch.Tensor  # sum of every step's total grad norm so far
    spikes: torch.Tensor  # steps whose grad norm exceeded spike_factor x the mean of the earlier ones

    @classmethod
    def zeros(cls, window: int, device: torch.device) -> RunningStats:
        z = torch.zeros((), device=device)
        return cls(z.clone(), 0, torch.zeros(window, device=device), z.clone(), z.clone())

    def record_grad_norm(self, grad_norm: torch.Tensor, step: int, spike_factor: float) -> None:
        """Gradient-spike statistics (SPAM paper): GSS = norm / running mean of earlier norms;
        `step` counts the steps before this one."""
        if step >= 1:
            self.spikes += (grad_norm > spike_factor * self.gn_sum / step).float()
        self.gn_sum += grad_norm
        self.gn_hist[step % self.gn_hist.numel()] = grad_norm

    def grad_norm_var(self, step: int) -> torch.Tensor:
        window = min(step, self.gn_hist.numel())
        return self.gn_hist[:window].var(correction=0)

    def state_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_state_dict(cls, state: dict) -> RunningStats:
        return cls(**{f.name: state[f.name] for f in fields(cls)})


class SpikeScores:
    """SPAM's per-element gradient spike score (METHODS.md §3) on the raw gradients of every
    step, counted by parameter kind (`metrics.PARAM_KINDS`); the counts are cumulative."""

    def __init__(self, model, threshold: float, device: torch.device, compile: bool):
        self.params = [p for p in model.parameters() if p.requires_grad]
        kinds = {id(p): metrics.param_kind(name) for name, p in model.named_parameters()}
        self.kind_of = torch.tensor([metrics.PARAM_KINDS.index(kinds[id(p)]) for p in self.params], device=device)
        self.sums = [torch.zeros_like(p, dtype=torch.float32) for p in self.params]
        self.counts = torch.zeros(len(metrics.PARAM_KINDS), device=device)
        self.steps_seen = torch.zeros((), device=device)
        self.threshold = threshold
        self.update = torch.compile(metrics.gss_update, dynamic=False) if compile else metrics.gss_update

    def record(self) -> None:
        """Score this step's gradients (call before clipping: SPAM scores the raw gradient)."""
        self.steps_seen += 1
        per_tensor = self.update(self.sums, [p.grad for p in self.params], self.steps_seen, self.threshold)
        self.counts.index_add_(0, self.kind_of, per_tensor.float())

    def values(self) -> dict[str, torch.Tensor]:
        out = {f"gss_spikes_{k}": self.counts[i] for i, k in enumerate(metrics.PARAM_KINDS)}
        out["gss_spikes"] = self.counts.sum()
        return out

    def state_dict(self) -> dict:
        return {"sums": self.sums, "counts": self.counts, "steps_seen": self.steps_seen}

    def load_state_dict(self, state: dict) -> None:
        for s, saved in zip(self.sums, state["sums"]):
            s.copy_(saved)
        self.counts.copy_(state["counts"])
        self.steps_seen.copy_(state["steps_seen"])


class DivergenceMonitor:
    """A run diverges when its loss is non-finite, or more than `margin` nats above its first
    logged loss for `patience` steps (counted at log steps)."""

    def __init__(self, cfg: DivergenceConfig, log_every: int):
        self.cfg, self.log_every = cfg, log_every
        self.initial_loss: float | None = None
        self.above_steps = 0
        self.verdict: dict | None = None  # {"step", "reason"} once diverged

    def check(self, step: int, loss: float) -> None:
        if not math.isfinite(loss):
            self.verdict = {"step": step, "reason": "non-finite loss"}
            return
        if self.initial_loss is None:
            self.initial_loss = loss
        if loss > self.initial_loss + self.cfg.margin:
            self.above_steps += self.log_every
            if self.above_steps >= self.cfg.patience:
                self.verdict = {"step": step, "reason": f"loss above initial + {self.cfg.margin} "
                                                        f"for {self.above_steps} steps"}
        else:
            self.above_steps = 0


class StabilityProbe:
    """The metrics of METHODS.md §3 on a fixed batch (the first `metrics_batch` validation
    sequences): one forward pass for the attention-logit maxima, logit statistics and collapse
    fractions (compiled with the model when `compile`), plus the embedding and gradient statistics."""

    def __init__(self, model, cfg: RunConfig, device: torch.device, batch: tuple[torch.Tensor, torch.Tensor],
                 compile: bool):
        self.model, self.cfg, self.device = model, cfg, device
        self.batch = tuple(t[: cfg.train.metrics_batch] for t in batch)
        self.output_metrics = torch.compile(self._output_metrics) if compile else self._output_metrics

    @torch.no_grad()
    def _output_metrics(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        with autocast(self.device, self.cfg.train.dtype):
            h, logits, attn_max = self.model.metrics_forward(x)
        keep = self.model.vocab_mask_real()  # None: the whole vocabulary (model.mask_unseen_tokens off)
        out = {f"attn_logit_max_l{i}": m for i, m in enumerate(attn_max.unbind())}
        out.update(metrics.logit_stats(logits, keep))
        out.update(metrics.hidden_alignment(h, self.model.output_embedding(), self.model.softmax_mask()))
        out.update(metrics.collapse_fractions(logits, y, self.cfg.loss.kind, keep))
        return out

    @torch.no_grad()
    def measure(self, stats: RunningStats, step: int) -> dict[str, torch.Tensor]:
        m, vocab = self.model, self.cfg.model.vocab_size
        keep, rows = m.vocab_mask_real(), m.softmax_mask()  # None, None: model.mask_unseen_tokens off
        m.eval()
        out = self.output_metrics(*self.batch)
        m.train()
        out["tev_mean"], out["tev_std"] = metrics.tev(m.wte.weight[:vocab], keep)
        out["mu_norm"] = metrics.mu_norm(m.output_embedding(), rows)
        if not self.cfg.model.tie_embeddings:
            out["tev_lm_head_mean"], out["tev_lm_head_std"] = metrics.tev(m.output_embedding(), rows)
            out["mu_norm_wte"] = metrics.mu_norm(m.wte.weight[:vocab], keep)
        out["grad_norm_var"] = stats.grad_norm_var(step)
        out["spike_count"] = stats.spikes
        return out
