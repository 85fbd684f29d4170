"""The grokking figures: accuracy, Softmax-Collapse fraction and weight norm vs epoch."""

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
# figure file stem -> what it shows (each written as .png and .pdf)
FIGURES = {
    "grokking_test_accuracy": "test accuracy (solid) and train accuracy (dashed) vs epoch",
    "grokking_collapse": "Softmax-Collapse fraction of the training set vs epoch",
    "grokking_weight_norm": "L2 norm of all weights vs epoch",
}


def _use_log_x(steps) -> bool:
    positive = steps.loc[steps["epoch"] > 0, "epoch"]
    return len(positive) > 0 and positive.max() / positive.min() >= 100


def _line_figure(steps, y: str, ylabel: str, title: str, path_stem: Path, *, style: str | None = None,
                 logy: bool = False, ylim=None, smoke_test: bool = False) -> list[Path]:
    """One panel per operation: y vs epoch, colour = variant, line style = `style` column; a smoke test's
    title opens with the smoke-test lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    data = steps.copy()
    data["variant"] = [PALETTE[(v, d)][0] for v, d in zip(data["variant"], data["loss_dtype"])]
    data["operation"] = [f"(a {OP_SYMBOL[op]} b) mod {p}" for op, p in zip(data["operation"], data["modulus"])]
    present = set(data["variant"])
    log_x = _use_log_x(data)
    if log_x:
        data = data[data["epoch"] > 0]  # epoch 0 has no place on a log axis
    operations = sorted(set(data["operation"]))
    sns.set_theme(style="whitegrid", context="talk")
    order = [label for label, _ in PALETTE.values() if label in present]
    # nested widths (first variant widest): curves that coincide, e.g. float32 and float64
    # softmax before collapse, stay visible one inside the other
    widths = {label: 1.6 + 1.4 * (len(order) - 1 - i) for i, label in enumerate(order)}
    grid = sns.relplot(data=data, x="epoch", y=y, hue="variant", size="variant", sizes=widths,
                       style=style, col="operation", col_order=operations, kind="line", units="seed",
                       estimator=None, palette={label: c for label, c in PALETTE.values()},
                       hue_order=order, size_order=order, height=5.5, aspect=1.35,
                       facet_kws={"sharey": True})
    for ax in grid.axes.flat:
        if log_x:
            ax.set_xscale("log")
        if logy:
            ax.set_yscale("log")
        if ylim is not None:
            ax.set_ylim(*ylim)
    grid.set_axis_labels("epoch (full-batch step)" + (", log scale" if log_x else ""), ylabel)
    grid.set_titles(col_template="{col_name}")
    if smoke_test:
        from ..summary import SMOKE_TEST_TITLE

        grid.figure.suptitle(f"{SMOKE_TEST_TITLE}\n{title}", y=1.0, va="bottom")
    else:
        grid.figure.suptitle(title, y=1.03)
    paths = []
    for ext in ("png", "pdf"):
        path = path_stem.with_suffix(f".{ext}")
        with atomic_path(path) as tmp:
            grid.figure.savefig(tmp, dpi=150, bbox_inches="tight", format=ext)
        paths.append(path)
    plt.close(grid.figure)
    return paths


def make_figures(steps, fig_dir: Path, smoke_test: bool = False) -> list[Path]:
    import pandas as pd

    fig_dir.mkdir(parents=True, exist_ok=True)
    acc = pd.concat([steps.assign(split="test", accuracy=steps["test_acc"]),
                     steps.assign(split="train", accuracy=steps["train_acc"])], ignore_index=True)
    paths = _line_figure(acc, "accuracy", "accuracy", "Grokking: accuracy per variant",
                         fig_dir / "grokking_test_accuracy", style="split", ylim=(-0.02, 1.02),
                         smoke_test=smoke_test)
    paths += _line_figure(steps, "collapse_frac", "fraction of train samples in SC",
                          "Softmax Collapse (sum exp(z - max z) == 1)",
                          fig_dir / "grokking_collapse", ylim=(-0.02, 1.02), smoke_test=smoke_test)
    paths += _line_figure(steps, "weight_norm", "‖θ‖₂ (all weights)", "Weight norm",
                          fig_dir / "grokking_weight_norm", logy=True, smoke_test=smoke_test)
    return paths
