"""Paper-style figures (seaborn; PNG and PDF) drawn from the tables alone.

Each study kind has its figures; `expected_figures` names them so that Snakemake knows its
outputs, and a caption file per figure says what it shows and which claim it tests.
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

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
}
CATEGORY = {"depth": "Depth study (TEV / MLRA)", "lr": "Learning-rate study (OEC)", "spikes": "Gradient spikes (SPAM)"}


def expected_figures(studies: dict) -> dict[str, tuple[str, str]]:
    """PNG path (relative to the figures folder) -> (caption file, report category)."""
    out = {}
    for study, spec in studies.items():
        for stem, caption in FIGURES[spec["kind"]].items():
            out[f"{study}/{stem}.png"] = (caption, f"{CATEGORY[spec['kind']]}: {study}")
    return out


def _save(fig, out: Path, stem: str) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{stem}.png", out / f"{stem}.pdf"]
    fig.savefig(paths[0], dpi=150, bbox_inches="tight")
    fig.savefig(paths[1], bbox_inches="tight")
    plt.close(fig)
    return paths


def _summary(tables: Path, study: str) -> pd.DataFrame:
    path = tables / f"summary_{study}.csv"
    if not path.exists():
        raise UserError(f"table missing: {path} (run the tables rule first)")
    return pd.read_csv(path)


def _metric(summary: pd.DataFrame, metric: str) -> pd.DataFrame:
    return summary[summary["metric"] == metric].copy()


def _errorbar_lines(ax, df: pd.DataFrame, x: str, hue_order: list[str], logx: bool = False) -> None:
    palette = dict(zip(hue_order, sns.color_palette("tab10", len(hue_order))))
    for variant in hue_order:
        d = df[df["variant"] == variant].sort_values(x)
        if d.empty:
            continue
        ax.plot(d[x], d["mean"], marker="o", label=variant, color=palette[variant])
        if d["ci95"].notna().any():
            ax.fill_between(d[x], d["mean"] - d["ci95"], d["mean"] + d["ci95"], alpha=0.2, color=palette[variant])
        div = d[d["n_diverged"] > 0]
        if not div.empty:  # a diverged point: a red x at the top of the axis
            ax.scatter(div[x], [np.nanmax(df["mean"])] * len(div), marker="x", color="red", zorder=5)
    if logx:
        ax.set_xscale("log")


def _loss_curves(steps: pd.DataFrame, study: str, facet: str, runs: pd.DataFrame):
    d = steps[steps["study"] == study]
    levels = sorted(d[facet].unique())
    fig, axes = plt.subplots(1, len(levels), figsize=(4 * len(levels), 3.4), squeeze=False, sharey=True)
    variants = sorted(d["variant"].unique())
    palette = dict(zip(variants, sns.color_palette("tab10", len(variants))))
    cap = float(d["train_loss"].replace([np.inf, -np.inf], np.nan).dropna().quantile(0.02)) if len(d) else 10
    top = float(runs["initial_loss"].max()) + 1.0 if "initial_loss" in runs else cap + 5
    for ax, level in zip(axes[0], levels):
        sub = d[d[facet] == level]
        for (variant, seed), g in sub.groupby(["variant", "seed"]):
            g = g.sort_values("tokens")
            ax.plot(g["tokens"], g["train_loss"].clip(upper=top), color=palette[variant], alpha=0.8,
                    label=f"{variant} (train)" if seed == sub["seed"].min() else None)
            v = g.dropna(subset=["val_loss"])
            ax.plot(v["tokens"], v["val_loss"].clip(upper=top), color=palette[variant], ls="--", marker=".",
                    label=f"{variant} (val)" if seed == sub["seed"].min() else None)
        ax.set_ylim(top=top)
        ax.set_title(f"{facet} = {level:g}" if isinstance(level, float) else f"{facet} = {level}")
        ax.set_xlabel("tokens seen")
    axes[0][0].set_ylabel("cross-entropy loss (nats)")
    axes[0][-1].legend(fontsize=7, loc="upper right")
    fig.suptitle(f"{study}: training (solid) and validation (dashed) loss")
    return fig


def draw_figures(tables_dir: str | Path, out_dir: str | Path, studies: dict | None = None) -> list[Path]:
    tables, out = Path(tables_dir), Path(out_dir)
    if studies is None:
        studies_file = tables / "studies.json"
        if not studies_file.exists():
            raise UserError(f"table missing: {studies_file} (run the tables rule first)")
        studies = json.loads(studies_file.read_text())
    for name in ("runs.csv", "steps.csv"):
        if not (tables / name).exists():
            raise UserError(f"table missing: {tables / name} (run the tables rule first)")
    runs, steps = pd.read_csv(tables / "runs.csv"), pd.read_csv(tables / "steps.csv")
    sns.set_theme(style="whitegrid", context="paper")
    written: list[Path] = []
    for study, spec in studies.items():
        kind, folder = spec["kind"], out / study
        summary = _summary(tables, study)
        variants = list(spec["variants"])
        facet = "depth" if kind == "depth" else ("lr" if kind == "lr" else "depth")
        written += _save(_loss_curves(steps, study, facet, runs[runs["study"] == study]), folder, "loss_curves")
        if kind == "depth":
            written += _depth_figures(summary, steps[steps["study"] == study], variants, folder, study)
        elif kind == "lr":
            written += _lr_figures(summary, variants, folder, study)
        else:
            written += _spike_figures(summary, steps[steps["study"] == study], variants, folder, study, spec)
    return written


def _depth_figures(summary, steps, variants, folder, study) -> list[Path]:
    written = []
    fig, ax = plt.subplots(figsize=(4.5, 3.4))
    _errorbar_lines(ax, _metric(summary, "final_val_ppl"), "depth", variants)
    ax.set(xlabel="depth (layers)", ylabel="final validation perplexity", title=f"{study}: perplexity vs depth")
    ax.legend()
    written += _save(fig, folder, "ppl_vs_depth")

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for ax, metric, label in zip(axes, ["tev_mean", "tev_std"], ["TEV mean", "TEV std"]):
        _errorbar_lines(ax, _metric(summary, metric), "depth", variants)
        ax.set(xlabel="depth (layers)", ylabel=f"{label} of wte rows", title=label)
    axes[0].legend()
    fig.suptitle(f"{study}: token embedding variability vs depth")
    written += _save(fig, folder, "tev_vs_depth")

    depths = sorted(steps["depth"].unique())
    fig, axes = plt.subplots(1, len(depths), figsize=(4 * len(depths), 3.2), squeeze=False, sharey=True)
    d = steps.dropna(subset=["tev_mean"])
    for ax, depth in zip(axes[0], depths):
        sns.lineplot(d[d["depth"] == depth], x="tokens", y="tev_mean", hue="variant", hue_order=variants, ax=ax,
                     errorbar=("ci", 95))
        ax.set(title=f"depth {depth}", xlabel="tokens seen", ylabel="TEV mean")
    fig.suptitle(f"{study}: TEV over training")
    written += _save(fig, folder, "tev_over_training")

    fig, ax = plt.subplots(figsize=(4.5, 3.4))
    _errorbar_lines(ax, _metric(summary, "grad_norm_var"), "depth", variants)
    ax.set(xlabel="depth (layers)", ylabel="variance of total grad norm", yscale="log",
           title=f"{study}: gradient-norm variance vs depth")
    ax.legend()
    written += _save(fig, folder, "grad_norm_var_vs_depth")
    return written


def _lr_figures(summary, variants, folder, study) -> list[Path]:
    written = []
    fig, ax = plt.subplots(figsize=(4.8, 3.4))
    _errorbar_lines(ax, _metric(summary, "final_val_loss"), "lr", variants, logx=True)
    ax.set(xlabel="peak learning rate", ylabel="final validation loss (nats)", title=f"{study}: loss vs learning rate")
    ax.legend()
    written += _save(fig, folder, "loss_vs_lr")

    fig, ax = plt.subplots(figsize=(4.8, 3.4))
    sens = _metric(summary, "lr_sensitivity")
    sns.barplot(sens, x="variant", y="mean", order=[v for v in variants if v in set(sens["variant"])], ax=ax)
    ax.set(xlabel="variant", ylabel="LR sensitivity (nats)", title=f"{study}: LR sensitivity (lower is better)")
    ax.tick_params(axis="x", rotation=30)
    written += _save(fig, folder, "lr_sensitivity")

    fig, axes = plt.subplots(1, 2, figsize=(9.5, 3.4))
    for ax, metric, label in zip(axes, ["mu_norm", "logits_absmax"], ["||mu|| of output embedding", "mean max |logit|"]):
        _errorbar_lines(ax, _metric(summary, metric), "lr", variants, logx=True)
        ax.set(xlabel="peak learning rate", ylabel=label, title=label)
    axes[0].legend()
    fig.suptitle(f"{study}: output-embedding mean and logit size vs learning rate")
    written += _save(fig, folder, "mu_norm_logits_vs_lr")
    return written


def _spike_figures(summary, steps, variants, folder, study, spec) -> list[Path]:
    written = []
    fig, ax = plt.subplots(figsize=(7, 3.4))
    palette = dict(zip(variants, sns.color_palette("tab10", len(variants))))
    for (variant, seed), g in steps.groupby(["variant", "seed"]):
        g = g.sort_values("step")
        ax.plot(g["step"], g["grad_norm"], label=variant if seed == steps["seed"].min() else None,
                color=palette.get(variant), alpha=0.8)
    ax.set(xlabel="step", ylabel="total gradient norm (before clipping)", yscale="log",
           title=f"{study}: gradient-norm traces")
    ax.legend()
    written += _save(fig, folder, "grad_norm_traces")

    fig, ax = plt.subplots(figsize=(4.8, 3.4))
    counts = _metric(summary, "spike_count")
    sns.barplot(counts, x="variant", y="mean", order=[v for v in variants if v in set(counts["variant"])], ax=ax)
    ax.set(xlabel="variant", ylabel="gradient-norm spikes (GSS > 50)", title=f"{study}: spike counts")
    written += _save(fig, folder, "spike_counts")
    return written
