"""Shared look of every figure: colours, number formats, panels, legends, saving.

Conventions shared by every figure:
- one colour per variant, the same in every figure of every study (the methods' own colours,
  `methods.py`, then fallback colours in order of first appearance); red is kept for divergence;
- variants are named as the papers write them (`methods.label`);
- one interval convention everywhere, for any number of seeds: the range of the seeds (min to
  max). Curves are the mean over the seeds that did not diverge with that range as a band, thin
  lines the single seeds; points vs depth / LR are the mean (on log axes the geometric mean) with
  the range as the bar, open circles the single seeds; bars are the mean with the range;
- diverged runs stay visible and are never averaged with the runs that survived: a red x where the
  run stopped (curves); vs LR / depth, a diverged run's own last measurement as a ✕ with a red edge,
  or (a loss, which it lacks) a red x on its cell's mean of the others, with "k/n div." above; a
  point with no value because every seed diverged is drawn in a "diverged" strip at the top of the
  panel instead of vanishing;
- a figure's title states what it shows (the claim it tests), its second line the regime and the
  number of seeds (`claim_title`); panels that are compared share their y scale; a quantity whose
  sign matters has a sign-preserving (symlog) axis; values at rounding level are not drawn as data
  (`ROUNDING_MU`); the papers' own numbers, where they give them, are grey stars;
- loss axes are capped at the initial loss + 1 nat; values above are drawn at the cap (said in the
  figure's title); variants whose curves are identical (and so hide each other) are named;
- a smoke test's figures (`smoke_test: true`, the default config) say so in their title's first line.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker as mticker  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from ..errors import UserError  # noqa: E402
from ..io import atomic_path  # noqa: E402
from ..methods import BY_NAME, label  # noqa: E402
from ..summary import SMOKE_TEST_TITLE  # noqa: E402

DIVERGED = "#d62728"  # red: reserved for divergence markers
SPIKE_FACTOR = 50.0  # GSS threshold of a gradient-norm spike (SPAM paper; train.spike_factor default)
LOSS_CAP_MARGIN = 1.0  # loss axes end at initial loss + this (nats)
POINT_LEGEND = "mean over the seeds that did not diverge (geometric on log axes), bar: their range (min-max)"
DIV_CURVE_LABEL = "diverged run (not in the mean): stopped at ×"
ROUNDING_MU = 1e-4  # ‖μ‖ below this is rounding (μ-centering: 0 in exact arithmetic), not a measurement
FALLBACK_COLOURS = ["#56b4e9", "#a6761d", "#1b9e77", "#7570b3", "#fdae61", "#999999", "#000080", "#66a61e"]


_SMOKE_TEST = [False]  # inside `smoke_test_titles(True)`: every saved figure's title says it is a smoke test's


# ---------------------------------------------------------------------------------------- helpers


@contextmanager
def smoke_test_titles(on: bool):
    """Figures saved inside the block open their title with SMOKE_TEST_TITLE when `on`."""
    previous = _SMOKE_TEST[0]
    _SMOKE_TEST[0] = bool(on)
    try:
        yield
    finally:
        _SMOKE_TEST[0] = previous


def smoke_test_title(fig) -> None:
    """SMOKE_TEST_TITLE as the first line of the figure's title (its suptitle, made if it has none)."""
    current = getattr(fig, "_suptitle", None)  # the Text (Figure.get_suptitle gives only its string)
    text = SMOKE_TEST_TITLE + (f"\n{current.get_text()}" if current is not None and current.get_text() else "")
    fig.suptitle(text, fontsize=current.get_fontsize() if current is not None else 10.5)


def save(fig, out: Path, stem: str) -> list[Path]:
    if _SMOKE_TEST[0]:
        smoke_test_title(fig)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{stem}.png", out / f"{stem}.pdf"]
    with atomic_path(paths[0]) as tmp:
        fig.savefig(tmp, dpi=150, bbox_inches="tight", format="png")
    with atomic_path(paths[1]) as tmp:
        fig.savefig(tmp, bbox_inches="tight", metadata={"CreationDate": None}, format="pdf")
    plt.close(fig)
    return paths


def read_summary(tables: Path, study: str) -> pd.DataFrame:
    path = tables / f"summary_{study}.csv"
    if not path.exists():
        raise UserError(f"table missing: {path} (run the tables rule first)")
    return pd.read_csv(path)


def metric_rows(summary: pd.DataFrame, metric: str) -> pd.DataFrame:
    return summary[summary["metric"] == metric].copy()


def palette_for(studies: dict) -> dict[str, tuple]:
    """One colour per variant name, the same in every study."""
    names: list[str] = []
    for spec in studies.values():
        names += [v for v in spec.get("variants", []) if v not in names]
    palette = {v: BY_NAME[v].colour for v in names if v in BY_NAME}
    others = [v for v in names if v not in palette]
    colours = list(FALLBACK_COLOURS)
    if len(others) > len(colours):
        colours += sns.color_palette("husl", len(others) - len(colours)).as_hex()
    palette.update(zip(others, colours))
    return palette


def fmt(value) -> str:
    """Numbers in axes, legends and titles, one style per range: integers as such; below 0.1 as
    mantissa e exponent (1e-3, 3e-3, 3.2e-2, 6.4e-2, 1.25e-2); else 3 significant digits (0.1,
    0.128, 1.5), and 'e' notation again where those need it (1.23e5)."""
    value = float(value)
    if value == int(value) and abs(value) < 1e4:
        return str(int(value))
    text = f"{value:.2e}" if 0 < abs(value) < 0.1 else f"{value:.3g}"
    if "e" not in text:
        return text
    mantissa, exp = text.split("e")
    if "." in mantissa:
        mantissa = mantissa.rstrip("0").rstrip(".")
    return f"{mantissa}e{int(exp)}"


def seed_count(spec: dict, default: int = 1) -> int:
    return len(spec.get("seeds", [])) or default


def facets_of(df: pd.DataFrame, kind: str) -> list[tuple[int, float]]:
    """(depth, lr) panels, in the order of the study's swept axis."""
    pairs = df[["depth", "lr"]].drop_duplicates()
    by = ["lr", "depth"] if kind == "lr" else ["depth", "lr"]
    return [(int(d), float(lr)) for d, lr in pairs.sort_values(by)[["depth", "lr"]].itertuples(index=False)]


def facet_title(depth: int, lr: float, kind: str, facets: list[tuple[int, float]]) -> str:
    depths, lrs = {d for d, _ in facets}, {lr for _, lr in facets}
    parts = []
    if kind == "lr":
        parts.append(f"peak LR {fmt(lr)}")
        if len(depths) > 1:
            parts.append(f"{depth} layers")
    else:
        if kind == "depth" or len(depths) > 1:
            parts.append(f"{depth} layer{'s' if depth != 1 else ''}")
        if kind != "depth" or len(lrs) > 1:
            parts.append(f"peak LR {fmt(lr)}")
    return ", ".join(parts)


def panel_grid(n: int, width: float = 3.6, height: float = 2.9, max_cols: int = 4, **kw):
    cols = max(1, min(max_cols, n))
    rows = max(1, math.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows + 0.9), squeeze=False,
                             layout="constrained", **kw)
    flat = list(axes.flat)
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]


def figure_legend(fig, handles: list, ncol: int | None = None, title: str | None = None) -> None:
    if handles:
        fig.legend(handles=handles, loc="outside lower center", ncol=ncol or min(len(handles), 4), frameon=False,
                   fontsize=8.5, handlelength=2.2, columnspacing=1.4, title=title, title_fontsize=8.5)


def variant_handles(variants: list[str], palette: dict, texts: dict[str, str] | None = None) -> list:
    """Legend entries of the variants, in the papers' names (`methods.label`), `texts` appended."""
    texts = texts or {}
    return [Line2D([], [], color=palette[v], lw=2, marker="o", ms=4, label=label(v) + texts.get(v, ""))
            for v in variants]


def div_handle(label: str = "diverged (run stopped)") -> Line2D:
    return Line2D([], [], ls="none", marker="x", color=DIVERGED, ms=8, mew=2, label=label)


def seed_curve_handles(n_seeds: int, any_diverged: bool) -> list:
    """Legend entries of curve figures after the variants': the seed band, and the divergence mark."""
    handles = []
    if n_seeds > 1:
        handles.append(Patch(color="0.6", alpha=0.35, label="range of the seeds (thin: single seeds)"))
    if any_diverged:
        handles.append(div_handle(DIV_CURVE_LABEL if n_seeds > 1 else "diverged: run stopped at ×"))
    return handles


def no_data(ax, text: str = "no data") -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="0.4")


def tokens_axis(ax) -> None:
    ax.xaxis.set_major_formatter(mticker.EngFormatter(sep=""))
    ax.set_xlabel("tokens seen")



def _si(value: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= scale:
            return f"{value / scale:.3g}{unit}"
    return f"{value:.0f}"


def regime(spec: dict, runs: pd.DataFrame | None = None, steps: pd.DataFrame | None = None,
           depth: int | None = None) -> str:
    """A figure's second title line: the model depth, training length and seeds behind it."""
    parts = []
    depths = [depth] if depth is not None else sorted({int(d) for d in spec.get("depths", [])})
    if runs is not None and not depths and "depth" in runs and len(runs):
        depths = sorted({int(d) for d in runs["depth"].dropna()})
    if depths:
        parts.append(f"{', '.join(map(str, depths))} layer{'s' if depths != [1] else ''}")
    if steps is not None and len(steps) and "tokens" in steps and "step" in steps:
        ends = steps.groupby(["variant", "depth", "lr", "seed"])[["step", "tokens"]].max()
        parts.append(f"{int(ends['step'].median()):,} steps ({_si(float(ends['tokens'].median()))} tokens per run)")
    n = seed_count(spec, int(runs["seed"].nunique()) if runs is not None and len(runs) else 1)
    parts.append(f"n = {n} seed{'s' if n != 1 else ''}")
    return "; ".join(parts)


def claim_title(fig, claim: str, where: str, fontsize: float = 10.5) -> None:
    """The figure's title: first line the claim the figure shows, then the regime and n."""
    fig.suptitle(f"{claim}\n{where}", fontsize=fontsize)


def shade(colour, seed_index: int, n_seeds: int):
    """The variant's colour, darker for the first seed and lighter for the later ones: seeds told apart
    without leaving the variant's hue."""
    import matplotlib.colors as mcolors
    import numpy as np

    if n_seeds <= 1:
        return colour
    rgb = np.array(mcolors.to_rgb(colour))
    f = -0.35 + 0.8 * seed_index / (n_seeds - 1)  # -0.35 (darker) .. +0.45 (lighter)
    return tuple(rgb * (1 + f) if f < 0 else rgb + (1 - rgb) * f)
