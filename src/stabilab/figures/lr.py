"""LR study (OEC / Wortsman et al.): final loss vs LR, LR sensitivity, ‖μ‖ and logit size vs LR."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from .context import StudyTables
from .points import bar_rows, draw_bars, label_bars, vs_x, vs_x_legend
from .style import fmt, metric_rows, no_data, save, seed_count


def draw(t: StudyTables) -> list[Path]:
    """The study's figures beside its loss curves (`studies.KINDS['lr']`)."""
    return _lr_figures(t.summary, t.runs, t.variants, t.folder, t.study, t.spec, t.palette)


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
    some, alld = vs_x(ax, df, "lr", variants, palette, n, logx=True, runs=runs,
                       hline=(l0, f"loss at init L0 = {l0:.2f}"))
    ax.set(xlabel="peak learning rate (log scale)", ylabel="final validation loss (nats)")
    ax.set_title(f"{study}: final loss vs learning rate{depth_note}", fontsize=10.5)
    vs_x_legend(fig, variants, palette, some, alld, n, band)
    written += save(fig, folder, "loss_vs_lr")

    written += save(_lr_sensitivity(summary, variants, study, spec, palette), folder, "lr_sensitivity")

    panels = [("mu_norm", "mean output embedding μ", "‖μ‖ (log scale)"),
              ("logits_absmax", "logit size", "max |logit|, mean over positions (log)"),
              ("attn_logit_max", "attention logits", "max q·k/√d_head over layers (log)")]
    panels = [p for p in panels if (summary["metric"] == p[0]).any()]
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(4.1 * max(1, len(panels)), 4.0), squeeze=False,
                             layout="constrained")
    some_all = [False, False]
    for ax, (metric, title, ylabel) in zip(axes[0], panels):
        some, alld = vs_x(ax, one_depth(metric_rows(summary, metric)), "lr", variants, palette, n, logx=True, logy=True,
                           runs=runs)
        some_all = [some_all[0] or some, some_all[1] or alld]
        ax.set(xlabel="peak learning rate (log scale)", ylabel=ylabel)
        ax.set_title(title, fontsize=10)
    if not panels:
        no_data(axes[0][0])
    fig.suptitle(f"{study}: output-embedding mean, logit size and attention logits vs LR{depth_note}\n"
                 "(last measurement of each run; a diverged run's last measurement before it stopped)",
                 fontsize=10.5)
    vs_x_legend(fig, variants, palette, *some_all, n, band)
    written += save(fig, folder, "mu_norm_logits_vs_lr")
    return written



def _lr_sensitivity(summary, variants, study, spec, palette):
    sens = metric_rows(summary, "lr_sensitivity")
    n_lrs = len(spec.get("lrs", [])) or int(summary["lr"].nunique())
    total = seed_count(spec) * n_lrs
    rows = bar_rows(sens, variants, ["depth"], lambda depth: f"{int(depth)} layers")
    fig, ax = plt.subplots(figsize=(max(4.6, 1.25 * len(rows) + 1.6), 4.1), layout="constrained")
    if not rows:
        no_data(ax)
        return fig
    means, cis, err = draw_bars(ax, rows, palette)
    top = float(np.nanmax(means + err)) if np.isfinite(means).any() else 1.0
    label_bars(ax, rows, means, cis, total, top, lambda m, c: f"{m:.3f}" + (f" ± {c:.3f}" if np.isfinite(c) else ""),
                pad=0.02, fontsize=8)
    ax.set_ylim(0, top * 1.18 if top > 0 else 1)
    ax.set(xlabel="", ylabel="LR sensitivity (nats; lower is better)")
    lrs = ", ".join(fmt(x) for x in spec.get("lrs", [])) or "swept LRs"
    ci_note = f"bars: mean over {seed_count(spec)} seeds ± 95 % CI" if seed_count(spec) > 1 else "one seed: no CI"
    ax.set_title(f"{study}: LR sensitivity  mean_η[min(L(η), L0) − L*]\nover LR ∈ {{{lrs}}}; "
                 f"diverged runs count as L0; {ci_note}", fontsize=9.5)
    return fig

