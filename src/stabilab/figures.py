"""Paper-style figures (seaborn; PNG and PDF) drawn from the tables alone.

Each study kind has its figures; `expected_figures` names them so that Snakemake knows its
outputs, and a caption file per figure (workflow/report/) says what it shows and which claim it
tests.

Conventions shared by every figure:
- one colour per variant, the same in every figure of every study (fixed for the variants of
  config.yaml, then in order of first appearance); red is kept for divergence;
- with two or more seeds: curves are the mean over the seeds that did not diverge with a 95 %
  bootstrap band, thin lines the single seeds; points vs depth / LR are the mean with the summary
  table's 95 % t-interval, open circles the single seeds;
- diverged runs stay visible: a red x where the run stopped (curves) or on the point (vs-LR /
  vs-depth), with "k/N div." above it; a point with no value because every seed diverged is drawn
  in a "diverged" strip at the top of the panel instead of vanishing;
- loss axes are capped at the initial loss + 1 nat; values above are drawn at the cap (said in the
  figure's title); variants whose curves are identical (and so hide each other) are named.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker as mticker  # noqa: E402
import matplotlib.transforms as mtransforms  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from .errors import UserError  # noqa: E402

# figure file stem -> caption file (workflow/report/) per study kind
FIGURES = {
    "depth": {
        "loss_curves": "loss_curves.rst",
        "ppl_vs_depth": "ppl_vs_depth.rst",
        "tev_vs_depth": "tev_vs_depth.rst",
        "tev_over_training": "tev_over_training.rst",
        "grad_norm_var_vs_depth": "grad_norm_var_vs_depth.rst",
    },
    "lr": {
        "loss_curves": "loss_curves.rst",
        "loss_vs_lr": "loss_vs_lr.rst",
        "lr_sensitivity": "lr_sensitivity.rst",
        "mu_norm_logits_vs_lr": "mu_norm_logits_vs_lr.rst",
    },
    "spikes": {
        "loss_curves": "loss_curves.rst",
        "grad_norm_traces": "grad_norm_traces.rst",
        "spike_counts": "spike_counts.rst",
    },
    "compare": {
        "loss_curves": "loss_curves.rst",
        "final_loss": "final_loss.rst",
    },
}
CATEGORY = {"depth": "Depth study (TEV / MLRA)", "lr": "Learning-rate study (OEC)", "spikes": "Gradient spikes (SPAM)",
            "compare": "Variants side by side"}

DIVERGED = "#d62728"  # red: reserved for divergence markers
SPIKE_FACTOR = 50.0  # GSS threshold of a gradient-norm spike (SPAM paper; train.spike_factor default)
LOSS_CAP_MARGIN = 1.0  # loss axes end at initial loss + this (nats)
DIV_CURVE_LABEL = "diverged run (not in the mean): stopped at ×"
# Fixed colours for the variants of config.yaml (baseline dark grey, no red: red marks divergence),
# then further colours in order for other names (e.g. composed variants 'a+b').
_KNOWN = {"baseline": "#404040", "mlra": "#0173b2", "oec_center": "#029e73", "oec_loss": "#7fbf3f",
          "zloss": "#de8f05", "softcap": "#cc78bc", "stablemax": "#8c564b", "perpgrad": "#b8a000",
          "spam": "#6a3d9a", "adamw_noclip": "#17a3c7", "untied": "#e7298a"}
_COLOURS = ["#56b4e9", "#a6761d", "#1b9e77", "#7570b3", "#fdae61", "#999999", "#000080", "#66a61e"]


def expected_figures(studies: dict) -> dict[str, tuple[str, str]]:
    """PNG path (relative to the figures folder) -> (caption file, report category)."""
    out = {}
    for study, spec in studies.items():
        for stem, caption in FIGURES[spec["kind"]].items():
            out[f"{study}/{stem}.png"] = (caption, f"{CATEGORY[spec['kind']]}: {study}")
    return out


# ---------------------------------------------------------------------------------------- helpers


def _save(fig, out: Path, stem: str) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{stem}.png", out / f"{stem}.pdf"]
    fig.savefig(paths[0], dpi=150, bbox_inches="tight")
    fig.savefig(paths[1], bbox_inches="tight", metadata={"CreationDate": None})
    plt.close(fig)
    return paths


def _summary(tables: Path, study: str) -> pd.DataFrame:
    path = tables / f"summary_{study}.csv"
    if not path.exists():
        raise UserError(f"table missing: {path} (run the tables rule first)")
    return pd.read_csv(path)


def _metric(summary: pd.DataFrame, metric: str) -> pd.DataFrame:
    return summary[summary["metric"] == metric].copy()


def _palette(studies: dict) -> dict[str, tuple]:
    """One colour per variant name, the same in every study."""
    names: list[str] = []
    for spec in studies.values():
        names += [v for v in spec.get("variants", []) if v not in names]
    palette = {v: _KNOWN[v] for v in names if v in _KNOWN}
    others = [v for v in names if v not in palette]
    colours = list(_COLOURS)
    if len(others) > len(colours):
        colours += sns.color_palette("husl", len(others) - len(colours)).as_hex()
    palette.update(zip(others, colours))
    return palette


def _fmt(value) -> str:
    """1e-3 -> '1e-3', 0.003 -> '3e-3', 3.0 -> '3', 2 -> '2'."""
    value = float(value)
    if value == int(value) and abs(value) < 1e4:
        return str(int(value))
    if 0 < abs(value) < 0.05:
        mantissa, exp = f"{value:.2g}".split("e") if "e" in f"{value:.2g}" else f"{value:.1e}".split("e")
        mantissa = mantissa.rstrip("0").rstrip(".")
        return f"{mantissa}e{int(exp)}"
    text = f"{value:.3g}"
    if "e" in text:
        mantissa, exp = text.split("e")
        return f"{mantissa}e{int(exp)}"
    if abs(value) < 0.01:
        return f"{value:.0e}".replace("e-0", "e-")
    return text


def _n_seeds(spec: dict, default: int = 1) -> int:
    return len(spec.get("seeds", [])) or default


def _facets(df: pd.DataFrame, kind: str) -> list[tuple[int, float]]:
    """(depth, lr) panels, in the order of the study's swept axis."""
    pairs = df[["depth", "lr"]].drop_duplicates()
    by = ["lr", "depth"] if kind == "lr" else ["depth", "lr"]
    return [(int(d), float(lr)) for d, lr in pairs.sort_values(by)[["depth", "lr"]].itertuples(index=False)]


def _facet_title(depth: int, lr: float, kind: str, facets: list[tuple[int, float]]) -> str:
    depths, lrs = {d for d, _ in facets}, {lr for _, lr in facets}
    parts = []
    if kind == "lr":
        parts.append(f"peak LR {_fmt(lr)}")
        if len(depths) > 1:
            parts.append(f"{depth} layers")
    else:
        if kind == "depth" or len(depths) > 1:
            parts.append(f"{depth} layer{'s' if depth != 1 else ''}")
        if kind != "depth" or len(lrs) > 1:
            parts.append(f"peak LR {_fmt(lr)}")
    return ", ".join(parts)


def _grid(n: int, width: float = 3.6, height: float = 2.9, max_cols: int = 4, **kw):
    cols = max(1, min(max_cols, n))
    rows = max(1, math.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows + 0.9), squeeze=False,
                             layout="constrained", **kw)
    flat = list(axes.flat)
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]


def _legend(fig, handles: list, ncol: int | None = None) -> None:
    if handles:
        fig.legend(handles=handles, loc="outside lower center", ncol=ncol or min(len(handles), 4), frameon=False,
                   fontsize=8.5, handlelength=2.2, columnspacing=1.4)


def _variant_handles(variants: list[str], palette: dict) -> list:
    return [Line2D([], [], color=palette[v], lw=2, marker="o", ms=4, label=v) for v in variants]


def _div_handle(label: str = "diverged (run stopped)") -> Line2D:
    return Line2D([], [], ls="none", marker="x", color=DIVERGED, ms=8, mew=2, label=label)


def _seed_curve_handles(n_seeds: int, any_diverged: bool) -> list:
    """Legend entries of curve figures after the variants': the seed band, and the divergence mark."""
    handles = []
    if n_seeds > 1:
        handles.append(Patch(color="0.6", alpha=0.35, label="95 % CI over seeds (thin: single seeds)"))
    if any_diverged:
        handles.append(_div_handle(DIV_CURVE_LABEL if n_seeds > 1 else "diverged: run stopped at ×"))
    return handles


def _no_data(ax, text: str = "no data") -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="0.4")


def _tokens_axis(ax) -> None:
    ax.xaxis.set_major_formatter(mticker.EngFormatter(sep=""))
    ax.set_xlabel("tokens seen")


def _seed_band(ax, data: pd.DataFrame, x: str, y: str, colour, diverged=(), **line) -> None:
    """Seed mean with a 95 % bootstrap band over the steps all seeds reached, single seeds thin.
    Diverged seeds are left out of the mean and drawn on their own (ending where they stopped)."""
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
    mean, lo, hi = _bootstrap_ci(table.to_numpy(float))
    ax.fill_between(table.index, lo, hi, color=colour, alpha=0.18, lw=0)
    ax.plot(table.index, mean, color=colour, **line)


def _bootstrap_ci(values: np.ndarray, n_boot: int = 1000, seed: int = 0) -> tuple[np.ndarray, ...]:
    """Row means of `values` (points x seeds) and their 95 % percentile-bootstrap interval over seeds
    (what seaborn's errorbar=("ci", 95) computes, vectorized over points; deterministic)."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, values.shape[1], size=(n_boot, values.shape[1]))
    boots = values[:, idx].mean(axis=-1)  # points x n_boot
    return values.mean(axis=1), np.percentile(boots, 2.5, axis=1), np.percentile(boots, 97.5, axis=1)


def _dodge(x: np.ndarray, i: int, k: int, log: bool, spacing: float) -> np.ndarray:
    off = (i - (k - 1) / 2) * (0.06 if log else 0.09)
    return x * 10 ** (off * spacing) if log else x + off * spacing


def _vs_x(ax, df: pd.DataFrame, x: str, variants: list[str], palette: dict, n_runs: int, logx: bool = False,
          logy: bool = False, runs: pd.DataFrame | None = None,
          hline: tuple[float, str] | None = None) -> tuple[bool, bool]:
    """Mean +- 95 % CI per variant along x (depth or LR), single seeds as small open circles (from
    `runs`, when given and there are several seeds), diverged points marked.

    Returns (some point has diverged runs, some point has no value because all its runs diverged)."""
    xs = np.array(sorted(df[x].dropna().unique()), dtype=float)
    if len(xs) == 0:
        _no_data(ax)
        return False, False
    spacing = (np.log10(xs.max() / xs.min()) / max(1, len(xs) - 1) if logx else
               (xs.max() - xs.min()) / max(1, len(xs) - 1)) or 1.0
    shown = [v for v in variants if v in set(df["variant"])]
    finite = df["mean"].replace([np.inf, -np.inf], np.nan)
    positive = finite[finite > 0] if logy else finite.dropna()
    floor = float(positive.min()) / 3 if logy and len(positive) else None
    some_div, all_div = False, False
    px_all: list[float] = []
    lost: list[tuple[float, float, str]] = []  # (x, offset in points, colour) of points with no value
    partial: dict[float, list[tuple[str, int]]] = {}  # x -> [(variant, n diverged)] for points with a value
    for i, variant in enumerate(shown):
        d = df[df["variant"] == variant].sort_values(x)
        px = _dodge(d[x].to_numpy(float), i, len(shown), logx, spacing)
        mean, ci = d["mean"].to_numpy(float), d["ci95"].to_numpy(float)
        ok = np.isfinite(mean) & ((mean > 0) if logy else True)
        px_all += list(px)
        colour = palette[variant]
        ax.plot(px[ok], mean[ok], marker="o", ms=4.5, lw=1.8, color=colour, label=variant, zorder=3)
        metric = str(d["metric"].iloc[0]) if len(d) else ""
        if runs is not None and n_runs > 1 and metric in runs:
            r = runs[runs["variant"] == variant].merge(d[["depth", "lr"]], on=["depth", "lr"])
            r = r[np.isfinite(r[metric].astype(float)) & ((r[metric] > 0) if logy else True)]
            pos = dict(zip(d[x].to_numpy(float), px))
            rx = [pos.get(float(v), np.nan) for v in r[x]]
            ax.scatter(rx, r[metric], s=14, facecolor="none", edgecolor=colour, lw=0.8, alpha=0.8, zorder=4)
        band = ok & np.isfinite(ci)
        if band.any():
            lo, hi = mean - ci, mean + ci
            if logy:  # an interval reaching below zero runs off the bottom of a log axis
                lo = np.maximum(lo, floor)
            ax.errorbar(px[band], mean[band], yerr=[mean[band] - lo[band], hi[band] - mean[band]], fmt="none",
                        ecolor=colour, elinewidth=1, capsize=2.5, zorder=3)
        nd = d["n_diverged"].to_numpy(int)
        x_of = dict(zip(px, d[x].to_numpy(float)))
        for xi, m, k, good in zip(px, mean, nd, ok):
            if k <= 0:
                continue
            if good:
                some_div = True
                ax.scatter([xi], [m], marker="x", s=60, lw=2, color=DIVERGED, zorder=6)
                partial.setdefault(x_of[xi], []).append((variant, k))
            else:
                all_div = True
                lost.append((x_of[xi], (i - (len(shown) - 1) / 2) * 9.0, colour))
    pad = 0.35 * spacing
    if logx:
        ax.set_xscale("log")
        ax.set_xlim(xs.min() / 10 ** pad, xs.max() * 10 ** pad)
        ax.set_xticks(xs)
        ax.xaxis.set_major_formatter(mticker.FuncFormatter(lambda v, _: _fmt(v)))
        ax.xaxis.set_minor_locator(mticker.NullLocator())
    else:
        ax.set_xlim(xs.min() - pad, xs.max() + pad)
        ax.set_xticks(xs)
        ax.xaxis.set_major_formatter(mticker.FuncFormatter(lambda v, _: _fmt(v)))
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
            notes[xv] = f"{ks.pop()}/{n_runs} div."
        else:
            notes[xv] = "\n".join(f"{v}: {k}/{n_runs} div." for v, k in entries)
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
        ax.axhspan(1 - 0.13, 1.0, color=DIVERGED, alpha=0.07, lw=0, transform=ax.transAxes)
        for xv, dx, colour in lost:
            t = trans + mtransforms.ScaledTranslation(dx / 72, 0, ax.figure.dpi_scale_trans)
            ax.scatter([xv], [1 - 0.065], transform=t, marker="o", s=70, color=colour, edgecolor="white", lw=0.8,
                       zorder=5, clip_on=False)
            ax.scatter([xv], [1 - 0.065], transform=t, marker="x", s=28, lw=1.8, color=DIVERGED, zorder=6,
                       clip_on=False)
        ax.text(0.02, 1 - 0.065, f"no value, all {n_runs} runs diverged:", transform=ax.transAxes, fontsize=7.5,
                color=DIVERGED, va="center", ha="left")
        top = 1 - 0.14
    for xv, text in notes.items():  # at the first / last x, align the note inwards so it stays in the panel
        ha = "right" if xv == xs.max() and len(xs) > 1 else "left" if xv == xs.min() and len(xs) > 1 else "center"
        ax.text(xv, top, text, transform=ax.get_xaxis_transform(), ha=ha, va="top", fontsize=7,
                color=DIVERGED, zorder=7, bbox=dict(facecolor="white", edgecolor="none", alpha=0.85, pad=1))
    return some_div, all_div


def _vs_x_legend(fig, variants, palette, some_div, all_div, n_runs, band: bool) -> None:
    handles = _variant_handles(variants, palette)
    if band:
        handles.append(Line2D([], [], color="0.3", marker="|", ms=11, mew=1.3, ls="none",
                              label="mean ± 95 % CI over seeds (t-interval)"))
        handles.append(Line2D([], [], color="0.3", marker="o", ms=4.5, mfc="none", ls="none", label="single seeds"))
    if some_div:
        handles.append(_div_handle(f"k of {n_runs} runs diverged"))
    if all_div:
        handles.append(Patch(color=DIVERGED, alpha=0.15, label="no value: all runs diverged"))
    _legend(fig, handles, ncol=2 if fig.get_figwidth() < 6 else 4)


# ------------------------------------------------------------------------------------ loss curves


def _tokens_per_step(steps: pd.DataFrame) -> pd.Series:
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


def _loss_curves(steps: pd.DataFrame, runs: pd.DataFrame, study: str, spec: dict, palette: dict):
    kind, variants = spec["kind"], list(spec["variants"])
    d = steps[steps["study"] == study].copy()
    r = runs[runs["study"] == study]
    n_seeds = _n_seeds(spec, int(d["seed"].nunique()) if len(d) else 1)
    facets = _facets(d, kind) if len(d) else []
    fig, axes = _grid(max(1, len(facets)), width=5.6 if len(facets) <= 1 else 3.6, sharey=True)
    if not facets:
        _no_data(axes[0])
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
    tps = _tokens_per_step(d)
    lowest = float(np.nanmin(d[["train_plot", "val_plot"]].to_numpy()))
    any_div = False
    for ax, (depth, lr) in zip(axes, facets):
        sub = d[(d["depth"] == depth) & np.isclose(d["lr"], lr)]
        for variant in [v for v in variants if v in set(sub["variant"])]:
            g = sub[sub["variant"] == variant]
            colour = palette[variant]
            gone = set(r[(r["variant"] == variant) & (r["depth"] == depth) & np.isclose(r["lr"], lr)
                         & r["diverged"]]["seed"])
            _seed_band(ax, g, "tokens", "train_plot", colour, gone, lw=1.6)
            v = g.dropna(subset=["val_plot"])
            for seed, gv in v[v["seed"].isin(gone)].groupby("seed"):  # diverged seeds: their own val points
                ax.plot(gv["tokens"], gv["val_plot"], color=colour, ls="--", marker="o", ms=3, lw=1, alpha=0.85)
            v = v[~v["seed"].isin(gone)]
            if len(v):
                full = v.groupby("tokens")["seed"].transform("nunique") == v["seed"].nunique()
                mv = v[full].groupby("tokens")["val_plot"].mean()
                ax.plot(mv.index, mv.to_numpy(), color=colour, ls="--", marker="o", ms=3.5, lw=1.3, zorder=4)
        same = _identical_variants(sub, [v for v in variants if v in set(sub["variant"])])
        if same:  # otherwise one curve would silently hide the other
            text = "identical curves (hidden under each other):\n" + "\n".join(" = ".join(g) for g in same)
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
        ax.set_title(_facet_title(depth, lr, kind, facets), fontsize=10)
        _tokens_axis(ax)
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
    handles = _variant_handles([v for v in variants if v in set(d["variant"])], palette)
    handles += [Line2D([], [], color="0.3", lw=1.6,
                       label="train (mean over non-diverged seeds)" if n_seeds > 1 else "train"),
                Line2D([], [], color="0.3", lw=1.3, ls="--", marker="o", ms=3.5, label="validation")]
    handles += _seed_curve_handles(n_seeds, any_div)
    _legend(fig, handles)
    return fig


# ------------------------------------------------------------------------------------ entry point


def draw_figures(tables_dir: str | Path, out_dir: str | Path, studies: dict | None = None) -> list[Path]:
    tables, out = Path(tables_dir), Path(out_dir)
    if studies is None:
        studies_file = tables / "studies.json"
        if not studies_file.exists():
            raise UserError(f"table missing: {studies_file} (run the tables rule first)")
        studies = json.loads(studies_file.read_text())
    for study, spec in studies.items():
        if spec.get("kind") not in FIGURES:
            raise UserError(f"study '{study}': unknown kind '{spec.get('kind')}' (one of {', '.join(FIGURES)})")
    for name in ("runs.csv", "steps.csv"):
        if not (tables / name).exists():
            raise UserError(f"table missing: {tables / name} (run the tables rule first)")
    runs, steps = pd.read_csv(tables / "runs.csv"), pd.read_csv(tables / "steps.csv")
    for frame in (runs, steps):
        if "study" in frame:
            frame["study"] = frame["study"].astype(str)
    if "diverged" in runs:
        runs["diverged"] = runs["diverged"].astype(str).str.lower().isin(["true", "1", "1.0"])
    else:
        runs["diverged"] = False
    if "diverged_step" not in runs:
        runs["diverged_step"] = np.nan
    palette = _palette(studies)
    written: list[Path] = []
    with sns.axes_style("whitegrid"), sns.plotting_context("paper", font_scale=1.15):
        for study, spec in studies.items():
            kind, folder = spec["kind"], out / study
            summary = _summary(tables, study)
            variants = list(spec["variants"])
            st, rn = steps[steps["study"] == study], runs[runs["study"] == study]
            written += _save(_loss_curves(steps, runs, study, spec, palette), folder, "loss_curves")
            if kind == "depth":
                written += _depth_figures(summary, st, rn, variants, folder, study, spec, palette)
            elif kind == "lr":
                written += _lr_figures(summary, rn, variants, folder, study, spec, palette)
            elif kind == "spikes":
                written += _spike_figures(summary, st, rn, variants, folder, study, spec, palette)
            else:  # compare
                written += _save(_compare_final(summary, rn, variants, study, spec, palette), folder, "final_loss")
    return written


# ------------------------------------------------------------------------------------ depth study


def _depth_figures(summary, steps, runs, variants, folder, study, spec, palette) -> list[Path]:
    written = []
    n = _n_seeds(spec)
    band = n > 1

    def one_lr(df):  # a depth study normally has one LR; with several, show the first and say so
        lrs = sorted(df["lr"].dropna().unique())
        return (df[np.isclose(df["lr"], lrs[0])] if len(lrs) > 1 else df), (lrs[0] if len(lrs) > 1 else None)

    fig, ax = plt.subplots(figsize=(5.0, 4.0), layout="constrained")
    df, lr = one_lr(_metric(summary, "final_val_ppl"))
    some, alld = _vs_x(ax, df, "depth", variants, palette, n, runs=runs)
    ax.set(xlabel="depth (transformer layers)", ylabel="final validation perplexity (lower is better)")
    ax.set_title(f"{study}: perplexity vs depth" + (f" (peak LR {_fmt(lr)})" if lr else ""), fontsize=10.5)
    _vs_x_legend(fig, variants, palette, some, alld, n, band)
    written += _save(fig, folder, "ppl_vs_depth")

    fig, axes = plt.subplots(1, 2, figsize=(9.0, 3.9), layout="constrained")
    some_all = [False, False]
    for ax, metric, label in zip(axes, ["tev_mean", "tev_std"],
                                 ["TEV mean: mean over tokens of std(e_i)", "TEV std: std over tokens of std(e_i)"]):
        df, _ = one_lr(_metric(summary, metric))
        some, alld = _vs_x(ax, df, "depth", variants, palette, n, runs=runs)
        some_all = [some_all[0] or some, some_all[1] or alld]
        name = "TEV mean" if metric == "tev_mean" else "TEV std"
        ax.set(xlabel="depth (transformer layers)", ylabel=f"{name} (embedding-weight units)")
        ax.set_title(label, fontsize=9.5)
    fig.suptitle(f"{study}: token-embedding variability (TEV) of wte at the end of training", fontsize=10.5)
    _vs_x_legend(fig, variants, palette, *some_all, n, band)
    written += _save(fig, folder, "tev_vs_depth")

    written += _save(_tev_over_training(steps, runs, variants, study, spec, palette), folder, "tev_over_training")

    fig, ax = plt.subplots(figsize=(5.0, 4.0), layout="constrained")
    df, lr = one_lr(_metric(summary, "grad_norm_var"))
    some, alld = _vs_x(ax, df, "depth", variants, palette, n, logy=True, runs=runs)
    ax.set(xlabel="depth (transformer layers)", ylabel="variance of total grad norm (log scale)")
    ax.set_title(f"{study}: gradient-norm variance vs depth\n"
                 "(sliding-window variance, averaged over the 2nd half of training)",
                 fontsize=10)
    _vs_x_legend(fig, variants, palette, some, alld, n, band)
    written += _save(fig, folder, "grad_norm_var_vs_depth")
    return written


def _tev_over_training(steps, runs, variants, study, spec, palette):
    n = _n_seeds(spec)
    depths = sorted(int(x) for x in steps["depth"].unique()) if len(steps) else []
    cols = max(1, len(depths))
    fig, axes = plt.subplots(2, cols, figsize=(3.5 * cols, 5.6), squeeze=False, sharex=True, sharey="row",
                             layout="constrained")
    have = [c for c in ("tev_mean", "tev_std") if c in steps]
    d = steps.dropna(subset=have) if have else steps.iloc[0:0]
    if d.empty:
        for ax in axes.flat:
            _no_data(ax)
    tps = _tokens_per_step(steps) if len(steps) else pd.Series(dtype=float)
    any_div = False
    for j, depth in enumerate(depths):
        sub = d[d["depth"] == depth]
        for i, metric in enumerate(["tev_mean", "tev_std"]):
            ax = axes[i][j]
            if metric not in sub:
                _no_data(ax)
                continue
            for variant in [v for v in variants if v in set(sub["variant"])]:
                gone = set(runs[(runs["variant"] == variant) & (runs["depth"] == depth) & runs["diverged"]]["seed"])
                _seed_band(ax, sub[sub["variant"] == variant], "tokens", metric, palette[variant], gone, lw=1.6,
                           marker="o", ms=3)
            for row in runs[(runs["depth"] == depth) & runs["diverged"]].itertuples(index=False):
                t = sub[(sub["variant"] == row.variant) & (sub["seed"] == row.seed)].sort_values("step")
                if len(t):
                    key = (row.variant, row.depth, row.lr, row.seed)
                    step = row.diverged_step if pd.notna(row.diverged_step) else t["step"].max()
                    ax.scatter([step * tps.get(key, 1.0)], [t[metric].iloc[-1]], marker="x", s=70, lw=2,
                               color=DIVERGED, zorder=8)
                    any_div = True
            ax.set_ylabel(("TEV mean" if metric == "tev_mean" else "TEV std") + " (weight units)" if j == 0 else "")
            if i == 0:
                ax.set_title(f"{depth} layer{'s' if depth != 1 else ''}", fontsize=10)
            _tokens_axis(ax)
            if i == 0:
                ax.set_xlabel("")
    fig.suptitle(f"{study}: token-embedding variability of wte during training", fontsize=10.5)
    handles = _variant_handles([v for v in variants if v in set(steps["variant"])], palette)
    handles += _seed_curve_handles(n, any_div)
    _legend(fig, handles)
    return fig


# --------------------------------------------------------------------------------------- LR study


def _lr_figures(summary, runs, variants, folder, study, spec, palette) -> list[Path]:
    written = []
    n = _n_seeds(spec)
    band = n > 1
    depths = sorted(summary["depth"].dropna().unique())
    depth_note = (f" ({int(depths[0])} layer{'s' if int(depths[0]) != 1 else ''})" if len(depths) == 1 else
                  f" ({int(depths[0])} layers; other depths in the tables)")

    def one_depth(df):
        return df[df["depth"] == depths[0]] if len(depths) > 1 else df

    fig, ax = plt.subplots(figsize=(5.4, 4.2), layout="constrained")
    df = one_depth(_metric(summary, "final_val_loss"))
    l0 = float(runs["initial_loss"].dropna().mean()) if "initial_loss" in runs else float("nan")
    some, alld = _vs_x(ax, df, "lr", variants, palette, n, logx=True, runs=runs,
                       hline=(l0, f"loss at init L0 = {l0:.2f}"))
    ax.set(xlabel="peak learning rate (log scale)", ylabel="final validation loss (nats)")
    ax.set_title(f"{study}: final loss vs learning rate{depth_note}", fontsize=10.5)
    _vs_x_legend(fig, variants, palette, some, alld, n, band)
    written += _save(fig, folder, "loss_vs_lr")

    written += _save(_lr_sensitivity(summary, variants, study, spec, palette), folder, "lr_sensitivity")

    panels = [("mu_norm", "mean output embedding μ", "‖μ‖ (log scale)"),
              ("logits_absmax", "logit size", "max |logit|, mean over positions (log)"),
              ("attn_logit_max", "attention logits", "max q·k/√d_head over layers (log)")]
    panels = [p for p in panels if (summary["metric"] == p[0]).any()]
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(4.1 * max(1, len(panels)), 4.0), squeeze=False,
                             layout="constrained")
    some_all = [False, False]
    for ax, (metric, title, ylabel) in zip(axes[0], panels):
        some, alld = _vs_x(ax, one_depth(_metric(summary, metric)), "lr", variants, palette, n, logx=True, logy=True,
                           runs=runs)
        some_all = [some_all[0] or some, some_all[1] or alld]
        ax.set(xlabel="peak learning rate (log scale)", ylabel=ylabel)
        ax.set_title(title, fontsize=10)
    if not panels:
        _no_data(axes[0][0])
    fig.suptitle(f"{study}: output-embedding mean, logit size and attention logits vs LR{depth_note}\n"
                 "(last measurement of each run; a diverged run's last measurement before it stopped)",
                 fontsize=10.5)
    _vs_x_legend(fig, variants, palette, *some_all, n, band)
    written += _save(fig, folder, "mu_norm_logits_vs_lr")
    return written


def _draw_bars(ax, rows, palette):
    """One bar per (label, variant, summary row) with its 95 % CI; returns (means, cis, error bars)."""
    xs = np.arange(len(rows))
    means = np.array([float(r["mean"]) for _, _, r in rows])
    cis = np.array([float(r["ci95"]) for _, _, r in rows])
    ax.bar(xs, np.nan_to_num(means), color=[palette[v] for _, v, _ in rows], width=0.62, edgecolor="0.2", lw=0.6)
    err = np.where(np.isfinite(cis), cis, 0)
    if np.isfinite(cis).any():
        ax.errorbar(xs, means, yerr=err, fmt="none", ecolor="0.15", elinewidth=1.2, capsize=5)
    return means, cis, err


def _label_bars(ax, rows, means, cis, runs_per_bar, top, value_text, pad, fontsize):
    """Each bar's value above it, its label below, and 'k/N runs diverged' under the label."""
    xs = np.arange(len(rows))
    for x, m, c in zip(xs, means, cis):
        text = "n/a" if not np.isfinite(m) else value_text(m, c)
        ax.text(x, np.nan_to_num(m) + np.nan_to_num(c) + pad * top, text, ha="center", va="bottom", fontsize=fontsize)
    ax.set_xticks(xs, [lab for lab, _, _ in rows])
    for tick, (_, _, r) in zip(xs, rows):
        k = int(r["n_diverged"])
        ax.annotate(f"{k}/{runs_per_bar} runs diverged", (tick, 0), xycoords=("data", "axes fraction"),
                    xytext=(0, -24), textcoords="offset points", ha="center", va="top", fontsize=7.5,
                    color=DIVERGED if k else "0.4")


def _bar_rows(table: pd.DataFrame, variants: list[str], keys: list[str], describe) -> list[tuple]:
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
                label = variant if len(combos) == 1 else f"{variant}\n({describe(*values)})"
                rows.append((label, variant, r.iloc[0]))
    return rows


def _lr_sensitivity(summary, variants, study, spec, palette):
    sens = _metric(summary, "lr_sensitivity")
    n_lrs = len(spec.get("lrs", [])) or int(summary["lr"].nunique())
    total = _n_seeds(spec) * n_lrs
    rows = _bar_rows(sens, variants, ["depth"], lambda depth: f"{int(depth)} layers")
    fig, ax = plt.subplots(figsize=(max(4.6, 1.25 * len(rows) + 1.6), 4.1), layout="constrained")
    if not rows:
        _no_data(ax)
        return fig
    means, cis, err = _draw_bars(ax, rows, palette)
    top = float(np.nanmax(means + err)) if np.isfinite(means).any() else 1.0
    _label_bars(ax, rows, means, cis, total, top, lambda m, c: f"{m:.3f}" + (f" ± {c:.3f}" if np.isfinite(c) else ""),
                pad=0.02, fontsize=8)
    ax.set_ylim(0, top * 1.18 if top > 0 else 1)
    ax.set(xlabel="", ylabel="LR sensitivity (nats; lower is better)")
    lrs = ", ".join(_fmt(x) for x in spec.get("lrs", [])) or "swept LRs"
    ci_note = f"bars: mean over {_n_seeds(spec)} seeds ± 95 % CI" if _n_seeds(spec) > 1 else "one seed: no CI"
    ax.set_title(f"{study}: LR sensitivity  mean_η[min(L(η), L0) − L*]\nover LR ∈ {{{lrs}}}; "
                 f"diverged runs count as L0; {ci_note}", fontsize=9.5)
    return fig


# ------------------------------------------------------------------------------------ spike study


def _spikes_from_trace(g: pd.DataFrame, factor: float = SPIKE_FACTOR) -> tuple[pd.Series, pd.Series]:
    """(threshold, is_spike) on the logged grad norms: a spike is a step whose grad norm exceeds
    `factor` x the running mean of the earlier (logged) grad norms."""
    gn = g["grad_norm"].astype(float)
    running = gn.expanding().mean().shift(1)
    threshold = factor * running
    return threshold, (gn > threshold) & running.notna()


def _spike_figures(summary, steps, runs, variants, folder, study, spec, palette) -> list[Path]:
    written = []
    n = _n_seeds(spec)
    d = steps.dropna(subset=["grad_norm"]) if "grad_norm" in steps else steps.iloc[0:0]
    panels = [(v, depth, lr) for depth, lr in (_facets(d, "spikes") if len(d) else [])
              for v in variants if ((d["variant"] == v) & (d["depth"] == depth) & np.isclose(d["lr"], lr)).any()]
    multi = len({(p[1], p[2]) for p in panels}) > 1
    fig, axes = plt.subplots(max(1, len(panels)), 1, figsize=(7.5, 1.9 * max(1, len(panels)) + 1.3), squeeze=False,
                             sharex=True, sharey=True, layout="constrained")
    axes = axes[:, 0]
    flags = {"logged": False, "counted": False, "div": False}
    for ax, (variant, depth, lr) in zip(axes, panels):
        sub = d[(d["variant"] == variant) & (d["depth"] == depth) & np.isclose(d["lr"], lr)]
        colour = palette[variant]
        for seed, g in sub.groupby("seed"):
            g = g.sort_values("step")
            ax.plot(g["step"], g["grad_norm"], color=colour, lw=1.1, alpha=0.9 if n == 1 else 0.6)
            threshold, spike = _spikes_from_trace(g)
            ax.plot(g["step"], threshold, color="0.45", lw=0.9, ls=":")
            if spike.any():
                ax.scatter(g.loc[spike, "step"], g.loc[spike, "grad_norm"], marker="^", s=45, color=DIVERGED,
                           edgecolor="k", lw=0.5, zorder=7)
                flags["logged"] = True
            if "spike_count" in g:  # the trainer counts every step, logged or not
                m = g.dropna(subset=["spike_count"])
                prev_step, prev = 0, 0.0
                for step, count in zip(m["step"], m["spike_count"]):
                    if count > prev:
                        ax.axvspan(prev_step, step, color=DIVERGED, alpha=0.12, lw=0)
                        ax.text((prev_step + step) / 2, 0.96, f"+{int(count - prev)}",
                                transform=ax.get_xaxis_transform(),
                                ha="center", va="top", fontsize=7.5, color=DIVERGED)
                        flags["counted"] = True
                    prev_step, prev = step, count
            r = runs[(runs["variant"] == variant) & (runs["depth"] == depth) & np.isclose(runs["lr"], lr)
                     & (runs["seed"] == seed) & runs["diverged"]]
            for row in r.itertuples(index=False):
                step = row.diverged_step if pd.notna(row.diverged_step) else g["step"].max()
                ax.scatter([step], [g["grad_norm"].iloc[-1]], marker="x", s=80, lw=2.2, color=DIVERGED, zorder=8)
                flags["div"] = True
        ax.set_yscale("log")
        label = variant + (f"  ({depth} layers, peak LR {_fmt(lr)})" if multi else "")
        ax.set_title(label, loc="left", fontsize=9.5, fontweight="bold", color=colour, pad=3)
        ax.set_ylabel("grad norm\n(before clipping)")
    if not panels:
        _no_data(axes[0])
    axes[-1].set_xlabel("training step")
    axes[-1].xaxis.set_major_locator(mticker.MaxNLocator(integer=True))
    seeds_note = f"; {n} seeds overlaid" if n > 1 else ""
    fig.suptitle(f"{study}: total gradient norm at logged steps (log scale){seeds_note}", fontsize=10.5)
    handles = [Line2D([], [], color="0.3", lw=1.1, label="grad norm (logged steps)"),
               Line2D([], [], color="0.45", lw=0.9, ls=":",
                      label=f"{SPIKE_FACTOR:g}× running mean of earlier logged norms"),
               Line2D([], [], ls="none", marker="^", color=DIVERGED, mec="k", ms=7,
                      label="spike at a logged step" + ("" if flags["logged"] else " (none)")),
               Patch(color=DIVERGED, alpha=0.2,
                     label="+k: spikes counted by the trainer, all steps" + ("" if flags["counted"] else " (none)"))]
    if flags["div"]:
        handles.append(_div_handle())
    _legend(fig, handles, ncol=2)
    written += _save(fig, folder, "grad_norm_traces")

    written += _save(_spike_counts(summary, variants, study, spec, palette), folder, "spike_counts")
    return written


def _spike_counts(summary, variants, study, spec, palette):
    counts = _metric(summary, "spike_count")
    rows = _bar_rows(counts, variants, ["depth", "lr"], lambda depth, lr: f"L{int(depth)}, LR {_fmt(lr)}")
    fig, ax = plt.subplots(figsize=(max(4.6, 1.2 * len(rows) + 1.6), 3.9), layout="constrained")
    if not rows:
        _no_data(ax)
        return fig
    n = _n_seeds(spec)
    means, cis, err = _draw_bars(ax, rows, palette)
    top = max(1.0, float(np.nanmax(np.nan_to_num(means) + err)))
    _label_bars(ax, rows, means, cis, n, top, lambda m, c: f"{m:.3g}" + (f" ± {c:.2g}" if np.isfinite(c) else ""),
                pad=0.03, fontsize=8.5)
    ax.set_ylim(0, top * 1.2)
    ax.yaxis.set_major_locator(mticker.MaxNLocator(integer=True))
    ax.set(xlabel="", ylabel=f"gradient-norm spikes per run\n(norm > {SPIKE_FACTOR:g}× running mean)")
    note = f"mean over {n} seeds ± 95 % CI" if n > 1 else "one seed per variant"
    ax.set_title(f"{study}: gradient-norm spikes per run\n(whole run, every step; {note})", fontsize=10)
    if np.nansum(means) == 0:
        ax.text(0.5, 0.55, "no spikes detected in any run", transform=ax.transAxes, ha="center", color="0.35",
                fontsize=9)
    return fig


# -------------------------------------------------------------------------------- compare study


def _compare_final(summary, runs, variants, study, spec, palette):
    """Final validation loss per variant (dot +- CI; diverged marked), and what each costs:
    parameters and wall-clock time per run."""
    n = _n_seeds(spec)
    combos = list(summary[["depth", "lr"]].drop_duplicates().sort_values(["depth", "lr"]).itertuples(index=False))
    rows = []
    for variant in variants:
        for depth, lr in combos:
            sel = (summary["variant"] == variant) & (summary["depth"] == depth) & np.isclose(summary["lr"], lr)
            if sel.any():
                label = variant if len(combos) == 1 else f"{variant}\n(L{int(depth)}, LR {_fmt(lr)})"
                rows.append((label, variant, depth, lr))
    fig, axes = plt.subplots(1, 3, figsize=(max(10.5, 3 * 0.55 * len(rows) + 6), 4.2), layout="constrained",
                             gridspec_kw={"width_ratios": [1.6, 1, 1]})
    if not rows:
        for ax in axes:
            _no_data(ax)
        return fig
    xs = np.arange(len(rows))
    labels = [lab for lab, *_ in rows]

    def value(metric, variant, depth, lr):
        r = summary[(summary["metric"] == metric) & (summary["variant"] == variant) & (summary["depth"] == depth)
                    & np.isclose(summary["lr"], lr)]
        return (float(r["mean"].iloc[0]), float(r["ci95"].iloc[0]), int(r["n_diverged"].iloc[0])) if len(r) else \
            (np.nan, np.nan, 0)

    ax = axes[0]
    l0 = float(runs["initial_loss"].dropna().mean()) if "initial_loss" in runs and runs["initial_loss"].notna().any() \
        else np.nan
    any_div = False
    for x, (label, variant, depth, lr) in zip(xs, rows):
        m, c, k = value("final_val_loss", variant, depth, lr)
        colour = palette[variant]
        if np.isfinite(m):
            ax.errorbar([x], [m], yerr=[[c]] if np.isfinite(c) else None, fmt="o", ms=7, color=colour, capsize=4,
                        elinewidth=1.3, zorder=4)
            ax.annotate(f"{m:.3f}", (x, m), xytext=(9, 0), textcoords="offset points", va="center", fontsize=7.5)
            r = runs[(runs["variant"] == variant) & (runs["depth"] == depth) & np.isclose(runs["lr"], lr)]
            if n > 1 and len(r):
                ax.scatter([x] * len(r), r["final_val_loss"], s=14, facecolor="none", edgecolor=colour, lw=0.8,
                           zorder=3)
        if k:
            any_div = True
            y = m if np.isfinite(m) else l0
            ax.scatter([x], [y], marker="x", s=80, lw=2.2, color=DIVERGED, zorder=6)
            ax.annotate(f"{k}/{n} diverged" + ("" if np.isfinite(m) else " (no value)"), (x, y), xytext=(0, 8),
                        textcoords="offset points", ha="center", fontsize=7.5, color=DIVERGED)
    if np.isfinite(l0):
        ax.axhline(l0, color="0.35", ls=":", lw=1)
        ax.annotate(f"loss at init L0 = {l0:.2f}", (0.99, l0), xycoords=("axes fraction", "data"), ha="right",
                    va="bottom", fontsize=7.5, color="0.35")
    lo_, hi_ = ax.get_ylim()
    ax.set_ylim(lo_, hi_ + 0.12 * (hi_ - lo_))  # room for the notes above the highest point
    ax.set_xticks(xs, labels, rotation=30, ha="right")
    ax.set_xlim(-0.6, len(rows) - 0.4)
    ax.set(ylabel="final validation loss (nats; lower is better)")
    ax.set_title("final validation loss" + (f" (mean ± 95 % CI, {n} seeds)" if n > 1 else " (one seed)"),
                 fontsize=10)

    for ax, metric, ylabel, title, scale in [
            (axes[1], "params", "parameters (thousands)", "model size", 1e-3),
            (axes[2], "wall_time_s", "wall-clock time per run (s)", "training time", 1.0)]:
        vals = [value(metric, v, d, lr) for _, v, d, lr in rows]
        means = np.array([m for m, _, _ in vals]) * scale
        cis = np.array([c for _, c, _ in vals]) * scale
        ax.bar(xs, np.nan_to_num(means), color=[palette[v] for _, v, _, _ in rows], width=0.65, edgecolor="0.2",
               lw=0.6)
        if np.isfinite(cis).any():
            ax.errorbar(xs, means, yerr=np.where(np.isfinite(cis), cis, 0), fmt="none", ecolor="0.15", capsize=3)
        for x, m in zip(xs, means):
            ax.text(x, np.nan_to_num(m), "n/a" if not np.isfinite(m) else f"{m:.0f}" if m >= 10 else f"{m:.2g}",
                    ha="center", va="bottom", fontsize=7.5)
        ax.set_xticks(xs, labels, rotation=30, ha="right")
        ax.set(ylabel=ylabel)
        ax.set_title(title, fontsize=10)
        ax.margins(y=0.12)
    if any_div:
        axes[2].set_title("training time\n(diverged runs stopped early: not comparable)", fontsize=10)
    depths = sorted({int(d) for _, _, d, _ in rows})
    lrs = sorted({float(lr) for *_, lr in rows})
    setting = f"{', '.join(map(str, depths))} layer{'s' if depths != [1] else ''}, peak LR {', '.join(map(_fmt, lrs))}"
    fig.suptitle(f"{study}: variants side by side ({setting})", fontsize=10.5)
    handles = []
    if n > 1:
        handles.append(Line2D([], [], color="0.3", marker="o", ms=4.5, mfc="none", ls="none", label="single seeds"))
    if any_div:
        handles.append(_div_handle(f"k of {n} runs diverged (no value: drawn at L0)"))
    _legend(fig, handles)
    return fig
