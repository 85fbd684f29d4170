"""Early-warning study: AUROC vs lead time per metric, and traces aligned at the failure."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.lines import Line2D

from .. import early_warning as ew
from ..methods import label
from .context import StudyTables
from .style import DIVERGED, claim_title, figure_legend, no_data, panel_grid, save

# every predictor as a reader names it (legends and titles never show code identifiers)
METRIC_NAMES = {
    "train_loss": "training loss", "grad_norm": "gradient norm", "grad_norm_var": "grad-norm variance",
    "spike_rate": "total-norm spike rate", "gss_rate": "per-element spike rate (GSS)",
    "spam_clipped_frac": "share SPAM clipped", "tev_mean": "TEV mean", "tev_std": "TEV std",
    "attn_logit_max": "max attention logit", "mu_norm": "‖μ‖ of the output embedding", "logits_mean": "mean logit",
    "logits_absmax": "max |logit|", "log_z_sq": "mean log Z² (z-loss term)", "lr": "the LR alone",
}
# the metrics the verdicts name (docs/replication.md, METHODS.md §5b), drawn first and in colour: the one
# that warned, the baseline a warning must beat (the loss's slope) and the TEV paper's proxy
HIGHLIGHT = {"attn_logit_max": "#1f77b4", "train_loss": "#000000", "tev_mean": "#2ca02c", "tev_std": "#8c564b"}
OTHER = "0.45"
TRACE_METRICS = ["train_loss", "attn_logit_max", "mu_norm", "logits_absmax", "grad_norm_var", "spike_rate",
                 "gss_rate", "tev_mean"]
WARN_AUROC = 0.75  # the warning bar of METHODS.md §5 (warn_auroc)


def metric_name(metric: str) -> str:
    return METRIC_NAMES.get(metric, metric)


def draw(t: StudyTables) -> list[Path]:
    """The study's figures beside its loss curves (`studies.KINDS['early_warning']`)."""
    return (save(auroc_vs_lead(t.summary, t.study), t.folder, "auroc_vs_lead")
            + save(failure_traces(t.steps, t.runs, t.study, t.spec, t.palette), t.folder, "failure_traces"))


def auroc_vs_lead(summary, study: str):
    """Small multiples, one panel per metric (the verdict's metrics first, in colour): the AUROC of 'fails
    within the next N steps' against N, of the metric's value (solid) and its slope (dashed), within cells
    (the primary comparison), with their bootstrap bands; the loss's slope, the baseline a warning must
    beat, as a thin black line in every panel; chance and the 0.75 warning bar."""
    a = summary[(summary["quantity"] == "auroc") & (summary["scope"] == "within_cell")] if "quantity" in summary \
        else summary.iloc[0:0]
    a = a[a["feature"].isin(ew.FEATURES)]
    present = [m for m in ew.PREDICTORS if m in set(a.dropna(subset=["value"])["metric"])]
    metrics = [m for m in HIGHLIGHT if m in present] + [m for m in present if m not in HIGHLIGHT]
    title = "Which metric warns of a failure, and how far ahead? AUROC of 'fails within the next N steps'"
    if not metrics:  # a control study in which no run failed: nothing to score
        fig, ax = plt.subplots(figsize=(7.5, 2.0), layout="constrained")
        ax.set_axis_off()
        no_data(ax, "no failing run beside a surviving one: no AUROC to draw\n(the study's runs: failure_traces.png)")
        claim_title(fig, title, f"{study}: seeds of one variant, depth and LR compared (METHODS.md §5)", fontsize=9.5)
        return fig
    fig, axes = panel_grid(len(metrics), width=3.0, height=2.35, max_cols=4, sharex=True, sharey=True)
    baseline = a[(a["metric"] == "train_loss") & (a["feature"] == "slope")].sort_values("lead_steps")
    for ax, metric in zip(axes, metrics):
        colour = HIGHLIGHT.get(metric, OTHER)
        for feature, ls in (("value", "-"), ("slope", "--")):
            g = a[(a["metric"] == metric) & (a["feature"] == feature)].sort_values("lead_steps")
            if not g["value"].notna().any():
                continue
            ax.plot(g["lead_steps"], g["value"], color=colour, lw=1.8, ls=ls, marker="o", ms=2.5, zorder=3)
            ax.fill_between(g["lead_steps"], g["ci_low"], g["ci_high"], color=colour, alpha=0.13, lw=0)
        if metric != "train_loss" and baseline["value"].notna().any():
            ax.plot(baseline["lead_steps"], baseline["value"], color="k", lw=0.9, ls=":", zorder=2)
        ax.axhline(0.5, color="0.6", lw=0.8)
        ax.axhline(WARN_AUROC, color="0.6", lw=0.8, ls="-.")
        ax.set_title(metric_name(metric), fontsize=9.5, fontweight="bold" if metric in HIGHLIGHT else "normal",
                     color=colour if metric in HIGHLIGHT else "0.2")
        ax.set_xscale("log")
        ax.set_ylim(0, 1)
    for ax in axes:
        if ax.get_subplotspec().is_last_row() or ax is axes[-1]:
            ax.set_xlabel("lead N (steps, log)")
        if ax.get_subplotspec().is_first_col():
            ax.set_ylabel("AUROC")
    n = a.dropna(subset=["value"])
    runs = f"{int(n['n_runs'].max())} runs, {int(n['n_failing'].max())} failing" if len(n) else "no pairs"
    handles = [Line2D([], [], color="0.3", lw=1.8, label="the metric's value at t"),
               Line2D([], [], color="0.3", lw=1.8, ls="--", label="its slope over the last 200 steps"),
               Line2D([], [], color="k", lw=0.9, ls=":", label="the training loss's slope (the baseline)"),
               Line2D([], [], color="0.6", lw=0.8, label="chance (0.5)"),
               Line2D([], [], color="0.6", lw=0.8, ls="-.", label=f"warning bar ({WARN_AUROC:g})")]
    figure_legend(fig, handles, ncol=3)
    claim_title(fig, title, f"{study}: seeds of one variant, depth and LR compared (the primary comparison, METHODS.md "
                f"§5); {runs}\nbands: 95 % bootstrap over runs; the LRs pooled, with the LR alone as baseline: "
                f"summary_{study}.csv", fontsize=10)
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
        ax.set_title(metric_name(metric), fontsize=9.5)
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
        ax.set_title(metric_name(metric), fontsize=9.5)
        ax.set_xlabel("step")
    fig.suptitle(f"{study}: no run failed ({n_runs} runs), so nothing is aligned at a failure: "
                 "each run's metrics against its step", fontsize=10)
    figure_legend(fig, [Line2D([], [], color=palette.get(v, "0.2"), lw=1.5, label=f"{label(v)}: surviving run")
                        for v in variants], ncol=4)
    return fig
