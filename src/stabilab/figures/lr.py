"""LR study (OEC / Wortsman et al.): final loss vs LR, LR sensitivity, ‖μ‖ and logit size vs LR, and
the drift over training against the summed learning rate."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.lines import Line2D

from ..stats import summed_lr
from .context import StudyTables
from .points import bar_rows, draw_bars, label_bars, vs_x, vs_x_legend
from .style import DIVERGED, div_handle, figure_legend, fmt, metric_rows, no_data, save, seed_count, variant_handles


def draw(t: StudyTables) -> list[Path]:
    """The study's figures beside its loss curves (`studies.KINDS['lr']`)."""
    written = _lr_figures(t.summary, t.runs, t.variants, t.folder, t.study, t.spec, t.palette)
    return written + save(_drift_vs_summed_lr(t.steps, t.runs, t.variants, t.palette, t.study), t.folder,
                          "drift_vs_summed_lr")


def _lr_figures(summary, runs, variants, folder, study, spec, palette) -> list[Path]:
    written = []
    n = seed_count(spec)
    band = n > 1
    depths = sorted(summary["depth"].dropna().unique())
    depth_note = (f" ({int(depths[0])} layer{'s' if int(depths[0]) != 1 else ''})" if len(depths) == 1 else
                  f" ({int(depths[0])} layers; other depths in the tables)")

    def one_depth(df):
        return df[df["depth"] == depths[0]] if len(depths) > 1 else df

    fig, ax = plt.subplots(figsize=(5.4, 4.2), layout="constrained")
    df = one_depth(metric_rows(summary, "final_val_loss"))
    l0 = float(runs["initial_loss"].dropna().mean()) if "initial_loss" in runs else float("nan")
    some, alld = vs_x(ax, df, "lr", variants, palette, n, logx=True, runs=runs)
    ax.set(xlabel="peak learning rate (log scale)", ylabel="final validation loss (nats)")
    ax.set_title(f"{study}: final loss vs learning rate{depth_note}\n(loss at init L0 = {l0:.2f})", fontsize=10.5)
    vs_x_legend(fig, variants, palette, some, alld, n, band)
    written += save(fig, folder, "loss_vs_lr")

    written += save(_lr_sensitivity(summary, variants, study, spec, palette), folder, "lr_sensitivity")

    panels = [("mu_norm", "mean output embedding μ", "‖μ‖ (log)"),
              ("logits_mean_abs", "mean logit (over positions and vocabulary)", "|mean logit| (log)"),
              ("logits_absmax", "logit size: max over the vocabulary, mean over positions", "max |logit| (log)"),
              ("attn_logit_max", "attention logits: max over layers, heads, pairs", "max q·k/√d_head (log)")]
    panels = [p for p in panels if (summary["metric"] == p[0]).any()]
    cols = 2 if len(panels) > 2 else max(1, len(panels))
    rows_ = -(-max(1, len(panels)) // cols)
    fig, axes = plt.subplots(rows_, cols, figsize=(5.2 * cols, 3.9 * rows_ + 0.8), squeeze=False,
                             layout="constrained")
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    some_all = [False, False]
    for ax, (metric, title, ylabel) in zip(axes.flat, panels):
        some, alld = vs_x(ax, one_depth(metric_rows(summary, metric)), "lr", variants, palette, n, logx=True, logy=True,
                           runs=runs)
        some_all = [some_all[0] or some, some_all[1] or alld]
        ax.set(xlabel="peak learning rate (log scale)", ylabel=ylabel)
        ax.set_title(title, fontsize=10)
    if not panels:
        no_data(axes.flat[0])
    fig.suptitle(f"{study}: output-embedding mean, logits and attention logits vs LR{depth_note}\n"
                 "(last measurement of each run; a diverged run's last measurement before it stopped)",
                 fontsize=10.5)
    vs_x_legend(fig, variants, palette, *some_all, n, band)
    written += save(fig, folder, "mu_norm_logits_vs_lr")
    return written



SENSITIVITY_PANELS = [
    ("lr_sensitivity", "LR sensitivity, Wortsman et al.:\nΣ_η [min(L(η), L0) − L*] / K, L0 measured", "{:.3f}"),
    ("lr_sensitivity_oec", "LR sensitivity, OEC code:\nΣ_η [min(L(η), ln V) − L*] / (K − 1)", "{:.3f}"),
    ("best_val_loss", "best final loss of the sweep L*\n(what the sensitivity is measured from)", "{:.3f}"),
]


def _lr_sensitivity(summary, variants, study, spec, palette):
    """LR sensitivity in both normalizations beside the sweep's best loss, one bar per variant."""
    panels = [p for p in SENSITIVITY_PANELS if (summary["metric"] == p[0]).any()]
    n_bars = max(1, len([v for v in variants if v in set(summary["variant"])]))
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(max(4.6, 0.9 * n_bars + 1.4) * max(1, len(panels)) * 0.8,
                                                             4.4), squeeze=False, layout="constrained")
    for ax, (metric, title, number) in zip(axes[0], panels):
        rows = bar_rows(metric_rows(summary, metric), variants, ["depth"], lambda depth: f"{int(depth)} layers")
        if not rows:
            no_data(ax)
            continue
        if metric == "best_val_loss":  # differences of hundredths of a nat: dots on a zoomed axis, not bars
            _dots(ax, rows, palette, number)
            ax.set_title(title, fontsize=9)
            ax.set(xlabel="", ylabel="nats (lower is better)")
            continue
        means, lows, highs = draw_bars(ax, rows, palette)
        top = float(np.nanmax(np.fmax(means, np.nan_to_num(highs)))) if np.isfinite(means).any() else 1.0
        label_bars(ax, rows, means, highs, top, lambda m, r, number=number: number.format(m) + (
            f"\n({number.format(r['min'])}–{number.format(r['max'])})" if r.get("n", 1) > 1 else ""),
            pad=0.02, fontsize=7.5)
        ax.set_ylim(0, top * 1.25 if top > 0 else 1)
        ax.tick_params(axis="x", labelrotation=30)
        ax.set_title(title, fontsize=9)
        ax.set(xlabel="", ylabel="nats (lower is better)")
    lrs = ", ".join(fmt(x) for x in spec.get("lrs", [])) or "swept LRs"
    n = seed_count(spec)
    seeds = ("mean over the seeds that ran every LR, bar: their range" if n > 1 else "one seed")
    sens = summary[summary["metric"] == "lr_sensitivity"]
    missing = "; n/a: no seed of the variant ran every LR" if sens["mean"].isna().any() else ""
    fig.suptitle(f"{study}: sensitivity to the learning rate over η ∈ {{{lrs}}} ({seeds});\n"
                 f"a diverged run counts as L0{missing}", fontsize=10)
    return fig


def _dots(ax, rows, palette, number: str) -> None:
    """One dot per variant (mean over seeds, bar: range), its value beside it."""
    xs = np.arange(len(rows))
    for x, (_, variant, r) in zip(xs, rows):
        m = float(r["mean"])
        ranged = r.get("n", 1) > 1
        ax.errorbar([x], [m], yerr=[[m - r["min"]], [r["max"] - m]] if ranged else None, fmt="o", ms=7,
                    color=palette[variant], capsize=4, elinewidth=1.3)
        ax.annotate(number.format(m), (x, m), xytext=(8, 0), textcoords="offset points", va="center", fontsize=7.5)
    ax.set_xticks(xs, [name for name, _, _ in rows], rotation=30)
    ax.set_xlim(-0.6, len(rows) - 0.2)
    ax.margins(y=0.2)


DRIFT_PANELS = [  # (column, title, y label); the mean logit is h·μ = ‖h‖ ‖μ‖ cos(h, μ) (METHODS.md §3)
    ("mu_norm", "mean output embedding ‖μ‖", "‖μ‖ (log)"),
    ("logits_mean", "mean logit (over positions and vocabulary)", "mean logit (symlog)"),
    ("hidden_mu_cos", "alignment of the final hidden state with μ", "cos(h, μ)"),
]
MEAN_LOGIT_LINEAR_WITHIN = 10.0  # the symlog axis is linear in ±this (workflow/report/drift_vs_summed_lr.rst)
# OEC's 16M baseline at the end of its 100k-step runs (arXiv 2601.02031; its repository's
# loss_overview.csv; 5000 warmup steps then cosine, so Σ_t lr_t ≈ 5e4 × peak LR), for scale.
OEC_LRS = (0.1, 0.3)
OEC_FINAL = {"mu_norm": (187.0, 331.0), "logits_mean": (588.0, 1152.0)}  # at OEC_LRS
OEC_SUMMED_LR_PER_PEAK = 5.0e4


def _drift_vs_summed_lr(steps, runs, variants, palette, study):
    """‖μ‖, the mean logit and cos(h, μ) over training against Σ_t lr_t, one line per run (colour:
    variant, width: peak LR, every seed drawn), with OEC's 16M baseline at the end of its runs in
    grey: OEC relates the drift to the summed LR, so runs of different lengths and LRs share one
    axis. The smallest depth, as in the vs-LR figures, when the study has several."""
    d = steps.dropna(subset=["lr_now"]).sort_values("step") if "lr_now" in steps else steps.iloc[0:0]
    r = runs
    if "depth" in d and d["depth"].nunique() > 1:
        shown = d["depth"].min()
        d, r = d[d["depth"] == shown], runs[runs["depth"] == shown]
    panels = [p for p in DRIFT_PANELS if p[0] in d and d[p[0]].notna().any()]
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(4.6 * max(1, len(panels)), 4.0), squeeze=False,
                             layout="constrained")
    lrs = sorted(d["lr"].unique()) if len(d) else []
    width = {lr: 0.8 + 2.0 * i / max(1, len(lrs) - 1) for i, lr in enumerate(lrs)}
    diverged = r.loc[r["diverged"].astype(bool), ["variant", "lr", "seed"]]
    gone = {tuple(k) for k in diverged.itertuples(index=False)}
    reference = False
    for (variant, lr, seed), g in d.groupby(["variant", "lr", "seed"]):
        columns = ["step", "lr_now", *(column for column, _, _ in panels)]
        g = g[columns].assign(lr_sum=summed_lr(g["step"], g["lr_now"]))  # once per run, for every panel
        for ax, (column, _, _) in zip(axes[0], panels):
            points = g[np.isfinite(g[column])]
            if not len(points):
                continue
            ax.plot(points["lr_sum"], points[column], color=palette.get(variant, "0.5"), lw=width[lr], alpha=0.85)
            if (variant, lr, seed) in gone:
                ax.scatter(points["lr_sum"].iloc[-1:], points[column].iloc[-1:], marker="x", s=50, lw=1.8,
                           color=DIVERGED, zorder=5)
    for ax, (column, title, ylabel) in zip(axes[0], panels):
        ax.set_xscale("log")
        if column in OEC_FINAL:
            ax.scatter([OEC_SUMMED_LR_PER_PEAK * lr for lr in OEC_LRS], OEC_FINAL[column], marker="*", s=90,
                       color="0.55", zorder=4)
            reference = True
        if column == "mu_norm":
            ax.set_yscale("log")
        elif column == "logits_mean":
            ax.set_yscale("symlog", linthresh=MEAN_LOGIT_LINEAR_WITHIN)
        ax.set(xlabel="summed learning rate Σ_t lr_t (log scale)", ylabel=ylabel)
        ax.set_title(title, fontsize=9.5)
    if not panels:
        no_data(axes[0][0])
    present = [v for v in variants if v in set(d["variant"])]
    handles = variant_handles(present, palette) + [
        Line2D([], [], color="0.35", lw=width[lr], label=f"peak LR {fmt(lr)}") for lr in lrs]
    if reference:
        handles.append(Line2D([], [], color="0.55", ls="none", marker="*", ms=10,
                              label=f"OEC's 16M baseline, end of its runs (LR {', '.join(fmt(x) for x in OEC_LRS)})"))
    if any(k[0] in present for k in gone):
        handles.append(div_handle("diverged: run stopped at ×"))
    figure_legend(fig, handles, ncol=min(len(handles), 4))
    depth = f", {int(d['depth'].iloc[0])} layers" if len(d) and "depth" in d else ""
    fig.suptitle(f"{study}: output-logit drift over training vs the summed learning rate{depth}\n"
                 "(one line per run, every seed; grey: OEC's own baseline for scale)", fontsize=10.5)
    return fig
