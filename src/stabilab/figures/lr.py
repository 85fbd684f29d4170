"""LR study (OEC / Wortsman et al.): final loss vs LR with each method's LR sensitivity (the papers'
figure), the sensitivity per seed, ‖μ‖ and the logits vs LR, and the drift over training against the
summed learning rate."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.lines import Line2D

from ..methods import PAPER_LR_SENSITIVITY, PAPER_LR_SENSITIVITY_SOURCE, label
from ..stats import summed_lr
from ..tables import sweep_values
from .context import StudyTables
from .points import shared_ylim, vs_x, vs_x_legend
from .style import (
    DIVERGED,
    ROUNDING_MU,
    claim_title,
    div_handle,
    figure_legend,
    fmt,
    metric_rows,
    no_data,
    regime,
    save,
    seed_count,
)

MIN_SWEEP_LRS = 3  # an LR sensitivity over fewer LRs is no sensitivity: the figure says so instead
MIN_LOSS_SPAN = 0.5  # nats: loss axes are at least this tall, so that a 0.01-nat gap looks like one
MEAN_LOGIT_LINEAR_WITHIN = 10.0  # symlog axes of the mean logit are linear in ±this (its sign is the point)
# OEC's 16M baseline at the end of its 100k-step runs (arXiv 2601.02031; its repository's
# loss_overview.csv, quoted in docs/replication.md), per peak LR: ‖μ‖ and the mean logit.
OEC_MU_NORM = {3e-4: 1.4, 3e-3: 5.8, 1e-2: 20.0, 3e-2: 57.0, 0.1: 187.0, 0.3: 331.0}
OEC_MEAN_LOGIT = {3e-3: 3.8, 1e-2: 16.5, 0.1: 588.0, 0.3: 1152.0}
OEC_REFERENCE = "OEC's 16M baseline at the end of its 100k-step runs (13B tokens)"
OEC_SUMMED_LR_PER_PEAK = 5.0e4  # 5000 warmup steps then cosine over 100k: Σ_t lr_t ≈ 5e4 × peak LR


def draw(t: StudyTables) -> list[Path]:
    """The study's figures beside its loss curves (`studies.KINDS['lr']`)."""
    written = save(loss_vs_lr(t), t.folder, "loss_vs_lr")
    written += save(lr_sensitivity(t), t.folder, "lr_sensitivity")
    written += save(mu_norm_logits_vs_lr(t), t.folder, "mu_norm_logits_vs_lr")
    return written + save(drift_vs_summed_lr(t), t.folder, "drift_vs_summed_lr")


def _one_depth(t: StudyTables) -> tuple[int | None, str]:
    """The depth the vs-LR figures show (the smallest, when the study has several) and a note on it."""
    depths = sorted(int(d) for d in t.summary["depth"].dropna().unique())
    if not depths:
        return None, ""
    return depths[0], ("" if len(depths) == 1 else f"; {depths[0]} layers shown, other depths in the tables")


def _at_depth(frame: pd.DataFrame, depth: int | None) -> pd.DataFrame:
    return frame if depth is None or "depth" not in frame else frame[frame["depth"] == depth]


def sweep_grids(t: StudyTables) -> list[tuple[str, list[float], str]]:
    """The LR grids a sensitivity is measured over: (metric suffix, LRs, description); the study's
    `sensitivity_lrs` (OEC's own LRs run here) first when it has them."""
    lrs = sorted(float(x) for x in (t.spec.get("lrs") or t.runs["lr"].unique()))
    sub = sorted(float(x) for x in t.spec.get("sensitivity_lrs") or [])
    grids = []
    if sub and sub != lrs:
        grids.append(("_sub", sub, f"η ≤ {fmt(max(sub))}: {len(sub)} LRs {fmt(sub[0])} … {fmt(sub[-1])}"))
    grids.append(("", lrs, f"all {len(lrs)} LRs {fmt(lrs[0])} … {fmt(lrs[-1])}" if lrs else "no LRs"))
    return grids


def _sensitivity_metric(summary: pd.DataFrame) -> tuple[str, str]:
    """OEC's normalization (its published numbers and the verdicts use it) where the runs recorded the
    vocabulary, else Wortsman et al.'s."""
    if (summary["metric"] == "lr_sensitivity_oec").any():
        return "lr_sensitivity_oec", "OEC's normalization: Σ_η [min(L(η), ln V) − L*] / (K − 1)"
    return "lr_sensitivity", "Wortsman et al.'s: Σ_η [min(L(η), L0) − L*] / K"


def _sensitivity_text(summary: pd.DataFrame, metric: str, variant: str, depth: int | None) -> str:
    rows = summary[(summary["metric"] == metric) & (summary["variant"] == variant)]
    rows = _at_depth(rows, depth)
    if not len(rows) or not np.isfinite(rows["mean"].iloc[0]):
        return "n/a"
    r = rows.iloc[0]
    spread = f" ({r['min']:.3f}–{r['max']:.3f})" if r.get("n", 1) > 1 else ""
    return f"{r['mean']:.3f}{spread}"


def loss_vs_lr(t: StudyTables):
    """The papers' figure (OEC Fig. 1, Wortsman et al. Fig. 1): final loss vs peak LR per method, each
    method's LR sensitivity in the legend (over OEC's own LRs run here, shaded, when the study has
    `sensitivity_lrs`), OEC's own numbers beside them."""
    depth, depth_note = _one_depth(t)
    n = seed_count(t.spec)
    fig, ax = plt.subplots(figsize=(7.4, 5.6), layout="constrained")
    df = _at_depth(metric_rows(t.summary, "final_val_loss"), depth)
    l0 = float(t.runs["initial_loss"].dropna().mean()) if "initial_loss" in t.runs else float("nan")
    ylim = shared_ylim([df], _at_depth(t.runs, depth), "final_val_loss", False)
    if ylim is not None and ylim[1] - ylim[0] < MIN_LOSS_SPAN:  # a 0.01-nat gap must not fill the panel
        mid = (ylim[0] + ylim[1]) / 2
        ylim = (mid - MIN_LOSS_SPAN / 2, mid + MIN_LOSS_SPAN / 2)
    marks = vs_x(ax, df, "lr", t.variants, t.palette, n, logx=True, runs=_at_depth(t.runs, depth), ylim=ylim)
    ax.set(xlabel="peak learning rate (log scale)", ylabel="final validation loss (nats; lower is better)")
    grids = sweep_grids(t)
    suffix, grid, grid_text = next((g for g in grids if len(g[1]) >= MIN_SWEEP_LRS), grids[-1])
    metric, normalization = _sensitivity_metric(t.summary)
    measured = len(grid) >= MIN_SWEEP_LRS
    partial = measured and len(grid) < len(df["lr"].unique())
    if partial:
        ax.axvspan(min(grid) / 10 ** 0.15, max(grid) * 10 ** 0.15, color="0.85", alpha=0.45, lw=0, zorder=0)
    shown = [v for v in t.variants if v in set(df["variant"])]
    texts = {}
    for v in shown:
        if measured:
            texts[v] = f": {_sensitivity_text(t.summary, metric + suffix, v, depth)}"
            if v in PAPER_LR_SENSITIVITY and metric == "lr_sensitivity_oec":
                texts[v] += f"  (OEC: {PAPER_LR_SENSITIVITY[v]:.3f})"
    if measured:
        title = (f"LR sensitivity over {grid_text}" + (" (grey band)" if partial else "")
                 + f", mean (seeds' range); {normalization}"
                 + (f"\n(OEC: …) the paper's own, {PAPER_LR_SENSITIVITY_SOURCE}, 100k steps: another grid and length"
                    if metric == "lr_sensitivity_oec" and any(v in PAPER_LR_SENSITIVITY for v in shown) else ""))
    else:
        title = (f"no LR sensitivity: the study runs {len(grid)} LR{'s' if len(grid) != 1 else ''} "
                 f"(one needs ≥ {MIN_SWEEP_LRS})")
    vs_x_legend(fig, shown, t.palette, marks, n, n > 1, texts=texts, title=title, ncol=2)
    claim_title(fig, "LR sensitivity: does a method keep the final loss low as the LR grows?",
                regime(t.spec, t.runs, t.steps, depth) + f"; loss at init L0 = {l0:.2f}{depth_note}")
    return fig


def lr_sensitivity(t: StudyTables):
    """Each variant's LR sensitivity per seed (dots; the line: their mean), over OEC's own LRs run here
    (the verdict's grid) and over the whole grid, with OEC's 16M numbers as stars; beside it the best
    loss L* the sensitivity is measured from, on an axis no narrower than 0.5 nats (so that a 0.01-nat
    gap looks like one)."""
    depth, depth_note = _one_depth(t)
    runs = _at_depth(t.runs, depth)
    metric, normalization = _sensitivity_metric(t.summary)
    grids = [g for g in sweep_grids(t) if len(g[1]) >= MIN_SWEEP_LRS]
    shown = [v for v in t.variants if v in set(runs["variant"])]
    panels = [(metric, suffix, lrs, text) for suffix, lrs, text in grids]
    if grids:
        panels.append(("best_val_loss", grids[0][0], grids[0][1], grids[0][2]))
    size = (max(4.0, 0.62 * len(shown) + 1.5) * len(panels), 4.3) if panels else (6.4, 2.4)
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=size, squeeze=False, layout="constrained")
    axes = axes[0]
    where = regime(t.spec, t.runs, t.steps, depth) + depth_note
    if not grids:
        lrs = sweep_grids(t)[-1][1]
        no_data(axes[0], f"no LR sensitivity: the study runs {len(lrs)} LR{'s' if len(lrs) != 1 else ''}\n"
                         f"({', '.join(map(fmt, lrs))}); a sensitivity needs ≥ {MIN_SWEEP_LRS}.\n"
                         "The loss at each LR: loss_vs_lr.png")
        axes[0].set_axis_off()
        claim_title(fig, "LR sensitivity: not measured by this study", where)
        return fig
    stars = False
    for ax, (name, suffix, lrs, text) in zip(axes, panels):
        for i, v in enumerate(shown):
            g = runs[runs["variant"] == v]
            if suffix:
                g = g[g["lr"].astype(float).isin(lrs)]
            values = sweep_values(g, set(lrs)).get(name, {})
            values = np.array([x for x in values.values() if np.isfinite(x)])
            if len(values):
                ax.scatter([i] * len(values), values, s=36, facecolor="none", edgecolor=t.palette[v], lw=1.4, zorder=4)
                ax.plot([i - 0.25, i + 0.25], [values.mean()] * 2, color=t.palette[v], lw=2.2, zorder=3)
                ax.annotate(f"{values.mean():.3f}", (i + 0.27, values.mean()), va="center", fontsize=7.5)
            if name == "lr_sensitivity_oec" and suffix == grids[0][0] and v in PAPER_LR_SENSITIVITY:
                ax.scatter([i], [PAPER_LR_SENSITIVITY[v]], marker="*", s=120, color="0.55", edgecolor="0.3", lw=0.5,
                           zorder=5)
                stars = True
        k = sum(int(r) for r in runs[runs["lr"].astype(float).isin(lrs)]["diverged"])
        ax.set_xticks(range(len(shown)), [label(v) for v in shown], rotation=30, ha="right")
        ax.set_xlim(-0.6, len(shown) - 0.1)
        if name == "best_val_loss":
            ax.set_title(f"best final loss of the sweep L*\n({text})", fontsize=9)
            ax.set_ylabel("nats (lower is better)")
            lo, hi = ax.get_ylim()
            mid, half = (lo + hi) / 2, max((hi - lo) / 2, MIN_LOSS_SPAN / 2)
            ax.set_ylim(mid - half, mid + half)
        else:
            worst = "ln V" if name == "lr_sensitivity_oec" else "L0"
            ax.set_title(f"LR sensitivity over {text}\n({k} diverged run{'s' if k != 1 else ''} counted as {worst})",
                         fontsize=9)
            ax.set_ylabel("LR sensitivity (nats; lower is less sensitive)")
            ax.set_ylim(bottom=0)
    handles = [Line2D([], [], ls="none", marker="o", mfc="none", mec="0.3", ms=6, label="one seed"),
               Line2D([], [], color="0.3", lw=2.2, label="mean over the seeds")]
    if stars:
        handles.append(Line2D([], [], ls="none", marker="*", ms=11, color="0.55", mec="0.3",
                              label=f"OEC's own number ({PAPER_LR_SENSITIVITY_SOURCE}; another grid and length)"))
    figure_legend(fig, handles, ncol=3)
    claim_title(fig, f"LR sensitivity per method, seed by seed ({normalization})", where)
    return fig


def _rounding_level(df: pd.DataFrame, runs: pd.DataFrame, metric: str) -> list[str]:
    """Variants whose every value of `metric` is at rounding level (‖μ‖ of μ-centering: 0 in exact arithmetic)."""
    out = []
    for v, g in runs.groupby("variant"):
        values = g[metric].astype(float).abs().dropna() if metric in g else pd.Series(dtype=float)
        if len(values) and (values < ROUNDING_MU).all():
            out.append(v)
    return out


def mu_norm_logits_vs_lr(t: StudyTables):
    """‖μ‖, the mean logit (signed: its sign is the point), the logit size and the attention logits vs
    LR; OEC's 16M baseline as stars; μ-centering's ‖μ‖ (rounding level) named, not drawn; diverged runs'
    last measurements on their own, never averaged with the survivors'."""
    depth, depth_note = _one_depth(t)
    runs = _at_depth(t.runs, depth)
    n = seed_count(t.spec)
    panels = [("mu_norm", "‖μ‖ of the output embedding", "‖μ‖ (log scale)", "log", OEC_MU_NORM),
              ("logits_mean", "mean logit (over positions and vocabulary)", "mean logit (symlog: sign kept)",
               "symlog", OEC_MEAN_LOGIT),
              ("logits_absmax", "logit size: max |logit| over the vocabulary", "max |logit|", "linear", None),
              ("attn_logit_max", "attention logits: max over layers, heads, pairs", "max q·k/√d_head (log scale)",
               "log", None)]
    panels = [p for p in panels if (t.summary["metric"] == p[0]).any()]
    cols = 2 if len(panels) > 2 else max(1, len(panels))
    rows_ = -(-max(1, len(panels)) // cols)
    fig, axes = plt.subplots(rows_, cols, figsize=(5.3 * cols, 3.9 * rows_ + 1.0), squeeze=False,
                             layout="constrained")
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    marks: set[str] = set()
    for ax, (metric, title, ylabel, scale, reference) in zip(axes.flat, panels):
        df = _at_depth(metric_rows(t.summary, metric), depth)
        hidden = _rounding_level(df, runs, metric) if metric == "mu_norm" else []
        df = df[~df["variant"].isin(hidden)]
        marks |= vs_x(ax, df, "lr", t.variants, t.palette, n, logx=True, runs=runs, yscale=scale,
                      linthresh=MEAN_LOGIT_LINEAR_WITHIN, reference=reference)
        if hidden:
            top = float(runs[runs["variant"].isin(hidden)][metric].abs().max())
            title += (f"\nnot drawn: {', '.join(map(label, hidden))}, ‖μ‖ ≤ {fmt(top)} at every LR"
                      " (rounding; 0 in exact arithmetic)")
        if scale == "symlog":
            ax.text(0.02, 0.03, f"linear within ±{MEAN_LOGIT_LINEAR_WITHIN:g}, log beyond", transform=ax.transAxes,
                    fontsize=7, color="0.35", va="bottom")
        ax.set(xlabel="peak learning rate (log scale)", ylabel=ylabel)
        ax.set_title(title, fontsize=9.5 if "\n" in title else 10)
    if not panels:
        no_data(axes.flat[0])
    vs_x_legend(fig, [v for v in t.variants if v in set(runs["variant"])], t.palette, marks, n, n > 1,
                reference=OEC_REFERENCE)
    claim_title(fig, "OEC's output-logit drift: ‖μ‖ grows with the LR, and the mean logit with it "
                "(☆: OEC's baseline) — here?",
                regime(t.spec, t.runs, t.steps, depth) + depth_note + "; last measurement of each run")
    return fig


DRIFT_PANELS = [  # (column, title, y label); the mean logit is h·μ = ‖h‖ ‖μ‖ cos(h, μ) (METHODS.md §3)
    ("mu_norm", "‖μ‖ of the output embedding", "‖μ‖ (log scale)"),
    ("logits_mean", "mean logit (over positions and vocabulary)", "mean logit (symlog: sign kept)"),
    ("hidden_mu_cos", "alignment of the final hidden state with μ", "cos(h, μ) (mean over positions)"),
]
OEC_FINAL = {"mu_norm": OEC_MU_NORM, "logits_mean": OEC_MEAN_LOGIT}
DASHES = ["-", (0, (5, 2.2)), (0, (1.2, 1.6)), (0, (7, 2, 1.5, 2)), (0, (3, 1.5)), (0, (9, 3))]


def drift_vs_summed_lr(t: StudyTables):
    """‖μ‖, the mean logit and cos(h, μ) over training against Σ_t lr_t, one line per run (colour and
    dash: variant, the first solid and under the others so that a variant that coincides with it shows
    through the gaps; width: peak LR; every seed drawn), OEC's 16M baseline at the end of its runs as
    stars. cos(h, μ) is drawn only where ‖μ‖ is above rounding level: against a μ of 1e-7 it is noise."""
    steps, runs = t.steps, t.runs
    d = steps.dropna(subset=["lr_now"]).sort_values("step") if "lr_now" in steps else steps.iloc[0:0]
    if "depth" in d and d["depth"].nunique() > 1:
        shown_depth = d["depth"].min()
        d, runs = d[d["depth"] == shown_depth], runs[runs["depth"] == shown_depth]
    panels = [p for p in DRIFT_PANELS if p[0] in d and d[p[0]].notna().any()]
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(4.7 * max(1, len(panels)), 4.1), squeeze=False,
                             layout="constrained")
    lrs = sorted(d["lr"].unique()) if len(d) else []
    width = {lr: 0.9 + 2.0 * i / max(1, len(lrs) - 1) for i, lr in enumerate(lrs)}
    present = [v for v in t.variants if v in set(d["variant"])]
    dash = {v: DASHES[i % len(DASHES)] for i, v in enumerate(present)}
    gone = {tuple(k) for k in runs.loc[runs["diverged"].astype(bool), ["variant", "lr", "seed"]].itertuples(
        index=False)}
    masked: dict[str, set[str]] = {}
    for (variant, lr, seed), g in d.groupby(["variant", "lr", "seed"]):
        columns = ["step", "lr_now", *(column for column, _, _ in panels)]
        columns += ["mu_norm"] if "mu_norm" in g and "mu_norm" not in columns else []
        g = g[columns].assign(lr_sum=summed_lr(g["step"], g["lr_now"]))  # once per run, for every panel
        for ax, (column, _, _) in zip(axes[0], panels):
            points = g[np.isfinite(g[column])]
            if column in ("hidden_mu_cos", "mu_norm") and "mu_norm" in g:
                rounding = points["mu_norm"].abs() < ROUNDING_MU
                if rounding.any():
                    masked.setdefault(column, set()).add(variant)
                points = points[~rounding]
            if not len(points):
                continue
            ax.plot(points["lr_sum"], points[column], color=t.palette.get(variant, "0.5"), lw=width[lr], alpha=0.9,
                    ls=dash.get(variant, "-"), zorder=2 + present.index(variant) if variant in present else 2)
            if (variant, lr, seed) in gone:
                ax.scatter(points["lr_sum"].iloc[-1:], points[column].iloc[-1:], marker="x", s=50, lw=1.8,
                           color=DIVERGED, zorder=9)
    reference = False
    for ax, (column, title, ylabel) in zip(axes[0], panels):
        ax.set_xscale("log")
        if column in OEC_FINAL:
            ref = OEC_FINAL[column]
            ax.scatter([OEC_SUMMED_LR_PER_PEAK * lr for lr in ref], list(ref.values()), marker="*", s=90,
                       color="0.55", edgecolor="0.3", lw=0.5, zorder=8)
            reference = True
        if column == "mu_norm":
            ax.set_yscale("log")
        elif column == "logits_mean":
            ax.set_yscale("symlog", linthresh=MEAN_LOGIT_LINEAR_WITHIN)
            ax.axhline(0, color="0.35", lw=0.8, zorder=1)
        elif column == "hidden_mu_cos":
            ax.axhline(0, color="0.35", lw=0.8, zorder=1)
        ax.margins(y=0.07)
        ax.autoscale_view(scalex=False)  # in the panel's own scale: OEC's star at the top stays whole
        if masked.get(column):
            names = ", ".join(map(label, sorted(masked[column], key=present.index)))
            title += (f"\nnot drawn: {names} (‖μ‖ < {fmt(ROUNDING_MU)}: rounding" +
                      (", a cosine with it noise)" if column == "hidden_mu_cos" else ")"))
        ax.set(xlabel="summed learning rate Σ_t lr_t (log scale)", ylabel=ylabel)
        ax.set_title(title, fontsize=9)
    if not panels:
        no_data(axes[0][0])
    handles = [Line2D([], [], color=t.palette[v], lw=2, ls=dash[v], label=label(v)) for v in present]
    handles += [Line2D([], [], color="0.35", lw=width[lr], label=f"peak LR {fmt(lr)}") for lr in lrs]
    if reference:
        handles.append(Line2D([], [], color="0.55", mec="0.3", ls="none", marker="*", ms=10,
                              label=OEC_REFERENCE + " (Σ lr ≈ 5e4 × peak LR)"))
    if any(k[0] in present for k in gone):
        handles.append(div_handle("diverged: run stopped at ×"))
    figure_legend(fig, handles, ncol=min(len(handles), 4))
    where = regime(t.spec, runs, d) + "; one line per run, every seed"
    claim_title(fig, "OEC's drift over training: ‖μ‖ and the mean logit grow with the summed LR "
                "(☆: OEC's baseline) — here?", where)
    return fig
