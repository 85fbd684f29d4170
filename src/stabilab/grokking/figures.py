"""The grokking figures: the StableMax paper's figure (test accuracy per seed with Softmax Collapse
shaded), and accuracy, Softmax-Collapse fraction and weight norm vs epoch.

Every figure has one panel per variant (rows: operations) on a linear epoch axis of its own: runs of
300 and of 100 000 epochs share no axis, and on a log axis the collapse at epochs 82k–100k would be a
sliver. Seeds are told apart by shades of the variant's colour (darkest first)."""

from __future__ import annotations

from pathlib import Path

from ..io import atomic_path
from ..methods import BY_NAME

OP_SYMBOL = {"add": "+", "mul": "*"}
# legend label per (variant, loss dtype) and its colour, in legend order: the language-model
# figures' colours where the method is the same (baseline grey for plain softmax, StableMax's and
# ⊥Grad's own), never red (red marks divergence in every figure)
PALETTE = {
    ("softmax_fp32", "float32"): ("softmax, float32", BY_NAME["baseline"].colour),
    ("softmax_fp64", "float64"): ("softmax, float64", "#a0a0a0"),
    ("stablemax", "float32"): ("StableMax, float32", "#c49c94"),
    ("stablemax", "float64"): ("StableMax, float64 loss", BY_NAME["stablemax"].colour),
    ("perpgrad", "float32"): ("⊥AdamW, float32", BY_NAME["perpgrad"].colour),
}
COLLAPSE = "#9b8ec4"  # the Softmax-Collapse shading (not the divergence red)
# figure file stem -> what it shows (each written as .png and .pdf)
FIGURES = {
    "grokking_claim": "test accuracy per seed with the Softmax-Collapse fraction shaded (the paper's figure)",
    "grokking_test_accuracy": "test accuracy (solid) and train accuracy (dashed) vs epoch",
    "grokking_collapse": "Softmax-Collapse fraction of the training set vs epoch",
    "grokking_weight_norm": "L2 norm of all weights vs epoch",
}


def _keys(steps) -> list[tuple]:
    """(variant, loss dtype, Adam beta2) triples present, in the palette's order, then by beta2 (None in
    tables written before beta2 was kept): runs of one loss at two beta2 get a row or column each."""
    b2 = steps["beta2"].astype(object).where(steps["beta2"].notna(), None) if "beta2" in steps else [None] * len(steps)
    present = set(zip(steps["variant"], steps["loss_dtype"], b2))
    rank = {k: i for i, k in enumerate(PALETTE)}
    return sorted(present, key=lambda k: (rank.get(k[:2], len(rank)), k[:2], k[2] if k[2] is not None else -1))


def _label(key) -> str:
    name = PALETTE.get(key[:2], (f"{key[0]}, {key[1]}",))[0]
    return name if key[2] is None else f"{name}\nAdam β2 {key[2]:g}"


def _colour(key) -> str:
    return PALETTE.get(key[:2], (None, "0.3"))[1]


def _runs_of(steps, op, key):
    """The rows of one operation and one (variant, loss dtype, beta2)."""
    g = steps[(steps["operation"] == op[0]) & (steps["modulus"] == op[1]) & (steps["variant"] == key[0])
              & (steps["loss_dtype"] == key[1])]
    return g if key[2] is None else g[g["beta2"] == key[2]]


def _operations(steps) -> list[tuple[str, int]]:
    return sorted(set(zip(steps["operation"], steps["modulus"])))


def _op_text(op) -> str:
    return f"(a {OP_SYMBOL.get(op[0], op[0])} b) mod {op[1]}"


def _regime(steps) -> str:
    seeds = sorted(int(s) for s in steps["seed"].unique())
    return (f"MLP [200, 200] on {', '.join(_op_text(op) for op in _operations(steps))}; "
            f"n = {len(seeds)} seed{'s' if len(seeds) != 1 else ''} ({', '.join(map(str, seeds))}), "
            "darkest first; epoch = one full-batch step")


def _save(fig, path_stem: Path, title: str, where: str, smoke_test: bool) -> list[Path]:
    import matplotlib.pyplot as plt

    text = f"{title}\n{where}"
    if smoke_test:
        from ..summary import SMOKE_TEST_TITLE

        text = f"{SMOKE_TEST_TITLE}\n{text}"
    fig.suptitle(text, fontsize=11)
    paths = []
    for ext in ("png", "pdf"):
        path = path_stem.with_suffix(f".{ext}")
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=150, bbox_inches="tight", format=ext)
        paths.append(path)
    plt.close(fig)
    return paths


def _grid(steps, rows: int, width: float = 3.6, height: float = 2.7):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = max(1, len(_keys(steps)))
    width = max(width, 8.0 / cols)  # room for the two title lines when there is one variant
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows + 1.2), squeeze=False, sharey=True,
                             layout="constrained")
    return fig, axes


def _epoch_axis(ax) -> None:
    """Epochs in thousands ('20k') where runs are long: no '×10⁴' under every panel."""
    import matplotlib.ticker as mticker

    ax.xaxis.set_major_formatter(mticker.FuncFormatter(lambda v, _: f"{v / 1000:g}k" if abs(v) >= 1000 else f"{v:g}"))


def _seed_lines(ax, g, y: str, colour, seeds: list[int], **line) -> None:
    from ..figures.style import shade

    style = {k: v for k, v in line.items() if k != "label"}
    for seed, run in g.groupby("seed"):
        run = run.sort_values("epoch")
        ax.plot(run["epoch"], run[y], color=shade(colour, seeds.index(int(seed)), len(seeds)), **style)


def _line_figure(steps, ys: list[tuple[str, dict]], ylabel: str, title: str, path_stem: Path, *,
                 logy: bool = False, ylim=None, smoke_test: bool = False) -> list[Path]:
    """Rows: operations; columns: variants, each on its own linear epoch axis (one y scale); one line per
    seed and `ys` column (with its line style)."""
    from matplotlib.lines import Line2D

    from ..figures.style import shade

    ops, keys = _operations(steps), _keys(steps)
    seeds = sorted(int(s) for s in steps["seed"].unique())
    fig, axes = _grid(steps, len(ops))
    for i, op in enumerate(ops):
        for j, key in enumerate(keys):
            ax = axes[i][j]
            g = _runs_of(steps, op, key)
            for y, line in ys:
                _seed_lines(ax, g, y, _colour(key), seeds, **line)
            ax.set_title(f"{_label(key)}" + (f"\n{_op_text(op)}" if len(ops) > 1 else ""), fontsize=10,
                         color=_colour(key), fontweight="bold")
            if logy:
                ax.set_yscale("log")
            if ylim is not None:
                ax.set_ylim(*ylim)
            ax.set_xlim(left=0)
            _epoch_axis(ax)
            ax.set_xlabel("epoch" if i == len(ops) - 1 else "")
            ax.set_ylabel(ylabel if j == 0 else "")
    handles = [Line2D([], [], color=shade("0.4", k, len(seeds)), lw=2, label=f"seed {s}") for k, s in enumerate(seeds)]
    handles += [Line2D([], [], color="0.3", lw=line.get("lw", 1.6), ls=line.get("ls", "-"), label=line["label"])
                for _, line in ys if "label" in line]
    fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), frameon=False, fontsize=9)
    return _save(fig, path_stem, title, _regime(steps), smoke_test)


def claim_figure(steps, path_stem: Path, smoke_test: bool = False) -> list[Path]:
    """The paper's figure: rows are variants, columns seeds; each panel the test accuracy (variant colour),
    the train accuracy (dashed grey) and, shaded, the fraction of training samples in Softmax Collapse,
    on the run's own linear epoch axis; the epoch its test accuracy first reaches 95 % marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    ops, keys = _operations(steps), _keys(steps)
    rows = [(op, key) for op in ops for key in keys]
    seeds = sorted(int(s) for s in steps["seed"].unique())
    fig, axes = plt.subplots(len(rows), len(seeds), figsize=(3.3 * len(seeds), 2.1 * len(rows) + 1.3),
                             squeeze=False, sharey=True, layout="constrained")
    for i, (op, key) in enumerate(rows):
        g = _runs_of(steps, op, key)
        for j, seed in enumerate(seeds):
            ax = axes[i][j]
            run = g[g["seed"] == seed].sort_values("epoch")
            if not len(run):
                ax.set_axis_off()
                continue
            ax.fill_between(run["epoch"], 0, run["collapse_frac"], color=COLLAPSE, alpha=0.45, lw=0, step="mid")
            ax.plot(run["epoch"], run["train_acc"], color="0.45", lw=1, ls="--")
            ax.plot(run["epoch"], run["test_acc"], color=_colour(key), lw=2)
            hit = run[run["test_acc"] >= 0.95]
            if len(hit):
                ax.axvline(hit["epoch"].iloc[0], color=_colour(key), lw=0.8, ls=":")
            ax.set_ylim(-0.03, 1.03)
            ax.set_xlim(0, run["epoch"].max())
            _epoch_axis(ax)
            final = run.iloc[-1]
            ax.text(0.98, 0.5, f"test {final['test_acc']:.0%}\nSC {final['collapse_frac']:.0%}", ha="right",
                    va="center", transform=ax.transAxes, fontsize=7.5, color="0.2",
                    bbox=dict(facecolor="white", edgecolor="none", alpha=0.7, pad=1))
            if i == 0:
                ax.set_title(f"seed {seed}", fontsize=10)
            if j == 0:
                ax.set_ylabel(_label(key) + (f"\n{_op_text(op)}" if len(ops) > 1 else ""), fontsize=9,
                              color=_colour(key), fontweight="bold")
            if i == len(rows) - 1:
                ax.set_xlabel("epoch")
    handles = [Line2D([], [], color="0.3", lw=2, label="test accuracy (variant's colour)"),
               Line2D([], [], color="0.45", lw=1, ls="--", label="train accuracy"),
               Patch(color=COLLAPSE, alpha=0.45, label="Softmax Collapse: fraction of train samples"),
               Line2D([], [], color="0.3", lw=0.8, ls=":", label="test accuracy first ≥ 95 %")]
    fig.legend(handles=handles, loc="outside lower center", ncol=4, frameon=False, fontsize=9)
    return _save(fig, path_stem, "StableMax (arXiv 2501.04697): without regularisation, float32 softmax stops "
                 "learning in Softmax Collapse; StableMax groks", _regime(steps).replace(", darkest first", "")
                 + "; each run on its own epoch axis", smoke_test)


def make_figures(steps, fig_dir: Path, smoke_test: bool = False) -> list[Path]:
    fig_dir.mkdir(parents=True, exist_ok=True)
    paths = claim_figure(steps, fig_dir / "grokking_claim", smoke_test)
    paths += _line_figure(steps, [("test_acc", {"lw": 1.8, "label": "test (solid)"}),
                                  ("train_acc", {"lw": 1.0, "ls": "--", "label": "train (dashed)"})],
                          "accuracy", "Grokking: test accuracy (solid) and train accuracy (dashed) per variant",
                          fig_dir / "grokking_test_accuracy", ylim=(-0.02, 1.02), smoke_test=smoke_test)
    paths += _line_figure(steps, [("collapse_frac", {"lw": 1.6})], "fraction of train samples in SC",
                          "Softmax Collapse (SC): the share of training samples whose sum exp(z − max z) rounds to 1",
                          fig_dir / "grokking_collapse", ylim=(-0.02, 1.02), smoke_test=smoke_test)
    paths += _line_figure(steps, [("weight_norm", {"lw": 1.6})], "‖θ‖₂ (all weights, log scale)",
                          "Weight norm: it grows without weight decay (the logits with it)",
                          fig_dir / "grokking_weight_norm", logy=True, smoke_test=smoke_test)
    return paths
