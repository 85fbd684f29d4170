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


def _keep(values: np.ndarray, yscale: str) -> np.ndarray:
    """Values that have a place on the axis: finite, and positive on a log axis."""
    ok = np.isfinite(values)
    return ok & (values > 0) if yscale == "log" else ok


def _cell_values(d: pd.DataFrame, runs: pd.DataFrame | None, variant: str, metric: str, yscale: str):
    """Per x of one variant: (centre, low, high, survivors' values, diverged runs' values, n diverged, n runs).
    From `runs` when it holds the metric: the centre (the mean; geometric on a log axis) and range over the
    runs that did not diverge only; a diverged run's value (its last measurement before it stopped) is
    returned apart, never averaged in. Else from the summary's own columns."""
    out = []
    from_runs = runs is not None and metric in runs
    for row in d.itertuples(index=False):
        k_div, n_at = int(getattr(row, "n_diverged", 0)), int(getattr(row, "n_runs", 0) or 0)
        if from_runs:
            r = runs[(runs["variant"] == variant) & np.isclose(runs["lr"].astype(float), float(row.lr))
                     & (runs["depth"] == row.depth)]
            values = r[metric].astype(float).to_numpy()
            gone = r["diverged"].astype(bool).to_numpy()
            alive = values[~gone][_keep(values[~gone], yscale)]
            dead = values[gone][_keep(values[gone], yscale)]
            k_div, n_at = int(gone.sum()), len(r)
            if len(alive):
                centre = float(np.exp(np.log(alive).mean())) if yscale == "log" else float(alive.mean())
                out.append((centre, float(alive.min()), float(alive.max()), alive, dead, k_div, n_at))
            else:
                out.append((np.nan, np.nan, np.nan, alive, dead, k_div, n_at))
            continue
        centre = getattr(row, "gmean", np.nan) if yscale == "log" else row.mean
        lo, hi = getattr(row, "min", centre), getattr(row, "max", centre)
        out.append((float(centre), float(lo), float(hi), np.array([]), np.array([]), k_div, n_at))
    return out


def _headroom(ax, frac: float) -> None:
    """Extend the y axis upwards so that the data keep the lower (1 - frac) of the panel (any scale)."""
    lo_, hi_ = ax.get_ylim()
    t = ax.yaxis.get_transform()
    a, b = t.transform([lo_, hi_])
    top = t.inverted().transform([b + frac / (1 - frac) * (b - a)])[0]
    ax.set_ylim(lo_, top)


def vs_x(ax, df: pd.DataFrame, x: str, variants: list[str], palette: dict, n_runs: int, logx: bool = False,
         logy: bool = False, runs: pd.DataFrame | None = None, hline: tuple[float, str] | None = None,
         yscale: str | None = None, linthresh: float = 1.0, reference: dict[float, float] | None = None,
         ylim: tuple[float, float] | None = None) -> set[str]:
    """Per variant along x (depth or LR): the mean over the seeds that did not diverge (the geometric
    mean on a log axis) with their range (min to max) as its bar, single seeds as small open circles
    (from `runs`, when given and there are several seeds). Diverged runs are never averaged in: a run
    that diverged but has a value (a metric's last measurement before it stopped) is drawn on its own
    as a ✕ in its variant's colour with a red edge; one with no value (a loss) marks its cell's mean
    with a red x; a cell whose runs all diverged without a value sits in a red strip at the top. Each
    x with diverged runs says 'k/n div.' in a band above the data. `yscale`: linear, log or symlog
    (`linthresh`: its linear range), for values whose sign matters. `reference`: {x: value} of the
    paper's own numbers, drawn as grey stars. `ylim`: the data range, when panels share it (`shared_ylim`).

    Returns which marks the panel drew: 'partial' (a red x on a mean), 'lost' (the strip),
    'diverged_values' (diverged runs' own values), 'reference' (the paper's numbers)."""
    yscale = yscale or ("log" if logy else "linear")
    xs = np.array(sorted(df[x].dropna().unique()), dtype=float)
    marks: set[str] = set()
    if len(xs) == 0:
        no_data(ax)
        return marks
    spacing = (np.log10(xs.max() / xs.min()) / max(1, len(xs) - 1) if logx else
               (xs.max() - xs.min()) / max(1, len(xs) - 1)) or 1.0
    shown = [v for v in variants if v in set(df["variant"])]
    ax.margins(y=0.08)  # room for the markers at the ends (a paper's star at the top)
    lost: list[tuple[float, float, str]] = []  # (x, offset in points, colour) of cells with no value
    counts: dict[float, list[int]] = {}  # x -> [diverged, runs] over the variants drawn
    for i, variant in enumerate(shown):
        d = df[df["variant"] == variant].sort_values(x)
        metric = str(d["metric"].iloc[0]) if "metric" in d and len(d) else ""
        px = _dodge(d[x].to_numpy(float), i, len(shown), logx, spacing)
        cells = _cell_values(d, runs, variant, metric, yscale)
        mean = np.array([c[0] for c in cells])
        lo, hi = np.array([c[1] for c in cells]), np.array([c[2] for c in cells])
        ok = _keep(mean, yscale)
        colour = palette[variant]
        ax.plot(px[ok], mean[ok], marker="o", ms=4.5, lw=1.8, color=colour, label=label(variant), zorder=3)
        band = ok & np.isfinite(lo) & np.isfinite(hi) & (hi > lo)
        if band.any():
            ax.errorbar(px[band], mean[band], yerr=[mean[band] - lo[band], hi[band] - mean[band]], fmt="none",
                        ecolor=colour, elinewidth=1, capsize=2.5, zorder=3)
        for xi, xv, good, (m, _, _, alive, dead, k, n_at) in zip(px, d[x].to_numpy(float), ok, cells):
            if n_runs > 1 and len(alive):
                ax.scatter([xi] * len(alive), alive, s=14, facecolor="none", edgecolor=colour, lw=0.8, alpha=0.8,
                           zorder=4)
            if len(dead):
                ax.scatter([xi] * len(dead), dead, marker="X", s=70, color=colour, edgecolor=DIVERGED, lw=1.3,
                           zorder=6)
                marks.add("diverged_values")
            if k > 0:
                c = counts.setdefault(float(xv), [0, 0])
                c[0] += k
                if k > len(dead) and good:  # diverged runs without a value: their cell's mean is the others'
                    ax.scatter([xi], [m], marker="x", s=60, lw=2, color=DIVERGED, zorder=6)
                    marks.add("partial")
                elif k > len(dead) and not len(dead):
                    lost.append((float(xv), (i - (len(shown) - 1) / 2) * 9.0, colour))
                    marks.add("lost")
            counts.setdefault(float(xv), [0, 0])[1] += n_at or n_runs
    if reference:
        inside = {k: v for k, v in reference.items() if xs.min() <= k <= xs.max() and np.isfinite(v)}
        if inside:
            ax.scatter(list(inside), list(inside.values()), marker="*", s=110, color="0.55", edgecolor="0.3", lw=0.5,
                       zorder=5)
            marks.add("reference")
    pad = 0.35 * spacing
    if logx:
        ax.set_xscale("log")
        ax.set_xlim(xs.min() / 10 ** pad, xs.max() * 10 ** pad)
    else:
        ax.set_xlim(xs.min() - pad, xs.max() + pad)
    ax.set_xticks(xs)
    ax.xaxis.set_major_formatter(mticker.FuncFormatter(lambda v, _: fmt(v)))
    ax.xaxis.set_minor_locator(mticker.NullLocator())
    if yscale == "log":
        ax.set_yscale("log")
        lo_, hi_ = ax.get_ylim()
        if hi_ / lo_ < 300:  # few decades: label 1-2-5 ticks too
            ax.yaxis.set_major_locator(mticker.LogLocator(subs=(1.0, 2.0, 5.0)))
            ax.yaxis.set_major_formatter(mticker.FuncFormatter(lambda v, _: f"{v:g}"))
            ax.yaxis.set_minor_formatter(mticker.NullFormatter())
    elif yscale == "symlog":
        ax.set_yscale("symlog", linthresh=linthresh)
        ax.autoscale_view(scalex=False)  # the margins again, in the symlog scale
        ax.axhline(0, color="0.35", lw=0.8, zorder=1)
    if hline is not None and np.isfinite(hline[0]):  # a reference level (e.g. the loss at init)
        ax.axhline(hline[0], color="0.35", ls=":", lw=1, zorder=1)
        ax.annotate(hline[1], (0.98, hline[0]), xycoords=("axes fraction", "data"), ha="right", va="bottom",
                    fontsize=7.5, color="0.35")
        ax.update_datalim([(xs[0], hline[0])])
        ax.autoscale_view(scalex=False)
    if ylim is not None:
        ax.set_ylim(*ylim)
    notes = {xv: f"{k}/{n}" for xv, (k, n) in counts.items() if k}
    strip, note_band = 0.12, 0.08
    frac = (strip if lost else 0.0) + (note_band if notes else 0.0)
    if frac:
        _headroom(ax, frac)
    top = 1.0
    if lost:  # a "diverged" row at the top: the cells that have no value
        trans = mtransforms.blended_transform_factory(ax.transData, ax.transAxes)
        ax.axhspan(1 - strip, 1.0, color=DIVERGED, alpha=0.1, lw=0, transform=ax.transAxes)
        ax.plot([0, 1], [1 - strip] * 2, transform=ax.transAxes, color=DIVERGED, lw=0.6, alpha=0.6, zorder=4)
        lo_, _ = ax.get_ylim()
        cut = ax.transData.inverted().transform(ax.transAxes.transform((0, 1 - strip)))[1]
        ax.set_yticks([t for t in ax.get_yticks() if lo_ <= t <= cut])
        ax.set_ylim(lo_, ax.get_ylim()[1])
        for xv, dx, colour in lost:
            t = trans + mtransforms.ScaledTranslation(dx / 72, 0, ax.figure.dpi_scale_trans)
            ax.scatter([xv], [1 - strip / 2], transform=t, marker="o", s=70, color=colour, edgecolor="white", lw=0.8,
                       zorder=5, clip_on=False)
            ax.scatter([xv], [1 - strip / 2], transform=t, marker="x", s=28, lw=1.8, color=DIVERGED, zorder=6,
                       clip_on=False)
        ax.text(0.02, 1 - strip / 2, "no value, all runs diverged:", transform=ax.transAxes, fontsize=7.5,
                color=DIVERGED, va="center", ha="left")
        top = 1 - strip
    if notes:  # one count per x ("k/n": k of the n runs there diverged), in its own band above the data
        ax.text(0.01, top - 0.012, "runs diverged:", transform=ax.transAxes, ha="left", va="top", fontsize=7,
                color=DIVERGED, zorder=7)
    for xv, text in notes.items():
        ax.text(xv, top - 0.012, text, transform=ax.get_xaxis_transform(), ha="center", va="top", fontsize=7,
                color=DIVERGED, zorder=7)
    return marks


def shared_ylim(frames: list[pd.DataFrame], runs: pd.DataFrame | None, metric: str, log: bool,
                margin: float = 0.06) -> tuple[float, float] | None:
    """One y range for panels that are compared: every mean, range end and run value of `metric` in
    `frames` (summary rows) and `runs`, with a margin (in the axis' own scale)."""
    parts = [f[c] for f in frames for c in ("mean", "min", "max") if c in f]
    if runs is not None and metric in runs:
        parts.append(runs[metric])
    if not parts:
        return None
    v = pd.concat(parts).astype(float).to_numpy()
    v = v[np.isfinite(v) & ((v > 0) if log else True)]
    if not len(v):
        return None
    lo, hi = float(v.min()), float(v.max())
    if log:
        span = np.log10(hi / lo) or 0.1
        return lo / 10 ** (margin * span), hi * 10 ** (margin * span)
    span = (hi - lo) or max(abs(hi), 1.0) * 0.1
    return lo - margin * span, hi + margin * span


def vs_x_legend(fig, variants, palette, marks: set[str], n_runs, band: bool, reference: str | None = None,
                texts: dict[str, str] | None = None, title: str | None = None, ncol: int | None = None) -> None:
    handles = variant_handles(variants, palette, texts)
    if band:
        handles.append(Line2D([], [], color="0.3", marker="|", ms=11, mew=1.3, ls="none", label=POINT_LEGEND))
        handles.append(Line2D([], [], color="0.3", marker="o", ms=4.5, mfc="none", ls="none", label="single seeds"))
    if "partial" in marks:
        handles.append(div_handle("some runs diverged (no value; the mean is the others')"))
    if "diverged_values" in marks:
        handles.append(Line2D([], [], ls="none", marker="X", ms=8, color="0.6", mec=DIVERGED, mew=1.3,
                              label="a diverged run: its last measurement (not in the mean)"))
    if "lost" in marks:
        handles.append(Patch(color=DIVERGED, alpha=0.15, label="no value: all runs diverged"))
    if "reference" in marks and reference:
        handles.append(Line2D([], [], ls="none", marker="*", ms=11, color="0.55", mec="0.3", label=reference))
    figure_legend(fig, handles, ncol=ncol or (2 if fig.get_figwidth() < 6 else 3), title=title)


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

