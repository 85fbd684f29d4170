"""Statistics of finished runs (pure Python: the tables and figures need no torch)."""

from __future__ import annotations

import math

# Two-sided 95 % Student-t quantiles by degrees of freedom.
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262,
       10: 2.228, 15: 2.131, 20: 2.086, 30: 2.042}


def t95(dof: int) -> float:
    if dof <= 0:
        return float("nan")
    keys = [k for k in sorted(T95) if k <= dof]
    return T95[keys[-1]] if dof <= 30 else 1.96


def ci95(values) -> float:
    """Half-width of the 95 % t-interval of the mean of a pandas Series (NaN with one value)."""
    v = values.dropna()
    return t95(len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v)) if len(v) > 1 else float("nan")


def lr_sensitivity(final_losses: list[float], initial_loss: float, divide_by: str = "K") -> float:
    """LR sensitivity over a sweep of K learning rates: sum over LRs of min(L(lr), L0) - L*, L*
    the best loss of the sweep, divided by K (Wortsman et al. 2023, with L0 the loss at
    initialization) or by K - 1 (the OEC code, with a fixed L0 = ln V). A diverged run (NaN/inf
    loss) counts as L0."""
    capped = [min(loss, initial_loss) if loss == loss and abs(loss) != float("inf") else initial_loss
              for loss in final_losses]
    best = min(capped)
    k = len(capped) if divide_by == "K" else len(capped) - 1
    return sum(c - best for c in capped) / k if k > 0 else float("nan")


def summed_lr(steps, lrs) -> list[float]:
    """Σ_{t ≤ s} lr_t at each logged step s, from the LR logged at those steps: the trapezoid rule
    from (0, 0), exact for a schedule that is linear between logged steps (the warmup) and within
    lr_s / 2 of the discrete sum otherwise. OEC relates the output-embedding drift to this sum
    (docs/METHODS.md §3)."""
    total, prev_step, prev_lr, out = 0.0, 0.0, 0.0, []
    for step, lr in zip(steps, lrs):
        total += (float(step) - prev_step) * (prev_lr + float(lr)) / 2
        prev_step, prev_lr = float(step), float(lr)
        out.append(total)
    return out
