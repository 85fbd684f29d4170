"""Spike study (SPAM): grad-norm traces with spikes marked, spike counts per run."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import matplotlib.ticker as mticker
import numpy as np
import pandas as pd
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from ..methods import label
from .context import StudyTables
from .points import bar_rows, draw_bars, label_bars
from .style import (
    DIVERGED,
    SPIKE_FACTOR,
    div_handle,
    facets_of,
    figure_legend,
    fmt,
    metric_rows,
    no_data,
    save,
    seed_count,
)


def _spikes_from_trace(g: pd.DataFrame, factor: float = SPIKE_FACTOR) -> tuple[pd.Series, pd.Series]:
    """(threshold, is_spike) on the logged grad norms: a spike is a step whose grad norm exceeds
    `factor` x the running mean of the earlier (logged) grad norms."""
    gn = g["grad_norm"].astype(float)
    running = gn.expanding().mean().shift(1)
    threshold = factor * running
    return threshold, (gn > threshold) & running.notna()


def draw(t: StudyTables) -> list[Path]:
    """The study's figures beside its loss curves (`studies.KINDS['spikes']`)."""
    return _spike_figures(t.summary, t.steps, t.runs, t.variants, t.folder, t.study, t.spec, t.palette)


def _spike_figures(summary, steps, runs, variants, folder, study, spec, palette) -> list[Path]:
    written = []
    n = seed_count(spec)
    d = steps.dropna(subset=["grad_norm"]) if "grad_norm" in steps else steps.iloc[0:0]
    panels = [(v, depth, lr) for depth, lr in (facets_of(d, "spikes") if len(d) else [])
              for v in variants if ((d["variant"] == v) & (d["depth"] == depth) & np.isclose(d["lr"], lr)).any()]
    multi = len({(p[1], p[2]) for p in panels}) > 1
    fig, axes = plt.subplots(max(1, len(panels)), 1, figsize=(7.5, 1.9 * max(1, len(panels)) + 1.3), squeeze=False,
                             sharex=True, sharey=True, layout="constrained")
    axes = axes[:, 0]
    flags = {"logged": False, "counted": False, "div": False}
    for ax, (variant, depth, lr) in zip(axes, panels):
        sub = d[(d["variant"] == variant) & (d["depth"] == depth) & np.isclose(d["lr"], lr)]
        colour = palette[variant]
        for seed, g in sub.groupby("seed"):
            g = g.sort_values("step")
            ax.plot(g["step"], g["grad_norm"], color=colour, lw=1.1, alpha=0.9 if n == 1 else 0.6)
            threshold, spike = _spikes_from_trace(g)
            ax.plot(g["step"], threshold, color="0.45", lw=0.9, ls=":")
            if spike.any():
                ax.scatter(g.loc[spike, "step"], g.loc[spike, "grad_norm"], marker="^", s=45, color=DIVERGED,
                           edgecolor="k", lw=0.5, zorder=7)
                flags["logged"] = True
            if "spike_count" in g:  # the trainer counts every step, logged or not
                m = g.dropna(subset=["spike_count"])
                prev_step, prev = 0, 0.0
                for step, count in zip(m["step"], m["spike_count"]):
                    if count > prev:
                        ax.axvspan(prev_step, step, color=DIVERGED, alpha=0.12, lw=0)
                        ax.text((prev_step + step) / 2, 0.96, f"+{int(count - prev)}",
                                transform=ax.get_xaxis_transform(),
                                ha="center", va="top", fontsize=7.5, color=DIVERGED)
                        flags["counted"] = True
                    prev_step, prev = step, count
            r = runs[(runs["variant"] == variant) & (runs["depth"] == depth) & np.isclose(runs["lr"], lr)
                     & (runs["seed"] == seed) & runs["diverged"]]
            for row in r.itertuples(index=False):
                step = row.diverged_step if pd.notna(row.diverged_step) else g["step"].max()
                ax.scatter([step], [g["grad_norm"].iloc[-1]], marker="x", s=80, lw=2.2, color=DIVERGED, zorder=8)
                flags["div"] = True
        ax.set_yscale("log")
        title = label(variant) + (f"  ({depth} layers, peak LR {fmt(lr)})" if multi else "")
        ax.set_title(title, loc="left", fontsize=9.5, fontweight="bold", color=colour, pad=3)
        ax.set_ylabel("grad norm\n(before clipping)")
    if not panels:
        no_data(axes[0])
    axes[-1].set_xlabel("training step")
    axes[-1].xaxis.set_major_locator(mticker.MaxNLocator(integer=True))
    seeds_note = f"; {n} seeds overlaid" if n > 1 else ""
    fig.suptitle(f"{study}: total gradient norm at logged steps (log scale){seeds_note}", fontsize=10.5)
    handles = [Line2D([], [], color="0.3", lw=1.1, label="grad norm (logged steps)"),
               Line2D([], [], color="0.45", lw=0.9, ls=":",
                      label=f"{SPIKE_FACTOR:g}× running mean of earlier logged norms"),
               Line2D([], [], ls="none", marker="^", color=DIVERGED, mec="k", ms=7,
                      label="spike at a logged step" + ("" if flags["logged"] else " (none)")),
               Patch(color=DIVERGED, alpha=0.2,
                     label="+k: spikes counted by the trainer, all steps" + ("" if flags["counted"] else " (none)"))]
    if flags["div"]:
        handles.append(div_handle())
    figure_legend(fig, handles, ncol=2)
    written += save(fig, folder, "grad_norm_traces")

    written += save(_spike_counts(summary, variants, study, spec, palette), folder, "spike_counts")
    return written


def _spike_counts(summary, variants, study, spec, palette):
    counts = metric_rows(summary, "spike_count")
    rows = bar_rows(counts, variants, ["depth", "lr"], lambda depth, lr: f"L{int(depth)}, LR {fmt(lr)}")
    fig, ax = plt.subplots(figsize=(max(4.6, 1.2 * len(rows) + 1.6), 3.9), layout="constrained")
    if not rows:
        no_data(ax)
        return fig
    n = seed_count(spec)
    means, lows, highs = draw_bars(ax, rows, palette)
    top = max(1.0, float(np.nanmax(np.fmax(np.nan_to_num(means), np.nan_to_num(highs)))))
    label_bars(ax, rows, means, highs, top, lambda m, r: f"{m:.3g}" + (
        f" ({r['min']:.3g}–{r['max']:.3g})" if r.get("n", 1) > 1 else ""), pad=0.03, fontsize=8.5)
    ax.set_ylim(0, top * 1.2)
    ax.yaxis.set_major_locator(mticker.MaxNLocator(integer=True))
    ax.set(xlabel="", ylabel=f"gradient-norm spikes per run\n(norm > {SPIKE_FACTOR:g}× running mean)")
    note = f"mean over {n} seeds, bar: their range" if n > 1 else "one seed per variant"
    ax.set_title(f"{study}: gradient-norm spikes per run\n(whole run, every step; {note})", fontsize=10)
    if np.nansum(means) == 0:
        ax.text(0.5, 0.55, "no spikes detected in any run", transform=ax.transAxes, ha="center", color="0.35",
                fontsize=9)
    return fig

