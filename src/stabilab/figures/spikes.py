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
    """The study's figures beside its loss curves (`studies.KINDS['spikes']`): grad-norm traces at
    every step where the runs recorded them (`train.spike_scores`), else at logged steps."""
    every_step = t.grad_norms is not None and len(t.grad_norms)
    traces = t.grad_norms if every_step else t.steps
    return _spike_figures(t.summary, traces, t.runs, t.variants, t.folder, t.study, t.spec, t.palette,
                          bool(every_step))


def _spike_figures(summary, steps, runs, variants, folder, study, spec, palette, every_step=False) -> list[Path]:
    written = []
    n = seed_count(spec)
    where = "every step" if every_step else "logged steps"
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
    fig.suptitle(f"{study}: total gradient norm at {where} (log scale){seeds_note}", fontsize=10.5)
    handles = [Line2D([], [], color="0.3", lw=1.1, label=f"grad norm ({where})"),
               Line2D([], [], color="0.45", lw=0.9, ls=":",
                      label=f"{SPIKE_FACTOR:g}× running mean of the earlier norms"),
               Line2D([], [], ls="none", marker="^", color=DIVERGED, mec="k", ms=7,
                      label="spike" + ("" if flags["logged"] else " (none)"))]
    if not every_step:
        handles.append(Patch(color=DIVERGED, alpha=0.2, label="+k: spikes counted by the trainer, all steps"
                             + ("" if flags["counted"] else " (none)")))
    if flags["div"]:
        handles.append(div_handle())
    figure_legend(fig, handles, ncol=2)
    written += save(fig, folder, "grad_norm_traces")

    written += save(_spike_counts(summary, variants, study, spec, palette), folder, "spike_counts")
    return written


COUNT_PANELS = [
    ("spike_count", "total-norm spikes per run\n(norm > {f:g}× mean of the earlier norms)", "{:,.0f}"),
    ("gss_spikes", "per-element spikes per run (GSS > {f:g}, SPAM's score)\nstacked by parameter kind",
     "{:.3g}"),
    ("spam_clipped_frac", "share of gradient entries SPAM clipped\n(mean over measured steps)", "{:.2e}"),
]
KIND_HATCH = {"embedding": "", "attn": "//", "mlp": "..", "norm": "xx", "head": "--"}
RANGE_LABEL_MAX_BARS = 6  # with more bars the seeds' range, written under each value, collides (the bar shows it)


def _spike_counts(summary, variants, study, spec, palette):
    """Spike counts per run: on the total grad norm, per element (GSS, when recorded; stacked by
    parameter kind), and SPAM's clipped share; mean over seeds, bar: their range."""
    panels = [p for p in COUNT_PANELS if (summary["metric"] == p[0]).any()
              and metric_rows(summary, p[0])["mean"].notna().any()]
    fig, axes = plt.subplots(1, max(1, len(panels)), squeeze=False, layout="constrained",
                             figsize=(max(4.6, 1.2 * len(variants) + 1.6) * max(1, len(panels)) * 0.75, 4.3))
    n = seed_count(spec)
    for ax, (metric, title, number) in zip(axes[0], panels):
        rows = bar_rows(metric_rows(summary, metric), variants, ["depth", "lr"],
                        lambda depth, lr: f"L{int(depth)}, LR {fmt(lr)}")
        if metric == "gss_spikes":
            _stacked_kinds(ax, rows, summary, palette)
        means, lows, highs = draw_bars(ax, rows, palette) if metric != "gss_spikes" else _totals(rows)
        top = float(np.nanmax(np.fmax(np.nan_to_num(means), np.nan_to_num(highs)))) or 1.0
        ranges = len(rows) <= RANGE_LABEL_MAX_BARS
        label_bars(ax, rows, means, highs, top, lambda m, r, number=number, ranges=ranges: number.format(m) + (
            f"\n({number.format(r['min'])}–{number.format(r['max'])})" if ranges and r.get("n", 1) > 1 else ""),
            pad=0.03, fontsize=7.5)
        ax.set_ylim(0, top * 1.25)
        if metric != "spam_clipped_frac":
            ax.yaxis.set_major_locator(mticker.MaxNLocator(integer=True))
        ax.set_title(title.format(f=SPIKE_FACTOR), fontsize=9.5)
        plt.setp(ax.get_xticklabels(), rotation=30 if ranges else 50, ha="right", rotation_mode="anchor")
        if np.nansum(means) == 0:
            ax.text(0.5, 0.55, "no spikes in any run", transform=ax.transAxes, ha="center", color="0.35", fontsize=9)
    if not panels:
        no_data(axes[0][0])
    note = f"mean over {n} seeds, bar: their range" if n > 1 else "one seed per variant"
    fig.suptitle(f"{study}: gradient spikes per run (whole run, every step; {note})", fontsize=10.5)
    kinds = [k for k in KIND_HATCH if (summary["metric"] == f"gss_spikes_{k}").any()]
    if kinds and any(p[0] == "gss_spikes" for p in panels):
        figure_legend(fig, [Patch(facecolor="white", edgecolor="0.2", hatch=KIND_HATCH[k], label=k) for k in kinds],
                      ncol=len(kinds))
    return fig


def _stacked_kinds(ax, rows, summary, palette) -> None:
    """Per-element spikes of each bar split by parameter kind (means over seeds, stacked)."""
    xs = np.arange(len(rows))
    bottom = np.zeros(len(rows))
    for kind, hatch in KIND_HATCH.items():
        part = metric_rows(summary, f"gss_spikes_{kind}")
        values = []
        for _, variant, r in rows:
            hit = part[(part["variant"] == variant) & (part["depth"] == r["depth"]) & np.isclose(part["lr"], r["lr"])]
            values.append(float(hit["mean"].iloc[0]) if len(hit) else 0.0)
        values = np.nan_to_num(np.array(values))
        ax.bar(xs, values, bottom=bottom, color=[palette[v] for _, v, _ in rows], hatch=hatch, width=0.62,
               edgecolor="0.2", lw=0.6)
        bottom += values


def _totals(rows):
    means = np.array([float(r["mean"]) for _, _, r in rows])
    highs = np.array([float(r["max"]) if r.get("n", 1) > 1 else np.nan for _, _, r in rows])
    return means, highs, highs
