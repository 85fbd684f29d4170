"""Loss curves: every study kind's first figure (training and validation loss vs tokens)."""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.lines import Line2D

from ..methods import label
from .points import seed_band
from .style import (
    DIVERGED,
    LOSS_CAP_MARGIN,
    facet_title,
    facets_of,
    figure_legend,
    no_data,
    panel_grid,
    seed_count,
    seed_curve_handles,
    tokens_axis,
    variant_handles,
)


def tokens_per_step(steps: pd.DataFrame) -> pd.Series:
    """tokens / step per run (constant within a run)."""
    s = steps[steps["step"] > 0]
    return (s["tokens"] / s["step"]).groupby([s[k] for k in ["variant", "depth", "lr", "seed"]]).median()


def _identical_variants(sub: pd.DataFrame, variants: list[str]) -> list[list[str]]:
    """Groups of variants whose training-loss curves are identical in every seed."""
    curves = {}
    for v in variants:
        g = sub[sub["variant"] == v].sort_values(["seed", "step"])
        curves[v] = (tuple(g["seed"]), tuple(g["step"]), g["train_loss"].to_numpy(float))
    groups: list[list[str]] = []
    for v in variants:
        for group in groups:
            a, b = curves[group[0]], curves[v]
            if a[:2] == b[:2] and len(a[2]) and np.allclose(a[2], b[2], rtol=0, atol=1e-9, equal_nan=True):
                group.append(v)
                break
        else:
            groups.append([v])
    return [g for g in groups if len(g) > 1]


def loss_curves(steps: pd.DataFrame, runs: pd.DataFrame, study: str, spec: dict, palette: dict):
    kind, variants = spec["kind"], list(spec["variants"])
    d = steps[steps["study"] == study].copy()
    r = runs[runs["study"] == study]
    n_seeds = seed_count(spec, int(d["seed"].nunique()) if len(d) else 1)
    facets = facets_of(d, kind) if len(d) else []
    fig, axes = panel_grid(max(1, len(facets)), width=5.6 if len(facets) <= 1 else 3.6, sharey=True)
    if not facets:
        no_data(axes[0])
        return fig
    init = r["initial_loss"].dropna() if "initial_loss" in r else pd.Series(dtype=float)
    first = d.sort_values("step").groupby(["variant", "depth", "lr", "seed"])["train_loss"].first()
    l0 = float(init.max()) if len(init) else float(first.max())
    cap = l0 + LOSS_CAP_MARGIN
    for col in ("train_loss", "val_loss"):
        if col not in d:
            d[col] = np.nan
        d[col] = d[col].replace([np.inf, -np.inf], np.nan)
    capped = bool(((d["train_loss"] > cap) | (d["val_loss"] > cap)).any())
    d["train_plot"], d["val_plot"] = d["train_loss"].clip(upper=cap), d["val_loss"].clip(upper=cap)
    tps = tokens_per_step(d)
    lowest = float(np.nanmin(d[["train_plot", "val_plot"]].to_numpy()))
    any_div = False
    for ax, (depth, lr) in zip(axes, facets):
        sub = d[(d["depth"] == depth) & np.isclose(d["lr"], lr)]
        for variant in [v for v in variants if v in set(sub["variant"])]:
            g = sub[sub["variant"] == variant]
            colour = palette[variant]
            gone = set(r[(r["variant"] == variant) & (r["depth"] == depth) & np.isclose(r["lr"], lr)
                         & r["diverged"]]["seed"])
            seed_band(ax, g, "tokens", "train_plot", colour, gone, lw=1.6)
            v = g.dropna(subset=["val_plot"])
            for _, gv in v[v["seed"].isin(gone)].groupby("seed"):  # diverged seeds: their own val points
                ax.plot(gv["tokens"], gv["val_plot"], color=colour, ls="--", marker="o", ms=3, lw=1, alpha=0.85)
            v = v[~v["seed"].isin(gone)]
            if len(v):
                full = v.groupby("tokens")["seed"].transform("nunique") == v["seed"].nunique()
                mv = v[full].groupby("tokens")["val_plot"].mean()
                ax.plot(mv.index, mv.to_numpy(), color=colour, ls="--", marker="o", ms=3.5, lw=1.3, zorder=4)
        same = _identical_variants(sub, [v for v in variants if v in set(sub["variant"])])
        if same:  # otherwise one curve would silently hide the other
            text = "identical curves (hidden under each other):\n" + "\n".join(" = ".join(map(label, g)) for g in same)
            ax.text(0.97, 0.96, text,
                    transform=ax.transAxes, ha="right", va="top", fontsize=7, color="0.3",
                    bbox=dict(facecolor="white", edgecolor="0.7", alpha=0.9, pad=2, lw=0.5))
        div = r[(r["depth"] == depth) & np.isclose(r["lr"], lr) & r["diverged"].astype(bool)]
        for row in div.itertuples(index=False):
            key = (row.variant, row.depth, row.lr, row.seed)
            step = row.diverged_step if pd.notna(row.diverged_step) else \
                sub[(sub["variant"] == row.variant) & (sub["seed"] == row.seed)]["step"].max()
            trace = sub[(sub["variant"] == row.variant) & (sub["seed"] == row.seed)].sort_values("step")
            last = trace["train_plot"].dropna()
            y = float(last.iloc[-1]) if len(last) else cap
            ax.scatter([step * tps.get(key, 1.0)], [y], marker="x", s=80, lw=2.2, color=DIVERGED, zorder=8,
                       clip_on=False)
            any_div = True
        if len(div):
            total = sub.groupby(["variant", "seed"]).ngroups
            when = sorted(int(x) for x in div["diverged_step"].dropna().unique())
            at = f" at step {when[0]}" if len(when) == 1 else (f" at steps {when[0]}–{when[-1]}" if when else "")
            ax.text(0.97, 0.04, f"{len(div)}/{total} runs diverged{at}", transform=ax.transAxes, ha="right",
                    va="bottom", fontsize=8, color=DIVERGED,
                    bbox=dict(facecolor="white", edgecolor=DIVERGED, alpha=0.9, pad=2, lw=0.6))
        ax.set_title(facet_title(depth, lr, kind, facets), fontsize=10)
        tokens_axis(ax)
        ax.set_ylabel("")
        if capped:
            ax.axhline(cap, color=DIVERGED, lw=0.8, ls=":", zorder=1)
    highest = cap if capped else float(np.nanmax(d[["train_plot", "val_plot"]].to_numpy()))
    span = max(highest - lowest, 1e-3)
    axes[0].set_ylim(lowest - 0.05 * span, highest + 0.05 * span)
    for ax in axes:
        if ax.get_subplotspec().is_first_col():
            ax.set_ylabel("cross-entropy loss (nats)")
    title = f"{study}: training loss (solid) and validation loss (dashed)"
    if capped:
        title += (f"\nloss axis capped at initial loss + {LOSS_CAP_MARGIN:g} = {cap:.2f} nats (dotted); "
                  "higher values are drawn at the cap")
    fig.suptitle(title, fontsize=10.5)
    handles = variant_handles([v for v in variants if v in set(d["variant"])], palette)
    handles += [Line2D([], [], color="0.3", lw=1.6,
                       label="train (mean over non-diverged seeds)" if n_seeds > 1 else "train"),
                Line2D([], [], color="0.3", lw=1.3, ls="--", marker="o", ms=3.5, label="validation")]
    handles += seed_curve_handles(n_seeds, any_div)
    figure_legend(fig, handles)
    return fig

