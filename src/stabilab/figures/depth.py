"""Depth study (MLRA / TEV): perplexity, TEV and grad-norm variance vs depth, TEV over training."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from .context import StudyTables
from .curves import tokens_per_step
from .points import seed_band, vs_x, vs_x_legend
from .style import (
    DIVERGED,
    figure_legend,
    fmt,
    metric_rows,
    no_data,
    save,
    seed_count,
    seed_curve_handles,
    tokens_axis,
    variant_handles,
)


def draw(t: StudyTables) -> list[Path]:
    """The study's figures beside its loss curves (`studies.KINDS['depth']`)."""
    return _depth_figures(t.summary, t.steps, t.runs, t.variants, t.folder, t.study, t.spec, t.palette)


def _depth_figures(summary, steps, runs, variants, folder, study, spec, palette) -> list[Path]:
    written = []
    n = seed_count(spec)
    band = n > 1

    def one_lr(df):  # a depth study normally has one LR; with several, show the first and say so
        lrs = sorted(df["lr"].dropna().unique())
        return (df[np.isclose(df["lr"], lrs[0])] if len(lrs) > 1 else df), (lrs[0] if len(lrs) > 1 else None)

    fig, ax = plt.subplots(figsize=(5.0, 4.0), layout="constrained")
    df, lr = one_lr(metric_rows(summary, "final_val_ppl"))
    some, alld = vs_x(ax, df, "depth", variants, palette, n, runs=runs)
    ax.set(xlabel="depth (transformer layers)", ylabel="final validation perplexity (lower is better)")
    ax.set_title(f"{study}: perplexity vs depth" + (f" (peak LR {fmt(lr)})" if lr else ""), fontsize=10.5)
    vs_x_legend(fig, variants, palette, some, alld, n, band)
    written += save(fig, folder, "ppl_vs_depth")

    fig, axes = plt.subplots(1, 2, figsize=(9.0, 3.9), layout="constrained")
    some_all = [False, False]
    for ax, metric, label in zip(axes, ["tev_mean", "tev_std"],
                                 ["TEV mean: mean over tokens of std(e_i)", "TEV std: std over tokens of std(e_i)"]):
        df, _ = one_lr(metric_rows(summary, metric))
        some, alld = vs_x(ax, df, "depth", variants, palette, n, runs=runs)
        some_all = [some_all[0] or some, some_all[1] or alld]
        name = "TEV mean" if metric == "tev_mean" else "TEV std"
        ax.set(xlabel="depth (transformer layers)", ylabel=f"{name} (embedding-weight units)")
        ax.set_title(label, fontsize=9.5)
    fig.suptitle(f"{study}: token-embedding variability (TEV) of wte at the end of training", fontsize=10.5)
    vs_x_legend(fig, variants, palette, *some_all, n, band)
    written += save(fig, folder, "tev_vs_depth")

    written += save(_tev_over_training(steps, runs, variants, study, spec, palette), folder, "tev_over_training")

    fig, ax = plt.subplots(figsize=(5.0, 4.0), layout="constrained")
    df, lr = one_lr(metric_rows(summary, "grad_norm_var"))
    some, alld = vs_x(ax, df, "depth", variants, palette, n, logy=True, runs=runs)
    ax.set(xlabel="depth (transformer layers)", ylabel="variance of total grad norm (log scale)")
    ax.set_title(f"{study}: gradient-norm variance vs depth\n"
                 "(sliding-window variance, averaged over the 2nd half of training)",
                 fontsize=10)
    vs_x_legend(fig, variants, palette, some, alld, n, band)
    written += save(fig, folder, "grad_norm_var_vs_depth")
    return written


def _tev_over_training(steps, runs, variants, study, spec, palette):
    n = seed_count(spec)
    depths = sorted(int(x) for x in steps["depth"].unique()) if len(steps) else []
    cols = max(1, len(depths))
    fig, axes = plt.subplots(2, cols, figsize=(3.5 * cols, 5.6), squeeze=False, sharex=True, sharey="row",
                             layout="constrained")
    have = [c for c in ("tev_mean", "tev_std") if c in steps]
    d = steps.dropna(subset=have) if have else steps.iloc[0:0]
    if d.empty:
        for ax in axes.flat:
            no_data(ax)
    tps = tokens_per_step(steps) if len(steps) else pd.Series(dtype=float)
    any_div = False
    for j, depth in enumerate(depths):
        sub = d[d["depth"] == depth]
        for i, metric in enumerate(["tev_mean", "tev_std"]):
            ax = axes[i][j]
            if metric not in sub:
                no_data(ax)
                continue
            for variant in [v for v in variants if v in set(sub["variant"])]:
                gone = set(runs[(runs["variant"] == variant) & (runs["depth"] == depth) & runs["diverged"]]["seed"])
                seed_band(ax, sub[sub["variant"] == variant], "tokens", metric, palette[variant], gone, lw=1.6,
                           marker="o", ms=3)
            for row in runs[(runs["depth"] == depth) & runs["diverged"]].itertuples(index=False):
                t = sub[(sub["variant"] == row.variant) & (sub["seed"] == row.seed)].sort_values("step")
                if len(t):
                    key = (row.variant, row.depth, row.lr, row.seed)
                    step = row.diverged_step if pd.notna(row.diverged_step) else t["step"].max()
                    ax.scatter([step * tps.get(key, 1.0)], [t[metric].iloc[-1]], marker="x", s=70, lw=2,
                               color=DIVERGED, zorder=8)
                    any_div = True
            ax.set_ylabel(("TEV mean" if metric == "tev_mean" else "TEV std") + " (weight units)" if j == 0 else "")
            if i == 0:
                ax.set_title(f"{depth} layer{'s' if depth != 1 else ''}", fontsize=10)
            tokens_axis(ax)
            if i == 0:
                ax.set_xlabel("")
    fig.suptitle(f"{study}: token-embedding variability of wte during training", fontsize=10.5)
    handles = variant_handles([v for v in variants if v in set(steps["variant"])], palette)
    handles += seed_curve_handles(n, any_div)
    figure_legend(fig, handles)
    return fig

