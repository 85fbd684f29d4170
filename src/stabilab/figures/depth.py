"""Depth study (MLRA / TEV): perplexity, TEV and grad-norm variance vs depth, TEV over training.
With several peak LRs, each figure has one column of panels per LR."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from .context import StudyTables
from .curves import tokens_per_step
from .points import seed_band, shared_ylim, vs_x, vs_x_legend
from .style import (
    DIVERGED,
    claim_title,
    figure_legend,
    fmt,
    metric_rows,
    no_data,
    regime,
    save,
    seed_count,
    seed_curve_handles,
    tokens_axis,
    variant_handles,
)

# TEV of each embedding matrix: (metric, the matrix, mean or std over tokens); lm_head's only when untied
TEV_METRICS = [("tev_mean", "wte", "mean"), ("tev_std", "wte", "std"),
               ("tev_lm_head_mean", "lm_head", "mean"), ("tev_lm_head_std", "lm_head", "std")]
DEPTH_AXIS = "depth (transformer layers)"


def draw(t: StudyTables) -> list[Path]:
    """The study's figures beside its loss curves (`studies.KINDS['depth']`)."""
    from .claims import ppl_vs_depth_best_lr

    written = save(ppl_vs_depth_best_lr(t), t.folder, "ppl_vs_depth_best_lr")
    return written + _depth_figures(t.summary, t.steps, t.runs, t.variants, t.folder, t.study, t.spec, t.palette)


def study_lrs(frame: pd.DataFrame) -> list[float]:
    return sorted(float(v) for v in frame["lr"].dropna().unique()) if len(frame) else []


def at_lr(frame: pd.DataFrame, lr: float) -> pd.DataFrame:
    return frame[np.isclose(frame["lr"].astype(float), lr)]


def tev_metrics(frame: pd.DataFrame) -> list[tuple[str, str, str]]:
    """The TEV metrics with a value in `frame` (a summary's `metric` rows or steps' columns)."""
    if "metric" in frame:
        present = set(frame.loc[np.isfinite(frame["mean"].astype(float)), "metric"])
        return [m for m in TEV_METRICS if m[0] in present]
    return [m for m in TEV_METRICS if m[0] in frame and frame[m[0]].notna().any()]


def _vs_depth(summary, runs, variants, palette, n, rows, lrs, suptitle, height, logy=False, where=""):
    """One panel per (metric row, LR column), each the metric vs depth; `rows` = [(metric, ylabel)]. The
    panels of a row share their y scale: the LRs are compared, and a 0.01-nat gap must not look like
    the 0.6-nat one beside it."""
    cols = max(1, len(lrs))
    fig, axes = plt.subplots(len(rows), cols, figsize=(max(5.0, 4.4 * cols), height * len(rows) + 0.6),
                             squeeze=False, layout="constrained")
    marks: set[str] = set()
    for i, (metric, ylabel) in enumerate(rows):
        df = metric_rows(summary, metric)
        ylim = shared_ylim([df], runs, metric, logy)
        for j, lr in enumerate(lrs or [np.nan]):
            ax = axes[i][j]
            marks |= vs_x(ax, at_lr(df, lr) if lrs else df, "depth", variants, palette, n, logy=logy, runs=runs,
                          ylim=ylim)
            ax.set(xlabel=DEPTH_AXIS if i == len(rows) - 1 else "", ylabel=ylabel if j == 0 else "")
            if i == 0 and lrs:
                ax.set_title(f"peak LR {fmt(lr)}", fontsize=10)
        _share_y(axes[i])
    claim_title(fig, suptitle, where) if where else fig.suptitle(suptitle, fontsize=10.5)
    vs_x_legend(fig, variants, palette, marks, n, n > 1)
    return fig


def _share_y(axes) -> None:
    """One y range for the panels of a row (the union of theirs: each vs_x sets its own limits)."""
    limits = [ax.get_ylim() for ax in axes]
    lo, hi = min(a for a, _ in limits), max(b for _, b in limits)
    for ax in axes:
        ax.set_ylim(lo, hi)


def _depth_figures(summary, steps, runs, variants, folder, study, spec, palette) -> list[Path]:
    n = seed_count(spec)
    lrs = study_lrs(summary)
    where = regime(spec, runs, steps) + "; one y scale across the LRs"
    written = []
    ppl = [("final_val_ppl", "final validation perplexity\n(lower is better)")]
    fig = _vs_depth(summary, runs, variants, palette, n, ppl, lrs,
                    "MLRA: lower perplexity, more so in deeper models (every LR of the grid)", 3.6, where=where)
    written += save(fig, folder, "ppl_vs_depth")

    tev = tev_metrics(summary) or TEV_METRICS[:2]
    rows = [(m, f"TEV {kind}, {matrix}\n(weight units)") for m, matrix, kind in tev]
    fig = _vs_depth(summary, runs, variants, palette, n, rows, lrs,
                    "MLRA lowers the token-embedding variability (TEV) at the end of training",
                    2.9, where=where + "\nmean: mean over tokens of std(e_i); std: std over tokens of std(e_i)")
    written += save(fig, folder, "tev_vs_depth")

    written += save(_tev_over_training(steps, runs, variants, study, spec, palette), folder, "tev_over_training")

    gvar = [("grad_norm_var", "variance of total grad norm\n(log scale)")]
    fig = _vs_depth(summary, runs, variants, palette, n, gvar, lrs,
                    "Gradient-norm variance vs depth (the instability TEV is meant to stand in for)", 3.6,
                    logy=True, where=where + "\nsliding-window variance, averaged over the 2nd half of training")
    written += save(fig, folder, "grad_norm_var_vs_depth")
    return written


def _tev_over_training(steps, runs, variants, study, spec, palette):
    """Rows: per LR, the wte TEV mean and the lm_head's (untied) or the wte TEV std (tied); columns: depths."""
    n = seed_count(spec)
    depths = sorted(int(x) for x in steps["depth"].unique()) if len(steps) else []
    lrs = study_lrs(steps) or [np.nan]
    present = {m for m, _, _ in tev_metrics(steps)}
    shown = [m for m in TEV_METRICS if m[0] == "tev_mean"]
    shown += [m for m in TEV_METRICS if m[0] == ("tev_lm_head_mean" if "tev_lm_head_mean" in present else "tev_std")]
    rows = [(lr, metric, matrix, kind) for lr in lrs for metric, matrix, kind in shown]
    cols = max(1, len(depths))
    fig, axes = plt.subplots(len(rows), cols, figsize=(3.5 * cols, 2.8 * len(rows)), squeeze=False, sharex=True,
                             layout="constrained")
    d = steps if present else steps.iloc[0:0]
    if d.empty:
        for ax in axes.flat:
            no_data(ax)
        depths = []
    tps = tokens_per_step(steps) if len(steps) else pd.Series(dtype=float)
    any_div = False
    for j, depth in enumerate(depths):
        for i, (lr, metric, matrix, kind) in enumerate(rows):
            ax = axes[i][j]
            sub = d[d["depth"] == depth]
            sub = at_lr(sub, lr) if np.isfinite(lr) else sub
            gone_runs = runs[(runs["depth"] == depth) & runs["diverged"]]
            gone_runs = at_lr(gone_runs, lr) if np.isfinite(lr) else gone_runs
            sub = sub.dropna(subset=[metric]) if metric in sub else sub.iloc[0:0]  # tied runs have no lm_head TEV
            if sub.empty:
                no_data(ax)
            for variant in [v for v in variants if v in set(sub["variant"])]:
                gone = set(gone_runs[gone_runs["variant"] == variant]["seed"])
                seed_band(ax, sub[sub["variant"] == variant], "tokens", metric, palette[variant], gone, lw=1.6,
                          marker="o", ms=3)
            for row in gone_runs.itertuples(index=False):
                t = sub[(sub["variant"] == row.variant) & (sub["seed"] == row.seed)].sort_values("step")
                if len(t):
                    key = (row.variant, row.depth, row.lr, row.seed)
                    step = row.diverged_step if pd.notna(row.diverged_step) else t["step"].max()
                    ax.scatter([step * tps.get(key, 1.0)], [t[metric].iloc[-1]], marker="x", s=70, lw=2,
                               color=DIVERGED, zorder=8)
                    any_div = True
            lr_text = f", LR {fmt(lr)}" if len(lrs) > 1 else ""
            ax.set_ylabel(f"TEV {kind}, {matrix}{lr_text}" if j == 0 else "")
            if i == 0:
                ax.set_title(f"{depth} layer{'s' if depth != 1 else ''}", fontsize=10)
            tokens_axis(ax)
            if i < len(rows) - 1:
                ax.set_xlabel("")
    one_lr = f" (peak LR {fmt(lrs[0])})" if len(lrs) == 1 and np.isfinite(lrs[0]) else ""
    claim_title(fig, f"Token-embedding variability (TEV) during training{one_lr}",
                regime(spec, runs, steps) + "; weight units")
    logged = set(steps["variant"]) if "variant" in steps else set()
    handles = variant_handles([v for v in variants if v in logged], palette)
    handles += seed_curve_handles(n, any_div)
    figure_legend(fig, handles)
    return fig
