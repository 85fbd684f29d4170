"""Points with intervals along depth or LR (`vs_x`), seed bands of curves, and bar charts."""

from __future__ import annotations

import matplotlib.ticker as mticker
import matplotlib.transforms as mtransforms
import numpy as np
import pandas as pd
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from ..methods import label
from .style import DIVERGED, POINT_LEGEND, div_handle, figure_legend, fmt, no_data, variant_handles


def seed_band(ax, data: pd.DataFrame, x: str, y: str, colour, diverged=(), **line) -> None:
    """Seed mean with the range of the seeds (min to max) as a band over the steps all seeds
    reached, single seeds thin. Diverged seeds are left out of the mean and drawn on their own
    (ending where they stopped)."""
    data = data.dropna(subset=[y])
    if data.empty:
        return
    for _, g in data[data["seed"].isin(diverged)].groupby("seed"):
        g = g.sort_values(x)
        ax.plot(g[x], g[y], color=colour, lw=1.1, alpha=0.85, ls=line.get("ls", "-"), marker=line.get("marker"),
                ms=line.get("ms"))
    data = data[~data["seed"].isin(diverged)]
    seeds = data["seed"].unique()
    if len(seeds) < 2:
        d = data.sort_values(x)
        ax.plot(d[x], d[y], color=colour, **line)
        return
    for _, g in data.groupby("seed"):
        g = g.sort_values(x)
        ax.plot(g[x], g[y], color=colour, lw=0.7, alpha=0.35, ls=line.get("ls", "-"))
    table = data.pivot_table(index=x, columns="seed", values=y, aggfunc="mean").dropna()  # steps all seeds reached
    if table.empty:
        return
    values = table.to_numpy(float)
    ax.fill_between(table.index, values.min(axis=1), values.max(axis=1), color=colour, alpha=0.18, lw=0)
    ax.plot(table.index, values.mean(axis=1), color=colour, **line)


def _dodge(x: np.ndarray, i: int, k: int, log: bool, spacing: float) -> np.ndarray:
    off = (i - (k - 1) / 2) * (0.06 if log else 0.09)
    return x * 10 ** (off * spacing) if log else x + off * spacing


def vs_x(ax, df: pd.DataFrame, x: str, variants: list[str], palette: dict, n_runs: int, logx: bool = False,
          logy: bool = False, runs: pd.DataFrame | None = None,
          hline: tuple[float, str] | None = None) -> tuple[bool, bool]:
    """Per variant along x (depth or LR): the mean over seeds (the geometric mean on a log axis) with
    the seeds' range (min to max) as its bar, single seeds as small open circles (from `runs`, when
    given and there are several seeds), diverged points marked. `n_runs` is the planned number of
    seeds; each point's note counts its own runs (`n_runs` column of the summary).

    Returns (some point has diverged runs, some point has no value because all its runs diverged)."""
    xs = np.array(sorted(df[x].dropna().unique()), dtype=float)
    if len(xs) == 0:
        no_data(ax)
        return False, False
    spacing = (np.log10(xs.max() / xs.min()) / max(1, len(xs) - 1) if logx else
               (xs.max() - xs.min()) / max(1, len(xs) - 1)) or 1.0
    shown = [v for v in variants if v in set(df["variant"])]
    centre = "gmean" if logy and "gmean" in df else "mean"
    finite = df[centre].replace([np.inf, -np.inf], np.nan)
    positive = finite[finite > 0] if logy else finite.dropna()
    floor = float(positive.min()) / 3 if logy and len(positive) else None
    some_div, all_div = False, False
    px_all: list[float] = []
    lost: list[tuple[float, float, str]] = []  # (x, offset in points, colour) of points with no value
    partial: dict[float, list[tuple[str, int]]] = {}  # x -> [(variant, n diverged)] for points with a value
    for i, variant in enumerate(shown):
        d = df[df["variant"] == variant].sort_values(x)
        px = _dodge(d[x].to_numpy(float), i, len(shown), logx, spacing)
        mean = d[centre].to_numpy(float)
        lo, hi = (d["min"].to_numpy(float), d["max"].to_numpy(float)) if "min" in d else (mean, mean)
        ok = np.isfinite(mean) & ((mean > 0) if logy else True)
        px_all += list(px)
        colour = palette[variant]
        ax.plot(px[ok], mean[ok], marker="o", ms=4.5, lw=1.8, color=colour, label=label(variant), zorder=3)
        metric = str(d["metric"].iloc[0]) if len(d) else ""
        if runs is not None and n_runs > 1 and metric in runs:
            r = runs[runs["variant"] == variant].merge(d[["depth", "lr"]], on=["depth", "lr"])
            r = r[np.isfinite(r[metric].astype(float)) & ((r[metric] > 0) if logy else True)]
            pos = dict(zip(d[x].to_numpy(float), px))
            rx = [pos.get(float(v), np.nan) for v in r[x]]
            ax.scatter(rx, r[metric], s=14, facecolor="none", edgecolor=colour, lw=0.8, alpha=0.8, zorder=4)
        band = ok & np.isfinite(lo) & np.isfinite(hi) & (hi > lo)
        if band.any():
            ax.errorbar(px[band], mean[band], yerr=[mean[band] - lo[band], hi[band] - mean[band]], fmt="none",
                        ecolor=colour, elinewidth=1, capsize=2.5, zorder=3)
        nd = d["n_diverged"].to_numpy(int)
        runs_at = dict(zip(px, d["n_runs"].to_numpy(int) if "n_runs" in d else [n_runs] * len(d)))
        x_of = dict(zip(px, d[x].to_numpy(float)))
        for xi, m, k, good in zip(px, mean, nd, ok):
            if k <= 0:
                continue
            if good:
                some_div = True
                ax.scatter([xi], [m], marker="x", s=60, lw=2, color=DIVERGED, zorder=6)
                partial.setdefault(x_of[xi], []).append((variant, f"{k}/{runs_at[xi]}"))
            else:
                all_div = True
                lost.append((x_of[xi], (i - (len(shown) - 1) / 2) * 9.0, colour))
    pad = 0.35 * spacing
    if logx:
        ax.set_xscale("log")
        ax.set_xlim(xs.min() / 10 ** pad, xs.max() * 10 ** pad)
        ax.set_xticks(xs)
        ax.xaxis.set_major_formatter(mticker.FuncFormatter(lambda v, _: fmt(v)))
        ax.xaxis.set_minor_locator(mticker.NullLocator())
    else:
        ax.set_xlim(xs.min() - pad, xs.max() + pad)
        ax.set_xticks(xs)
        ax.xaxis.set_major_formatter(mticker.FuncFormatter(lambda v, _: fmt(v)))
    if logy:
        ax.set_yscale("log")
        if floor is not None:
            ax.set_ylim(bottom=floor)
        lo_, hi_ = ax.get_ylim()
        if hi_ / lo_ < 300:  # few decades: label 1-2-5 ticks too
            ax.yaxis.set_major_locator(mticker.LogLocator(subs=(1.0, 2.0, 5.0)))
            ax.yaxis.set_major_formatter(mticker.FuncFormatter(lambda v, _: f"{v:g}"))
            ax.yaxis.set_minor_formatter(mticker.NullFormatter())
    if hline is not None and np.isfinite(hline[0]):  # a reference level (e.g. the loss at init)
        ax.axhline(hline[0], color="0.35", ls=":", lw=1, zorder=1)
        ax.annotate(hline[1], (0.98, hline[0]), xycoords=("axes fraction", "data"), ha="right", va="bottom",
                    fontsize=7.5, color="0.35")
        ax.update_datalim([(px_all[0], hline[0])] if px_all else [])
        ax.autoscale_view(scalex=False)
    notes = {}
    for xv, entries in partial.items():  # one note per x, in a strip above the data
        ks = {k for _, k in entries}
        if len(ks) == 1 and len(entries) == len(shown):
            notes[xv] = f"{ks.pop()} div."
        else:
            notes[xv] = "\n".join(f"{label(v)}: {k} div." for v, k in entries)
    lines = max((t.count("\n") + 1 for t in notes.values()), default=0)
    frac = (0.13 if lost else 0.0) + (0.045 * lines + 0.03 if notes else 0.0)
    if frac:  # headroom: the data keep the lower (1 - frac) of the panel
        lo_, hi_ = ax.get_ylim()
        if logy:
            ax.set_ylim(lo_, hi_ * (hi_ / lo_) ** (frac / (1 - frac)))
        else:
            ax.set_ylim(lo_, hi_ + frac / (1 - frac) * (hi_ - lo_))
    top = 0.985
    if lost:  # a "diverged" row at the top: the points that have no value
        trans = mtransforms.blended_transform_factory(ax.transData, ax.transAxes)
        ax.axhspan(1 - 0.13, 1.0, color=DIVERGED, alpha=0.1, lw=0, transform=ax.transAxes)
        ax.plot([0, 1], [1 - 0.13] * 2, transform=ax.transAxes, color=DIVERGED, lw=0.6, alpha=0.6, zorder=4)
        # no y tick inside the row: its markers are not values
        lo_, _ = ax.get_ylim()
        cut = ax.transData.inverted().transform(ax.transAxes.transform((0, 1 - 0.13)))[1]
        ax.set_yticks([t for t in ax.get_yticks() if lo_ <= t <= cut])
        ax.set_ylim(lo_, ax.get_ylim()[1])
        for xv, dx, colour in lost:
            t = trans + mtransforms.ScaledTranslation(dx / 72, 0, ax.figure.dpi_scale_trans)
            ax.scatter([xv], [1 - 0.065], transform=t, marker="o", s=70, color=colour, edgecolor="white", lw=0.8,
                       zorder=5, clip_on=False)
            ax.scatter([xv], [1 - 0.065], transform=t, marker="x", s=28, lw=1.8, color=DIVERGED, zorder=6,
                       clip_on=False)
        ax.text(0.02, 1 - 0.065, "no value, all runs diverged:", transform=ax.transAxes, fontsize=7.5,
                color=DIVERGED, va="center", ha="left")
        top = 1 - 0.14
    for xv, text in notes.items():  # at the first / last x, align the note inwards so it stays in the panel
        ha = "right" if xv == xs.max() and len(xs) > 1 else "left" if xv == xs.min() and len(xs) > 1 else "center"
        ax.text(xv, top, text, transform=ax.get_xaxis_transform(), ha=ha, va="top", fontsize=7,
                color=DIVERGED, zorder=7, bbox=dict(facecolor="white", edgecolor="none", alpha=0.85, pad=1))
    return some_div, all_div


def vs_x_legend(fig, variants, palette, some_div, all_div, n_runs, band: bool) -> None:
    handles = variant_handles(variants, palette)
    if band:
        handles.append(Line2D([], [], color="0.3", marker="|", ms=11, mew=1.3, ls="none", label=POINT_LEGEND))
        handles.append(Line2D([], [], color="0.3", marker="o", ms=4.5, mfc="none", ls="none", label="single seeds"))
    if some_div:
        handles.append(div_handle("k of n runs diverged (n: the point's runs)"))
    if all_div:
        handles.append(Patch(color=DIVERGED, alpha=0.15, label="no value: all runs diverged"))
    figure_legend(fig, handles, ncol=2 if fig.get_figwidth() < 6 else 4)


def draw_bars(ax, rows, palette):
    """One bar per (label, variant, summary row): the mean over seeds, the seeds' range as its
    error bar; returns (means, lows, highs) (NaN range with one seed)."""
    xs = np.arange(len(rows))
    means = np.array([float(r["mean"]) for _, _, r in rows])
    lows = np.array([float(r.get("min", np.nan)) if r.get("n", 1) > 1 else np.nan for _, _, r in rows])
    highs = np.array([float(r.get("max", np.nan)) if r.get("n", 1) > 1 else np.nan for _, _, r in rows])
    ax.bar(xs, np.nan_to_num(means), color=[palette[v] for _, v, _ in rows], width=0.62, edgecolor="0.2", lw=0.6)
    ranged = np.isfinite(lows) & np.isfinite(highs)
    if ranged.any():
        ax.errorbar(xs[ranged], means[ranged], yerr=[means[ranged] - lows[ranged], highs[ranged] - means[ranged]],
                    fmt="none", ecolor="0.15", elinewidth=1.2, capsize=5)
    return means, lows, highs


def label_bars(ax, rows, means, highs, top, value_text, pad, fontsize):
    """Each bar's value above it, and its label below, with 'k/n div.' when k of its n runs diverged."""
    xs = np.arange(len(rows))
    for x, m, h, (_, _, r) in zip(xs, means, highs, rows):
        text = "n/a" if not np.isfinite(m) else value_text(m, r)
        y = max(np.nan_to_num(m), np.nan_to_num(h))
        ax.text(x, y + pad * top, text, ha="center", va="bottom", fontsize=fontsize)
    ticks = []
    for name, _, r in rows:
        k = int(r["n_diverged"])
        ticks.append(f"{name}\n({k}/{int(r.get('n_runs', r['n']))} div.)" if k else name)
    ax.set_xticks(xs, ticks)


def bar_rows(table: pd.DataFrame, variants: list[str], keys: list[str], describe) -> list[tuple]:
    """(label, variant, table row) per bar: each variant (in order) at each combination of `keys`
    present in `table` (sorted). Labels are the variant, plus `describe(*values)` in parentheses
    when there is more than one combination."""
    combos = list(table[keys].dropna().drop_duplicates().sort_values(keys).itertuples(index=False, name=None))
    rows = []
    for variant in variants:
        for values in combos:
            mask = table["variant"] == variant
            for key, value in zip(keys, values):
                mask &= np.isclose(table[key], value)
            r = table[mask]
            if len(r):
                name = label(variant)
                rows.append((name if len(combos) == 1 else f"{name}\n({describe(*values)})", variant, r.iloc[0]))
    return rows

