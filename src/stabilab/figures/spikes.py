"""Spike study (SPAM): Adam vs SPAM over training (the paper's figure, `claims.loss_gap_vs_step`),
grad-norm traces with the per-element spikes under them, per-element spike counts per parameter kind."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import matplotlib.ticker as mticker
import numpy as np
import pandas as pd
from matplotlib.lines import Line2D

from ..methods import label
from .context import StudyTables
from .style import (
    DIVERGED,
    SPIKE_FACTOR,
    claim_title,
    div_handle,
    figure_legend,
    fmt,
    metric_rows,
    no_data,
    regime,
    save,
    shade,
)

# parameter kinds of the per-element (GSS) counts, dense weights first: the verdict rests on them (the
# embedding's and head's counts are mostly sparse token rows, docs/replication.md)
KINDS = [("attn", "attention"), ("mlp", "MLP"), ("norm", "norm gains"), ("embedding", "embedding"),
         ("head", "output head")]
DENSE = ("attn", "mlp", "norm")


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
    from .claims import loss_gap_vs_step

    written = save(loss_gap_vs_step(t), t.folder, "loss_gap_vs_step")
    written += save(grad_norm_traces(t), t.folder, "grad_norm_traces")
    return written + save(spike_counts(t), t.folder, "spike_counts")


def _dense_spikes(steps: pd.DataFrame) -> tuple[pd.DataFrame, str] | None:
    """Per logged step, the spikes counted since the previous log: per element in the dense weights
    (GSS > 50 in attention, MLP and norm gains; `train.spike_scores`), else total-norm spikes."""
    dense = [f"gss_spikes_{k}" for k in DENSE if f"gss_spikes_{k}" in steps]
    if dense:
        d = steps.dropna(subset=dense).assign(count=lambda f: f[dense].sum(axis=1))
        what = f"per-element spikes (GSS > {SPIKE_FACTOR:g}) in attention, MLP and norm gains"
    elif "spike_count" in steps:
        d = steps.dropna(subset=["spike_count"]).assign(count=lambda f: f["spike_count"])
        what = f"total-norm spikes (norm > {SPIKE_FACTOR:g}× the mean of the earlier norms)"
    else:
        return None
    d = d.sort_values("step")
    d["new"] = d.groupby(["variant", "lr", "seed"])["count"].diff().fillna(d["count"])
    d["per_step"] = d["new"] / d.groupby(["variant", "lr", "seed"])["step"].diff().fillna(d["step"]).clip(lower=1)
    return d, what


def grad_norm_traces(t: StudyTables):
    """Rows: variants; columns: peak LRs. Each cell: the total grad norm (log axis) of every seed (shades
    of the variant's colour), and under it the per-element spikes in the dense weights per step (the
    spikes the verdict counts), seed by seed; the total-norm spike count in the corner."""
    every_step = t.grad_norms is not None and len(t.grad_norms)
    traces = t.grad_norms if every_step else t.steps
    d = traces.dropna(subset=["grad_norm"]) if "grad_norm" in traces else traces.iloc[0:0]
    variants = [v for v in t.variants if len(d) and (d["variant"] == v).any()]
    lrs = sorted(float(x) for x in d["lr"].unique()) if len(d) else []
    spikes = _dense_spikes(t.steps)
    fig = plt.figure(figsize=(max(8.0, 5.2 * len(lrs)), 2.6 * max(1, len(variants)) + 1.2), layout="constrained")
    outer = fig.add_gridspec(max(1, len(variants)), max(1, len(lrs)))
    seeds = sorted(int(s) for s in d["seed"].unique()) if len(d) else []
    where = "every step" if every_step else "logged steps"
    first = first_bottom = None  # one y scale for every cell's grad norm, one for every cell's spikes
    highest = 0.0
    any_div = False
    for i, variant in enumerate(variants):
        for j, lr in enumerate(lrs):
            inner = outer[i, j].subgridspec(2, 1, height_ratios=[2, 1], hspace=0.05)
            top = fig.add_subplot(inner[0], sharex=first, sharey=first)
            bottom = fig.add_subplot(inner[1], sharex=top, sharey=first_bottom)
            first, first_bottom = first or top, first_bottom or bottom
            colour = t.palette[variant]
            cell = d[(d["variant"] == variant) & np.isclose(d["lr"], lr)]
            totals = []
            for k, seed in enumerate(seeds):
                g = cell[cell["seed"] == seed].sort_values("step")
                if not len(g):
                    continue
                c = shade(colour, k, len(seeds))
                top.plot(g["step"], g["grad_norm"], color=c, lw=0.7, alpha=0.85)
                totals.append(int(_spikes_from_trace(g)[1].sum()))
                gone = t.runs[(t.runs["variant"] == variant) & np.isclose(t.runs["lr"], lr) & (t.runs["seed"] == seed)
                              & t.runs["diverged"].astype(bool)]
                if len(gone):
                    top.scatter(g["step"].iloc[-1:], g["grad_norm"].iloc[-1:], marker="x", s=70, lw=2,
                                color=DIVERGED, zorder=8)
                    any_div = True
                if spikes is not None:
                    s = spikes[0]
                    s = s[(s["variant"] == variant) & np.isclose(s["lr"], lr) & (s["seed"] == seed)]
                    bottom.step(s["step"], s["per_step"], where="pre", color=c, lw=1.1)
                    highest = max([highest, *s["per_step"].dropna()])
            top.set_yscale("log")
            top.yaxis.set_minor_formatter(mticker.NullFormatter())
            top.tick_params(labelbottom=False)
            top.set_title(f"{label(variant)}, peak LR {fmt(lr)}", loc="left", fontsize=9.5, fontweight="bold",
                          color=colour, pad=3)
            if totals:
                top.text(0.99, 0.95, f"total-norm spikes per seed: {', '.join(map(str, totals))}",
                         transform=top.transAxes, ha="right", va="top", fontsize=7, color="0.3")
            bottom.set_yscale("symlog", linthresh=1)
            bottom.yaxis.set_major_locator(mticker.SymmetricalLogLocator(base=100, linthresh=1))
            if j == 0:
                top.set_ylabel("grad norm\n(before clipping)")
                bottom.set_ylabel("spikes\nper step", fontsize=8)
            if i == len(variants) - 1:
                bottom.set_xlabel("training step")
            else:
                bottom.tick_params(labelbottom=False)
            if spikes is None:
                no_data(bottom, "per-element spikes not recorded")
    if first_bottom is not None:  # the spikes' axis reaches 10 at least: no spike reads as 0, not as a full axis
        first_bottom.set_ylim(0, max(10.0, highest * 2))
    if first is not None and np.divide(*first.get_ylim()[::-1]) < 300:  # few decades: 1-2-5 ticks labelled
        first.yaxis.set_major_locator(mticker.LogLocator(subs=(1.0, 2.0, 5.0)))
        first.yaxis.set_major_formatter(mticker.FuncFormatter(lambda v, _: f"{v:g}"))
    if not variants:
        no_data(fig.add_subplot(outer[0, 0]))
    handles = [Line2D([], [], color=shade("0.45", k, len(seeds)), lw=1.5, label=f"seed {s}")
               for k, s in enumerate(seeds)] if len(seeds) > 1 else []
    if any_div:
        handles.append(div_handle())
    figure_legend(fig, handles, ncol=max(1, len(handles)))
    what = spikes[1] if spikes is not None else "spikes (not recorded)"
    claim_title(fig, "SPAM: gradient spikes occur in training — the grad norm and, under it, "
                f"the {what} per step", regime(t.spec, t.runs, t.steps) + f"; grad norm at {where} (log axis); "
                "seeds in shades of the variant's colour, darkest first", fontsize=10)
    return fig


def spike_counts(t: StudyTables):
    """Per-element spikes per run (GSS > 50, every step, raw gradient) per parameter kind, dense weights
    first, on a symlog axis (0 kept; the embedding's 1e8 does not swamp the attention's 1e3): one panel
    per peak LR with one y scale, each variant's seeds as open markers and their mean as a bar.
    Without per-element counts, the total-norm spikes per run."""
    summary, runs = t.summary, t.runs
    kinds = [(k, name) for k, name in KINDS if (summary["metric"] == f"gss_spikes_{k}").any()
             and metric_rows(summary, f"gss_spikes_{k}")["mean"].notna().any()]
    columns = [(f"gss_spikes_{k}", name) for k, name in kinds] or [("spike_count", "total-norm spikes")]
    lrs = sorted(float(x) for x in runs["lr"].unique()) if len(runs) else []
    variants = [v for v in t.variants if v in set(runs["variant"])]
    per_panel = max(3.2, 1.2 + max(0.2 * len(variants), 0.95) * len(columns))  # room for each kind's label
    fig, axes = plt.subplots(1, max(1, len(lrs)), figsize=(per_panel * max(1, len(lrs)), 4.6), squeeze=False,
                             sharey=True, layout="constrained")
    seeds = sorted(int(s) for s in runs["seed"].unique())
    width = 0.8 / max(1, len(variants))
    for ax, lr in zip(axes[0], lrs):
        for ci, (column, _) in enumerate(columns):
            for vi, variant in enumerate(variants):
                x = ci + (vi - (len(variants) - 1) / 2) * width
                cell = runs[(runs["variant"] == variant) & np.isclose(runs["lr"], lr)]
                values = cell[column].astype(float).to_numpy() if column in cell else np.array([])
                finite = values[np.isfinite(values)]
                if not len(finite):
                    continue
                colour = t.palette[variant]
                ax.bar([x], [finite.mean()], width=width * 0.85, color=colour, alpha=0.35, edgecolor=colour, lw=0.8)
                for seed, v in zip(cell["seed"], values):
                    if np.isfinite(v):
                        edge = shade(colour, seeds.index(int(seed)), len(seeds))
                        ax.scatter([x], [v], marker="o", s=18, facecolor="none", edgecolor=edge, lw=1.1, zorder=4)
        ax.set_yscale("symlog", linthresh=1)
        ax.set_ylim(0, max(10.0, ax.get_ylim()[1]))
        if not any(p.get_height() > 0 for p in ax.patches):
            ax.text(0.5, 0.55, "no spike in any run", transform=ax.transAxes, ha="center", color="0.35", fontsize=9)
        ax.set_xticks(range(len(columns)), [name for _, name in columns])
        ax.set_xlim(-0.6, len(columns) - 0.4)
        ax.set_title(f"peak LR {fmt(lr)}", fontsize=10)
        for ci in range(1, len(columns)):
            ax.axvline(ci - 0.5, color="0.85", lw=0.8)
        if kinds and len(kinds) > len(DENSE):
            ax.axvline(len([k for k, _ in kinds if k in DENSE]) - 0.5, color="0.4", lw=1.2, ls="--")
    if not lrs:
        no_data(axes[0][0])
    ylabel = (f"per-element spikes per run (GSS > {SPIKE_FACTOR:g}),\nsymlog: 0, then 1 … 1e8" if kinds else
              f"total-norm spikes per run (> {SPIKE_FACTOR:g}× mean)")
    axes[0][0].set_ylabel(ylabel)
    handles = [Line2D([], [], color=t.palette[v], lw=6, alpha=0.5, label=label(v)) for v in variants]
    handles.append(Line2D([], [], ls="none", marker="o", mfc="none", mec="0.3", ms=5,
                          label="one seed (bar: their mean)"))
    figure_legend(fig, handles, ncol=min(len(handles), 6))
    claim_title(fig, "SPAM: gradient spikes are frequent — per-element spikes per run, by parameter kind"
                if kinds else "SPAM: gradient spikes — total-norm spikes per run",
                regime(t.spec, runs, t.steps) + ("; dense weights left of the dashed line (the embedding's and head's "
                                                 "counts are mostly sparse token rows)" if kinds else ""), fontsize=10)
    return fig
