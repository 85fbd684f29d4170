"""The figure each paper's authors would draw for its claim, from the tables alone, with the verdict's
own paired numbers (`verdicts.verdict_rows`: runs of one seed share their initialisation and batch
order, so arms are compared seed by seed):

- MLRA (depth studies): perplexity vs depth, each arm at its own best LR of the grid (a best LR at
  the grid's edge is marked: the optimum may lie outside), and the paired difference per seed;
- SPAM (spike studies): Adam's and SPAM's loss over training, and SPAM − Adam per seed at every
  evaluation, beside the paper's own gap.

(OEC's figure, loss vs LR with each method's LR sensitivity in its legend, is `lr.loss_vs_lr`; the
StableMax one, `grokking.figures`.)
"""

from __future__ import annotations

import math
import textwrap

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.lines import Line2D

from ..methods import label
from ..verdicts import verdict_rows
from .context import StudyTables
from .style import DIVERGED, claim_title, figure_legend, fmt, no_data, regime, seed_count

EDGE = "#b35806"  # a best LR at the grid's edge (orange-brown: a caution, not the divergence red)
SEED_MARKERS = ["o", "s", "^", "D", "v", "P", "X", "<", ">", "h"]
# SPAM paper (arXiv 2501.06842), LLaMA-60M on C4 (1.1B tokens): perplexity Adam 34.09, SPAM 30.46
SPAM_PAPER_GAP = math.log(30.46) - math.log(34.09)
SPAM_PAPER = "SPAM paper, LLaMA-60M, 1.1B tokens: ln(30.46 / 34.09)"


def seed_marker(seed) -> str:
    return SEED_MARKERS[int(seed) % len(SEED_MARKERS)]


def _reading(row: dict) -> str:
    """One verdict row as a line: mean paired difference, its range over seeds, the sign count and the reading."""
    if not row.get("n"):
        return "no seed in both arms"
    spread = f" ({row['diff_min']:+.3f} … {row['diff_max']:+.3f})" if row["n"] > 1 else ""
    return (f"{row['diff_mean']:+.3f}{spread}; lower in {row['n_b_lower']}, higher in {row['n_b_higher']} "
            f"of {row['n']} seeds; {row['reading']}")


# ------------------------------------------------------------------------------------------ MLRA


def ppl_vs_depth_best_lr(t: StudyTables):
    """Perplexity vs depth, each arm at its own best LR (lowest mean final loss of the grid), the seeds
    as open markers; below, each other arm minus the first, paired per seed (nats of final loss)."""
    runs = t.runs
    arms = [v for v in t.variants if v in set(runs["variant"])]
    grid = sorted(float(x) for x in (t.spec.get("lrs") or runs["lr"].unique()))
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7.6, 6.6), sharex=True, layout="constrained",
                                      gridspec_kw={"height_ratios": [2, 1.2]})
    if len(arms) < 2 or "final_val_loss" not in runs:
        no_data(top, "needs two arms with final losses")
        return fig
    depths = sorted(int(d) for d in runs["depth"].unique())
    edge_any = False
    rows = {}
    for b in arms[1:]:
        spec = {"study": t.study, "metric": "final_val_loss", "arms": [arms[0], b], "over": "best_lr"}
        rows[b] = {int(r["depth"]): r for r in verdict_rows("best_lr", spec, runs, t.steps, t.spec)}
    spacing = 0.06 * (np.log2(max(depths) / min(depths)) if len(depths) > 1 else 1)
    for i, arm in enumerate(arms):
        xs, means = [], []
        for depth in depths:
            r = rows[arms[1]][depth] if arm == arms[0] else rows[arm][depth]
            lr = float(r["lr_a"] if arm == arms[0] else r["lr_b"])
            cell = runs[(runs["variant"] == arm) & (runs["depth"] == depth) & np.isclose(runs["lr"], lr)]
            ppl = np.exp(cell["final_val_loss"].astype(float).to_numpy())
            x = depth * 2 ** ((i - (len(arms) - 1) / 2) * spacing)
            colour = t.palette[arm]
            for seed, p in zip(cell["seed"], ppl):
                if np.isfinite(p):
                    top.scatter([x], [p], marker=seed_marker(seed), s=26, facecolor="none", edgecolor=colour, lw=1,
                                zorder=4)
            finite = ppl[np.isfinite(ppl)]
            mean = float(np.exp(np.log(finite).mean())) if len(finite) else np.nan
            xs.append(x)
            means.append(mean)
            edge = not grid[0] < lr < grid[-1]  # as the verdict's best_lr_inside_grid
            edge_any |= edge
            if len(grid) > 1:
                top.annotate(f"{fmt(lr)}" + (" (edge)" if edge else ""), (x, mean), xytext=(0, 9 if i else -10),
                             textcoords="offset points", ha="center", va="bottom" if i else "top", fontsize=7.5,
                             color=EDGE if edge else "0.25", zorder=6,
                             bbox=dict(facecolor="white", edgecolor="none", alpha=0.75, pad=0.5))
            k = int(cell["diverged"].sum())
            if k:
                top.annotate(f"{k}/{len(cell)} div.", (x, mean), xytext=(0, 8), textcoords="offset points",
                             ha="center", fontsize=7, color=DIVERGED)
        top.plot(xs, means, color=t.palette[arm], lw=2, marker="o", ms=5, zorder=3)
    top.set_ylabel("final validation perplexity\nat the arm's best LR (lower is better)")
    top.margins(y=0.12)
    top.set_xscale("log", base=2)
    top.set_xticks(depths, [str(d) for d in depths])
    top.xaxis.set_minor_locator(plt.NullLocator())
    texts = []
    for j, b in enumerate(arms[1:]):
        colour = t.palette[b]
        for depth in depths:
            r = rows[b][depth]
            a_vals, b_vals = _seed_losses(runs, arms[0], depth, r["lr_a"]), _seed_losses(runs, b, depth, r["lr_b"])
            x = depth * 2 ** ((j - (len(arms) - 2) / 2) * spacing)
            diffs = {s: b_vals[s] - a_vals[s] for s in sorted(set(a_vals) & set(b_vals))}
            for s, d in diffs.items():
                if np.isfinite(d):
                    bottom.scatter([x], [d], marker=seed_marker(s), s=26, facecolor="none", edgecolor=colour, lw=1,
                                   zorder=4)
            if r["n"]:
                bottom.scatter([x], [r["diff_finite_mean"]], marker="_", s=260, lw=2.4, color=colour, zorder=5)
            texts.append(f"{depth} layers, {label(b)} − {label(arms[0])}: {_reading(r)}")
    bottom.axhline(0, color="0.3", lw=0.9)
    bottom.set_ylabel(f"final loss, arm − {label(arms[0])}\n(nats; below 0: the arm is better)")
    bottom.set_xlabel("depth (transformer layers, log scale)")
    bottom.set_title("\n".join(texts), fontsize=7, loc="left", color="0.2")
    bottom.margins(y=0.2)
    seeds = sorted(int(s) for s in runs["seed"].unique())
    handles = [Line2D([], [], color=t.palette[a], lw=2, marker="o", ms=5, label=label(a)) for a in arms]
    handles += [Line2D([], [], ls="none", marker=seed_marker(s), mfc="none", mec="0.3", ms=6, label=f"seed {s}")
                for s in seeds]
    handles.append(Line2D([], [], ls="none", marker="_", ms=14, mew=2.4, color="0.3",
                          label="mean of the paired differences"))
    figure_legend(fig, handles, ncol=min(len(handles), 4))
    grid_text = (f"each point labelled with its best LR of the grid {', '.join(map(fmt, grid))}" + (
        "; (edge): at the grid's edge, so the arm's optimum may lie outside it" if edge_any else "")
        if len(grid) > 1 else f"one LR in the grid ({fmt(grid[0])}): no best LR chosen, the arms' optima may lie "
        "outside it")
    claim_title(fig, "MLRA: lower perplexity than the baseline, more so in deeper models "
                "(each arm at its own best LR)", regime(t.spec, runs, t.steps) + "\n" + grid_text, fontsize=10)
    return fig


def _seed_losses(runs: pd.DataFrame, arm: str, depth: int, lr: float) -> dict[int, float]:
    cell = runs[(runs["variant"] == arm) & (runs["depth"] == depth) & np.isclose(runs["lr"], float(lr))]
    out = {}
    for seed, loss, gone in zip(cell["seed"], cell["final_val_loss"].astype(float), cell["diverged"]):
        out[int(seed)] = math.inf if (loss != loss and bool(gone)) else float(loss)
    return out


# ------------------------------------------------------------------------------------------ SPAM


def spike_arms(variants: list[str], present: set[str]) -> tuple[str, str] | None:
    """The two arms of the SPAM comparison: the study's first variant (Adam) and SPAM, else its second."""
    shown = [v for v in variants if v in present]
    if len(shown) < 2:
        return None
    return shown[0], "spam" if "spam" in shown[1:] else shown[1]


def loss_gap_vs_step(t: StudyTables):
    """Top: training loss (rolling mean over ~5 % of the run) of the two arms, every seed thin, their
    mean thick, validation loss as markers. Bottom: the second arm minus the first in validation loss,
    seed by seed (paired), at every evaluation, with the paper's own gap; one column per peak LR."""
    steps, runs = t.steps, t.runs
    arms = spike_arms(t.variants, set(steps["variant"]) if len(steps) else set())
    lrs = sorted(float(x) for x in steps["lr"].unique()) if len(steps) else []
    cols = max(1, len(lrs))
    fig, axes = plt.subplots(2, cols, figsize=(5.6 * cols, 6.6), squeeze=False, layout="constrained",
                             gridspec_kw={"height_ratios": [1.6, 1]}, sharex="col")
    if arms is None or "val_loss" not in steps:
        no_data(axes[0][0], "needs two arms with validation losses")
        return fig
    a, b = arms
    gone = {(r.variant, float(r.lr), int(r.seed)) for r in runs[runs["diverged"].astype(bool)].itertuples()}
    seeds = sorted(int(s) for s in steps["seed"].unique())
    spec = {"study": t.study, "metric": "val_loss", "arms": [a, b], "over": "step"}
    rows = pd.DataFrame(verdict_rows("gap", spec, runs, steps, t.spec))
    reference = b == "spam"
    for j, lr in enumerate(lrs):
        top, bottom = axes[0][j], axes[1][j]
        cell = steps[np.isclose(steps["lr"], lr)]
        window = max(1, int(len(cell["step"].unique()) * 0.05))
        lows, highs = [], []
        for arm in (a, b):
            colour = t.palette[arm]
            curves = {}
            for seed, g in cell[cell["variant"] == arm].groupby("seed"):
                g = g.sort_values("step")
                smooth = g.set_index("step")["train_loss"].rolling(window, min_periods=1).mean()
                curves[int(seed)] = smooth
                top.plot(smooth.index, smooth.to_numpy(), color=colour, lw=0.7, alpha=0.5)
                v = g.dropna(subset=["val_loss"])
                lows += [float(smooth.min()), float(v["val_loss"].min()) if len(v) else np.inf]
                top.scatter(v["step"], v["val_loss"], marker=seed_marker(seed), s=22, facecolor="none",
                            edgecolor=colour, lw=1, zorder=4)
                if (arm, lr, int(seed)) in gone:
                    top.scatter(g["step"].iloc[-1:], smooth.iloc[-1:], marker="x", s=60, lw=2, color=DIVERGED,
                                zorder=6)
            if curves:
                mean = pd.concat(curves, axis=1).dropna().mean(axis=1)
                top.plot(mean.index, mean.to_numpy(), color=colour, lw=2)
                highs.append(float(mean.iloc[len(mean) // 10]))  # the axis starts after the first tenth's drop
        lo = min(x for x in lows if np.isfinite(x)) if lows else np.nan
        if highs and np.isfinite(lo):
            hi = max(highs)
            top.set_ylim(lo - 0.06 * (hi - lo), hi)
        top.set_title(f"peak LR {fmt(lr)}", fontsize=10)
        top.set_ylabel("loss (nats)" if j == 0 else "")
        r = rows[np.isclose(rows["lr_a"], lr)].sort_values("step") if len(rows) else rows
        for seed in seeds:
            diffs = []
            for _, row in r.iterrows():
                av = steps[(steps["variant"] == a) & np.isclose(steps["lr"], lr) & (steps["seed"] == seed)
                           & (steps["step"] == row["step"])]["val_loss"]
                bv = steps[(steps["variant"] == b) & np.isclose(steps["lr"], lr) & (steps["seed"] == seed)
                           & (steps["step"] == row["step"])]["val_loss"]
                if len(av) and len(bv):
                    diffs.append((row["step"], float(bv.iloc[0]) - float(av.iloc[0])))
            if diffs:
                x, y = zip(*diffs)
                bottom.plot(x, y, color="0.45", lw=0.8, marker=seed_marker(seed), mfc="none", ms=5)
        if len(r):
            bottom.plot(r["step"], r["diff_finite_mean"], color=t.palette[b], lw=2.2, marker="o", ms=4, zorder=4)
            last = r.iloc[-1]
            text = textwrap.fill(f"{label(b)} − {label(a)} at step {int(last['step'])}: {_reading(last.to_dict())}",
                                 70)
            bottom.set_title(text, fontsize=7.5, loc="left", color="0.2")
        bottom.axhline(0, color="0.3", lw=0.9)
        if reference:
            bottom.axhline(SPAM_PAPER_GAP, color="0.55", ls="--", lw=1.2)
        bottom.set_xlabel("training step")
        bottom.set_ylabel(f"gap in val. loss (nats)\nbelow 0: {label(b)} better" if j == 0 else "")
        bottom.margins(y=0.3)
    limits = [ax.get_ylim() for ax in axes[1]]  # the gaps of every LR on one scale
    for ax in axes[1]:
        ax.set_ylim(min(lo for lo, _ in limits), max(hi for _, hi in limits))
    handles = [Line2D([], [], color=t.palette[v], lw=2, label=f"{label(v)} (thick: mean of the seeds' training loss)")
               for v in (a, b)]
    handles += [Line2D([], [], ls="none", marker=seed_marker(s), mfc="none", mec="0.3", ms=6,
                       label=f"seed {s}: validation loss / its paired gap") for s in seeds]
    handles.append(Line2D([], [], color=t.palette[b], lw=2.2, marker="o", ms=4, label="mean paired gap"))
    if reference:
        handles.append(Line2D([], [], color="0.55", ls="--", lw=1.2, label=f"{SPAM_PAPER} = {SPAM_PAPER_GAP:+.3f}"))
    figure_legend(fig, handles, ncol=2)
    n = seed_count(t.spec)
    claim_title(fig, f"SPAM (arXiv 2501.06842): {label(b)} reaches a lower loss than {label(a)} — the gap over "
                "training, seed by seed", regime(t.spec, runs, steps) + f"; training loss smoothed over {window} "
                f"logged steps; verdict rule: a sign in all of n ≥ 3 seeds (here n = {n})", fontsize=10)
    return fig
