"""Compare study: final loss, parameters and wall time of the variants side by side."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.lines import Line2D

from ..methods import label
from .context import StudyTables
from .style import DIVERGED, div_handle, figure_legend, fmt, no_data, save, seed_count


def draw(t: StudyTables) -> list[Path]:
    """The study's figures beside its loss curves (`studies.KINDS['compare']`)."""
    return save(_compare_final(t.summary, t.runs, t.variants, t.study, t.spec, t.palette), t.folder, "final_loss")


def _compare_final(summary, runs, variants, study, spec, palette):
    """Final validation loss per variant (mean and the seeds' range; diverged marked), and what
    each costs: parameters and model FLOPs per token. (Step time is measured apart, in paired
    rounds, by benchmarks/bench_variants.py: runs of a pipeline share the machine, so their wall
    times are not comparable.)"""
    n = seed_count(spec)
    combos = list(summary[["depth", "lr"]].drop_duplicates().sort_values(["depth", "lr"]).itertuples(index=False))
    rows = []
    for variant in variants:
        for depth, lr in combos:
            sel = (summary["variant"] == variant) & (summary["depth"] == depth) & np.isclose(summary["lr"], lr)
            if sel.any():
                name = label(variant) if len(combos) == 1 else f"{label(variant)}\n(L{int(depth)}, LR {fmt(lr)})"
                rows.append((name, variant, depth, lr))
    fig, axes = plt.subplots(1, 3, figsize=(max(10.5, 3 * 0.55 * len(rows) + 6), 4.2), layout="constrained",
                             gridspec_kw={"width_ratios": [1.6, 1, 1]})
    if not rows:
        for ax in axes:
            no_data(ax)
        return fig
    xs = np.arange(len(rows))
    labels = [lab for lab, *_ in rows]

    def value(metric, variant, depth, lr):
        r = summary[(summary["metric"] == metric) & (summary["variant"] == variant) & (summary["depth"] == depth)
                    & np.isclose(summary["lr"], lr)]
        if not len(r):
            return np.nan, np.nan, np.nan, 0
        row = r.iloc[0]
        ranged = row.get("n", 1) > 1 and "min" in row
        return (float(row["mean"]), float(row["min"]) if ranged else np.nan, float(row["max"]) if ranged else np.nan,
                int(row["n_diverged"]))

    ax = axes[0]
    l0 = float(runs["initial_loss"].dropna().mean()) if "initial_loss" in runs and runs["initial_loss"].notna().any() \
        else np.nan
    any_div = False
    for x, (_, variant, depth, lr) in zip(xs, rows):
        m, lo, hi, k = value("final_val_loss", variant, depth, lr)
        colour = palette[variant]
        if np.isfinite(m):
            ax.errorbar([x], [m], yerr=[[m - lo], [hi - m]] if np.isfinite(lo) else None, fmt="o", ms=7,
                        color=colour, capsize=4, elinewidth=1.3, zorder=4)
            ax.annotate(f"{m:.3f}", (x, m), xytext=(9, 0), textcoords="offset points", va="center", fontsize=7.5)
            r = runs[(runs["variant"] == variant) & (runs["depth"] == depth) & np.isclose(runs["lr"], lr)]
            if n > 1 and len(r):
                ax.scatter([x] * len(r), r["final_val_loss"], s=14, facecolor="none", edgecolor=colour, lw=0.8,
                           zorder=3)
        if k:
            any_div = True
            y = m if np.isfinite(m) else l0
            ax.scatter([x], [y], marker="x", s=80, lw=2.2, color=DIVERGED, zorder=6)
            ax.annotate(f"{k}/{n} diverged" + ("" if np.isfinite(m) else " (no value)"), (x, y), xytext=(0, 8),
                        textcoords="offset points", ha="center", fontsize=7.5, color=DIVERGED)
    if np.isfinite(l0):
        ax.axhline(l0, color="0.35", ls=":", lw=1)
        ax.annotate(f"loss at init L0 = {l0:.2f}", (0.99, l0), xycoords=("axes fraction", "data"), ha="right",
                    va="bottom", fontsize=7.5, color="0.35")
    lo_, hi_ = ax.get_ylim()
    ax.set_ylim(lo_, hi_ + 0.12 * (hi_ - lo_))  # room for the notes above the highest point
    ax.set_xticks(xs, labels, rotation=30, ha="right")
    ax.set_xlim(-0.6, len(rows) - 0.4)
    ax.set(ylabel="final validation loss (nats; lower is better)")
    ax.set_title("final validation loss" + (f" (mean, bar: range of {n} seeds)" if n > 1 else " (one seed)"),
                 fontsize=10)

    for ax, metric, ylabel, title, scale in [
            (axes[1], "params", "parameters (thousands)", "model size", 1e-3),
            (axes[2], "flops_per_token", "model FLOPs per token (millions)", "compute (6N + 12LHQT)", 1e-6)]:
        vals = [value(metric, v, d, lr) for _, v, d, lr in rows]
        means = np.array([m for m, *_ in vals]) * scale
        ax.set_title(title, fontsize=10)
        if not np.isfinite(means).any():  # e.g. runs recorded before summaries held flops_per_token
            no_data(ax, "not recorded by these runs")
            ax.set_xticks(xs, labels, rotation=30, ha="right")
            continue
        ax.bar(xs, np.nan_to_num(means), color=[palette[v] for _, v, _, _ in rows], width=0.65, edgecolor="0.2",
               lw=0.6)
        for x, m in zip(xs, means):
            ax.text(x, np.nan_to_num(m), "n/a" if not np.isfinite(m) else f"{m:.0f}" if m >= 10 else f"{m:.2g}",
                    ha="center", va="bottom", fontsize=7.5)
        ax.set_xticks(xs, labels, rotation=30, ha="right")
        ax.set(ylabel=ylabel)
        ax.margins(y=0.12)
    depths = sorted({int(d) for _, _, d, _ in rows})
    lrs = sorted({float(lr) for *_, lr in rows})
    setting = f"{', '.join(map(str, depths))} layer{'s' if depths != [1] else ''}, peak LR {', '.join(map(fmt, lrs))}"
    fig.suptitle(f"{study}: variants side by side ({setting})", fontsize=10.5)
    handles = []
    if n > 1:
        handles.append(Line2D([], [], color="0.3", marker="o", ms=4.5, mfc="none", ls="none", label="single seeds"))
    if any_div:
        handles.append(div_handle(f"k of {n} runs diverged (no value: drawn at L0)"))
    figure_legend(fig, handles)
    return fig

