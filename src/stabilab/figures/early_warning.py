"""Early-warning study: AUROC vs lead time per metric, and traces aligned at the failure."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.lines import Line2D

from .. import early_warning as ew
from ..methods import label
from .context import StudyTables
from .style import DIVERGED, figure_legend, no_data, panel_grid, save

# one colour per metric (never the divergence red); the loss, the baseline, is black
METRIC_COLOURS = dict(zip([n for n in ew.PREDICTORS if n != "train_loss"],
                          ["#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
                           "#bcbd22", "#17becf", "#393b79", "#637939", "#8c6d31"]))
METRIC_COLOURS.update({"train_loss": "#000000", "lr": "#555555"})
TRACE_METRICS = ["train_loss", "attn_logit_max", "mu_norm", "logits_absmax", "grad_norm_var", "spike_rate",
                 "gss_rate", "tev_mean"]
SCOPE_TITLES = {"within_cell": "seeds of one variant, depth and LR (primary)",
                "across_lr": "LRs pooled per variant and depth"}


def draw(t: StudyTables) -> list[Path]:
    """The study's figures beside its loss curves (`studies.KINDS['early_warning']`)."""
    return (save(auroc_vs_lead(t.summary, t.study), t.folder, "auroc_vs_lead")
            + save(failure_traces(t.steps, t.runs, t.study, t.spec, t.palette), t.folder, "failure_traces"))


def auroc_vs_lead(summary, study: str):
    """Rows: scope; columns: value, slope; one line per metric, its bootstrap interval as a band."""
    a = summary[summary["quantity"] == "auroc"] if "quantity" in summary else summary.iloc[0:0]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.4), sharex=True, sharey=True, squeeze=False, layout="constrained")
    handles = {}
    for row, scope in enumerate(ew.SCOPES):
        for col, feature in enumerate(ew.FEATURES):
            ax, sub = axes[row, col], a[(a["scope"] == scope) & (a["feature"] == feature)]
            for metric, g in sub.groupby("metric", sort=False):
                g = g.sort_values("lead_steps")
                if metric == "lr" or not g["value"].notna().any():  # the LR alone: drawn below, pooled only
                    continue
                colour = METRIC_COLOURS.get(metric, "0.3")
                dashed = metric == "train_loss"
                ax.plot(g["lead_steps"], g["value"], color=colour, lw=2 if dashed else 1.4, ls="--" if dashed else "-",
                        marker="o", ms=3)
                ax.fill_between(g["lead_steps"], g["ci_low"], g["ci_high"], color=colour, alpha=0.12, lw=0)
                handles[metric] = Line2D([], [], color=colour, ls="--" if dashed else "-", lw=1.6, label=metric)
            if scope == "across_lr":  # the LR alone, the baseline of the pooled comparison
                lr = a[(a["scope"] == scope) & (a["metric"] == "lr")].sort_values("lead_steps")
                if lr["value"].notna().any():
                    ax.plot(lr["lead_steps"], lr["value"], color=METRIC_COLOURS["lr"], lw=2, ls=":")
                    handles["lr"] = Line2D([], [], color=METRIC_COLOURS["lr"], ls=":", lw=2, label="LR alone")
            ax.axhline(0.5, color="0.5", lw=0.8, ls=":")
            n = sub.dropna(subset=["value"])
            runs = f"{int(n['n_runs'].max())} runs, {int(n['n_failing'].max())} failing" if len(n) else "no pairs"
            ax.set_title(f"{SCOPE_TITLES[scope]}\nmetric {feature} ({runs})", fontsize=9.5)
            ax.set_xscale("log")
            ax.set_ylim(-0.02, 1.02)
            if not len(n):
                no_data(ax, "no failing run with a surviving twin")
            ax.set(xlabel="lead time N (steps, log scale)" if row == 1 else "", ylabel="AUROC" if col == 0 else "")
    fig.suptitle(f"{study}: AUROC of 'fails within the next N steps' per metric (band: 95 % bootstrap "
                 "interval over runs; dashed black: the loss, dotted: chance)", fontsize=10.5)
    figure_legend(fig, list(handles.values()), ncol=5)
    return fig


def failure_traces(steps, runs, study: str, spec: dict, palette: dict, max_runs: int = 8):
    """Each metric against steps to the failure: failing runs (variant colour) aligned at their failure,
    surviving runs of the same cell (grey) aligned at that cell's median failure step."""
    cfg = ew.settings(spec)
    frame = ew.predictor_frame(steps, runs, cfg) if len(steps) else None
    metrics = [m for m in TRACE_METRICS if frame is not None and f"{m}:value" in frame]
    fig, axes = panel_grid(max(1, len(metrics)), width=3.8, height=2.8, max_cols=4, sharex=True)
    if not metrics:
        no_data(axes[0])
        return fig
    fails = frame.drop_duplicates(ew.RUN)
    failing = fails[np.isfinite(fails["fail"])].head(max_runs)
    if failing.empty:  # nothing to align (a stable twin): the runs' traces as they are, the control
        return _traces_without_failure(fig, axes, frame, metrics, study, palette, len(fails))
    chosen = set(failing[ew.RUN].itertuples(index=False, name=None))  # the failing runs drawn
    shown = set()
    for ax, metric in zip(axes, metrics):
        for _, cell in failing.groupby(ew.CELL):
            key = cell.iloc[0]
            same = (frame[ew.CELL] == key[ew.CELL].to_numpy()).all(axis=1)
            k0 = float(cell["fail"].median())
            for _, g in frame[same].groupby("seed"):
                fail = g["fail"].iloc[0]
                if np.isfinite(fail) and next(g[ew.RUN].itertuples(index=False, name=None)) not in chosen:
                    continue  # a failing run beyond the first max_runs: not drawn (the title counts the drawn)
                colour, lw = (palette.get(key["variant"], "0.2"), 1.3) if np.isfinite(fail) else ("0.65", 0.8)
                ax.plot(g["step"] - (fail if np.isfinite(fail) else k0), g[f"{metric}:value"], color=colour, lw=lw)
                shown.add(key["variant"])
        ax.axvline(0, color=DIVERGED, lw=1.2)
        if ew.PREDICTORS[metric][1]:
            ax.set_yscale("log")
        ax.set_title(metric, fontsize=9.5)
        ax.set_xlabel("steps to the failure")
    n_fail = int(np.isfinite(fails["fail"]).sum())
    fig.suptitle(f"{study}: metrics before the failure ({len(failing)} of {n_fail} failing runs shown, "
                 f"of {len(fails)} runs; grey: surviving seeds of the same cell, aligned at its median failure)",
                 fontsize=10)
    handles = [Line2D([], [], color=palette.get(v, "0.2"), lw=1.5, label=f"{label(v)}: failing run") for v in shown]
    handles += [Line2D([], [], color="0.65", lw=1, label="surviving seed"),
                Line2D([], [], color=DIVERGED, lw=1.2, label="failure onset (METHODS.md §5)")]
    figure_legend(fig, handles, ncol=4)
    return fig


def _traces_without_failure(fig, axes, frame, metrics, study: str, palette: dict, n_runs: int):
    """failure_traces of a study in which no run failed: each metric against the step, every run."""
    variants = list(dict.fromkeys(frame["variant"]))
    for ax, metric in zip(axes, metrics):
        for _, g in frame.groupby(ew.RUN):
            ax.plot(g["step"], g[f"{metric}:value"], color=palette.get(g["variant"].iloc[0], "0.2"), lw=0.9,
                    alpha=0.8)
        if ew.PREDICTORS[metric][1]:
            ax.set_yscale("log")
        ax.set_title(metric, fontsize=9.5)
        ax.set_xlabel("step")
    fig.suptitle(f"{study}: no run failed ({n_runs} runs), so nothing is aligned at a failure: "
                 "each run's metrics against its step", fontsize=10)
    figure_legend(fig, [Line2D([], [], color=palette.get(v, "0.2"), lw=1.5, label=f"{label(v)}: surviving run")
                        for v in variants], ncol=4)
    return fig
