"""Study kinds, declared once: what each kind's tables hold and which figures it draws.

A study in the experiment config names its `kind`; everything about that kind comes from its
record here: the summary metrics its table carries (or the function that computes its table), extra
per-study rows (LR sensitivity), the
figures (file stem -> caption file in workflow/report/), the report category, and the function
that draws them. Snakemake's planning reads this module, so it imports no matplotlib or torch;
draw functions are named by import path and loaded only when drawing.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class StudyKind:
    name: str
    claim: str  # which paper's claim the study tests
    category: str  # report category
    metrics: tuple[str, ...]  # summary_<study>.csv metrics (mean and CI per variant, depth, LR)
    figures: dict[str, str]  # figure stem -> caption file (workflow/report/)
    draw: str  # "module:function" drawing the kind's figures (beside the loss curves)
    extra_rows: str | None = None  # "module:function(runs, spec) -> rows" added to the summary table
    table: str | None = None  # "module:function(runs, steps, spec) -> DataFrame": the summary, instead of `metrics`

    def function(self, which: str) -> Callable[..., Any]:
        module, _, name = getattr(self, which).partition(":")
        return getattr(importlib.import_module(module), name)


LOSS_CURVES = {"loss_curves": "loss_curves.rst"}

KINDS: dict[str, StudyKind] = {k.name: k for k in (
    StudyKind(
        "depth", "MLRA: MLRA lowers TEV mean, TEV std and perplexity, more so in deeper models",
        "Depth study (TEV / MLRA)",
        ("final_val_ppl", "final_val_loss", "tev_mean", "tev_std", "tev_lm_head_mean", "tev_lm_head_std",
         "grad_norm_var", "params"),
        {**LOSS_CURVES, "ppl_vs_depth_best_lr": "ppl_vs_depth_best_lr.rst", "ppl_vs_depth": "ppl_vs_depth.rst",
         "tev_vs_depth": "tev_vs_depth.rst",
         "tev_over_training": "tev_over_training.rst", "grad_norm_var_vs_depth": "grad_norm_var_vs_depth.rst"},
        "stabilab.figures.depth:draw"),
    StudyKind(
        "lr", "OEC / Wortsman et al.: μ-centering and μ-loss lower LR sensitivity; ‖μ‖ and logits stay bounded",
        "Learning-rate study (OEC)",
        ("final_val_loss", "mu_norm", "logits_absmax", "logits_mean", "logits_mean_abs", "attn_logit_max"),
        {**LOSS_CURVES, "loss_vs_lr": "loss_vs_lr.rst", "lr_sensitivity": "lr_sensitivity.rst",
         "mu_norm_logits_vs_lr": "mu_norm_logits_vs_lr.rst",
         "drift_vs_summed_lr": "drift_vs_summed_lr.rst"},
        "stabilab.figures.lr:draw", extra_rows="stabilab.tables:lr_sensitivity_rows"),
    StudyKind(
        "spikes", "SPAM: spike-aware clipping and moment reset beat Adam", "Gradient spikes (SPAM)",
        ("final_val_loss", "spike_count", "max_grad_norm", "spam_clipped_frac", "gss_spikes", "gss_spikes_embedding",
         "gss_spikes_attn", "gss_spikes_mlp", "gss_spikes_norm", "gss_spikes_head"),
        {**LOSS_CURVES, "loss_gap_vs_step": "loss_gap_vs_step.rst", "grad_norm_traces": "grad_norm_traces.rst",
         "spike_counts": "spike_counts.rst"},
        "stabilab.figures.spikes:draw"),
    StudyKind(
        "compare", "the remaining methods side by side", "Variants side by side",
        ("final_val_loss", "final_val_ppl", "params", "flops_per_token", "tev_mean", "mu_norm", "logits_absmax",
         "collapse_frac", "wall_time_s"),
        {**LOSS_CURVES, "final_loss": "final_loss.rst"},
        "stabilab.figures.compare:draw"),
    StudyKind(
        "early_warning", "the TEV paper's proxy claim, tested: which logged metric rises before a run fails, "
        "and how far ahead", "Early warning", (),
        {**LOSS_CURVES, "auroc_vs_lead": "auroc_vs_lead.rst", "failure_traces": "failure_traces.rst"},
        "stabilab.figures.early_warning:draw", table="stabilab.early_warning:summary_table"),
)}


def expected_figures(studies: dict) -> dict[str, tuple[str, str]]:
    """PNG path (relative to the figures folder) -> (caption file, report category)."""
    out = {}
    for study, spec in studies.items():
        kind = KINDS[spec["kind"]]
        for stem, caption in kind.figures.items():
            out[f"{study}/{stem}.png"] = (caption, f"{kind.category}: {study}")
    return out
