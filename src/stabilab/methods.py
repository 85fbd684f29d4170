"""Every method of the pipeline, declared once.

A method is a named overlay on the run config (`overlay`: what switching it on sets) plus what a
reader needs to know about it: its name as the papers write it (`label`, used in legends), where
it comes from, which part of training it touches, which further config keys are its
hyperparameters (`knobs`; their defaults and docs live on the config fields), its colour in every
figure, and, for post-step methods, the hook the trainer runs after each `optimizer.step()`.

Everything else derives from this table: the variants a study may name (`variants_of`), the
schema's knowledge of them, legend labels and colours, the benchmarks' default list, the
README's methods table (`stabilab methods --markdown`), and the trainer's post-step hooks.
Adding a method: docs/adding-a-method.md.

This module imports no torch or matplotlib: Snakemake's planning and the figures read it.
"""

from __future__ import annotations

import copy
import importlib
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

from .config import RunConfig, deep_merge, defaults, leaves
from .errors import UserError

Part = Literal["model", "loss", "optim", "post_step", "metrics"]


@dataclass(frozen=True)
class Method:
    name: str  # the variant name configs use, e.g. "oec_center"
    label: str  # as the papers write it, e.g. "μ-centering"
    source: str  # paper (arXiv id) or "comparator"
    part: Part | None  # which part of training it touches (None: the baseline)
    overlay: dict  # the run-config overlay that switches it on
    summary: str  # one line: what it does
    colour: str  # the same in every figure; never red (red marks divergence)
    knobs: tuple[str, ...] = ()  # further config keys (or sections) that are its hyperparameters
    role: Literal["method", "option", "control"] = "method"  # options: architecture / optimizer
    # choices of the papers' model families; controls: comparators and ablations
    overhead_target_pct: float | None = None  # step-time target vs the baseline on a GPU
    post_step: str | None = None  # "module:function(model)" run after optimizer.step() when active

    @property
    def keys(self) -> tuple[str, ...]:
        """Every config key the method owns: its overlay's leaves and its knobs."""
        return tuple(leaves(self.overlay)) + self.knobs

    def active(self, run: RunConfig) -> bool:
        """Whether `run` has this method switched on: every key its overlay sets differs from
        the default (so a redefined strength, e.g. another z-loss weight, still counts)."""
        values, default = leaves(run.to_dict()), leaves(defaults())
        switches = leaves(self.overlay)
        return bool(switches) and all(values.get(k) != default.get(k) for k in switches)

    def hook(self) -> Callable[[Any], None]:
        module, _, function = self.post_step.partition(":")
        return getattr(importlib.import_module(module), function)


BASELINE = Method(
    "baseline", "baseline", "GPT-2 (nanoGPT)", None, {},
    "pre-LN GPT-2, tied embeddings, AdamW (0.9, 0.95), clip 1.0, warmup + cosine", "#404040", role="control")

METHODS: tuple[Method, ...] = (
    Method("mlra", "MLRA", "MLRA, arXiv 2409.07787", "model", {"model": {"mlra": {"enabled": True}}},
           "per-head low-rank Q/K/V projections W_h = A_h B_h of rank r", "#0173b2",
           knobs=("model.mlra.rank", "model.mlra.targets")),
    Method("oec_center", "μ-centering", "OEC, arXiv 2601.02031", "post_step",
           {"post_step": {"mu_centering": True}},
           "after each optimizer step E <- E - mean_rows(E) (no_grad; optimizer moments untouched)", "#029e73",
           overhead_target_pct=1.0, post_step="stabilab.train.hooks:center_output_embedding"),
    Method("oec_loss", "μ-loss", "OEC, arXiv 2601.02031", "loss", {"loss": {"mu_loss": 1.0e-4}},
           "L = CE + λ ‖μ‖², one term per step", "#7fbf3f", overhead_target_pct=1.0),
    Method("zloss", "z-loss", "PaLM, arXiv 2204.02311", "loss", {"loss": {"z_loss": 1.0e-4}},
           "L = CE + λ mean(logsumexp(l)²)", "#de8f05", overhead_target_pct=1.0),
    Method("softcap", "soft-capping", "Gemma 2, arXiv 2408.00118", "model", {"model": {"logit_softcap": 30.0}},
           "l <- c tanh(l / c) before the loss", "#cc78bc", overhead_target_pct=1.0),
    Method("stablemax", "StableMax", "StableMax, arXiv 2501.04697", "loss", {"loss": {"kind": "stablemax"}},
           "StableMax cross-entropy; validation perplexity from StableMax probabilities", "#8c564b",
           overhead_target_pct=3.0),
    Method("perpgrad", "⊥Grad", "StableMax, arXiv 2501.04697", "optim", {"optim": {"perpgrad": True}},
           "each gradient made orthogonal to its weight, rescaled to its norm, before the base optimizer",
           "#b8a000", overhead_target_pct=3.0),
    Method("spam", "SPAM", "SPAM, arXiv 2501.06842", "optim", {"optim": {"name": "spam"}},
           "spike clipping sign(g) sqrt(θ v), moment reset every ΔT, cosine LR warmup after resets",
           "#6a3d9a", knobs=("optim.spam",), overhead_target_pct=3.0),
    Method("qk_norm", "qk-norm", "Wortsman et al., arXiv 2309.14322", "model", {"model": {"qk_norm": "layernorm"}},
           "per-head LayerNorm of q and k (learnable gain): bounds every attention logit", "#9d4edd",
           knobs=("model.qk_norm",), role="option"),
    Method("rope", "RoPE", "RoFormer, arXiv 2104.09864", "model", {"model": {"position": "rope"}},
           "rotary position embedding instead of the learned wpe", "#9c9ede",
           knobs=("model.rope_fraction", "model.rope_base"), role="option"),
    Method("swiglu", "SwiGLU", "LLaMA, arXiv 2302.13971", "model", {"model": {"mlp": "swiglu"}},
           "MLP W2(silu(W1 x) ⊙ W3 x) instead of GELU", "#ffd92f", knobs=("model.mlp_hidden",), role="option"),
    Method("rmsnorm", "RMSNorm", "LLaMA, arXiv 2302.13971", "model", {"model": {"norm": "rmsnorm"}},
           "RMSNorm instead of LayerNorm in the blocks and before the head", "#4daf4a", role="option"),
    Method("indep_wd", "independent WD", "Wortsman et al., arXiv 2309.14322", "optim",
           {"optim": {"weight_decay_mode": "independent"}},
           "weight decay not scaled by the peak LR: p <- p - s_t λ p", "#8c8c00", role="option"),
    Method("fp32_head", "float32 head", "control, METHODS.md §1b", "model", {"model": {"head_fp32": True}},
           "output-layer matmul and logits in float32: separates OEC's effect from bf16 logit resolution",
           "#6baed6", role="control"),
    Method("adamw_noclip", "AdamW, no clipping", "comparator", "optim", {"optim": {"grad_clip": None}},
           "AdamW without global grad-norm clipping", "#17a3c7", role="control"),
    Method("untied", "untied", "comparator", "model", {"model": {"tie_embeddings": False}},
           "separate lm_head (TEV is then logged for both matrices)", "#e7298a", role="control"),
)

BY_NAME: dict[str, Method] = {m.name: m for m in (BASELINE, *METHODS)}

# The papers' own numbers that the figures mark as references (docs/METHODS.md §4): OEC's 16M model's LR
# sensitivity in OEC's normalization (÷(K − 1), L0 = ln V), over its 7 LRs 3e-4 … 0.3 (100k steps, FineWeb).
PAPER_LR_SENSITIVITY = {"baseline": 0.306, "oec_center": 0.028, "oec_loss": 0.031, "zloss": 0.054}
PAPER_LR_SENSITIVITY_SOURCE = "OEC's 16M model, its 7 LRs 3e-4 … 0.3"


def builtin_variants() -> dict[str, dict]:
    return {m.name: copy.deepcopy(m.overlay) for m in (BASELINE, *METHODS)}


def variants_of(config: dict) -> dict[str, dict]:
    """The variants an experiment can name: the methods above, then the config's own
    `variants:` (new names, or a method redefined, e.g. another z-loss weight)."""
    out = builtin_variants()
    for name, overlay in (config.get("variants") or {}).items():
        out[name] = {k: copy.deepcopy(v) for k, v in (overlay or {}).items() if k != "label"}  # legends only
    return out


def variant_overlay(name: str, variants: dict[str, dict]) -> dict:
    """The overlay of a variant name; `a+b` composes variants `a` and `b`.

    Composition is refused when two parts set the same key to different values, because the
    result would depend on the order they are listed in.
    """
    if name in variants:
        return copy.deepcopy(variants[name] or {})
    parts = name.split("+")
    unknown = [p for p in parts if p not in variants]
    if len(parts) == 1 or unknown:
        raise UserError(f"unknown variant '{(unknown or [name])[0]}' (defined: {', '.join(sorted(variants))})")
    merged: dict = {}
    owner: dict[str, tuple[str, Any]] = {}
    for part in parts:
        overlay = variants[part] or {}
        for key, value in leaves(overlay).items():
            if key in owner and owner[key][1] != value:
                raise UserError(f"variants '{owner[key][0]}' and '{part}' cannot be combined in '{name}': "
                                f"both set {key} ({owner[key][1]!r} vs {value!r})")
            owner[key] = (part, value)
        merged = deep_merge(merged, overlay)
    return merged


_GIVEN_LABELS: dict[str, str] = {}  # an experiment's own legend names, while its figures are drawn


def label(name: str) -> str:
    """A variant's name as the papers write it (or as the experiment's `label:` gives it);
    'a+b' -> 'A + B'; other names as they are."""
    return " + ".join(_GIVEN_LABELS.get(p) or (BY_NAME[p].label if p in BY_NAME else p) for p in name.split("+"))


@contextmanager
def given_labels(labels: dict[str, str]):
    """Use an experiment's legend names (variant -> label) in `label` inside the block."""
    previous = dict(_GIVEN_LABELS)
    _GIVEN_LABELS.update(labels)
    try:
        yield
    finally:
        _GIVEN_LABELS.clear()
        _GIVEN_LABELS.update(previous)


def benchmark_variants() -> list[str]:
    """The baseline and every method (not the controls): what the benchmarks time by default."""
    return ["baseline"] + [m.name for m in METHODS if m.role == "method"]


def post_step_hooks(run: RunConfig) -> list[Callable[[Any], None]]:
    """The hooks of the post-step methods active in `run`, in declaration order."""
    return [m.hook() for m in METHODS if m.post_step and m.active(run)]


def _field(key: str) -> tuple[Any, str]:
    """(default, doc) of a run-config key such as 'optim.spam.threshold'."""
    model: Any = RunConfig
    value: Any = defaults()
    *parents, last = key.split(".")
    for part in parents:
        model, value = model.model_fields[part].annotation, value[part]
    return value[last], model.model_fields[last].description or ""


def _fmt(value: Any) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k} {_fmt(v)}" for k, v in value.items())
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def markdown_table() -> str:
    """The README's methods table, generated from the declarations and the config fields."""
    rows = ["| variant | name in figures | source | part it touches | what it does | sets "
            "| hyperparameters (default) |",
            "|---|---|---|---|---|---|---|"]
    for m in (BASELINE, *METHODS):
        sets = ", ".join(f"`{k}: {_fmt(v)}`" for k, v in leaves(m.overlay).items()) or "—"
        knobs = []
        for key in m.knobs:
            default, doc = _field(key)
            knobs.append(f"`{key}`: {_fmt(default)}" if isinstance(default, dict)
                         else f"`{key}` ({_fmt(default)}): {doc}")
        rows.append(f"| `{m.name}` | {m.label} | {m.source} | {m.part or '—'} | {m.summary} | {sets} | "
                    f"{'; '.join(knobs)} |")
    return "\n".join(rows)


README_MARKERS = ("<!-- methods table: generated by `stabilab methods --markdown` -->\n",
                  "<!-- end of methods table -->")


def update_readme(path) -> bool:
    """Replace the methods table between README_MARKERS in `path`; True when it changed."""
    from pathlib import Path

    path = Path(path)
    text = path.read_text()
    start, end = README_MARKERS
    if start not in text or end not in text:
        raise UserError(f"{path} has no methods-table markers ({start.strip()} ... {end})")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    new = head + start + markdown_table() + "\n" + end + tail
    if new != text:
        path.write_text(new)
    return new != text
