"""The grokking study's variants, config section and resolved run specs (no torch imported).

Four variants, declared once here (label and colour are the figures'):

- ``softmax_fp32``  softmax cross-entropy, float32 (expected: Softmax Collapse, no grokking)
- ``softmax_fp64``  the same with the whole model, inputs and loss in float64
- ``stablemax``     StableMax cross-entropy of the float32 logits, computed in float32 or, as in the
                    official code, in float64 (``stablemax_dtype``); expected: grokking without
                    regularization
- ``perpgrad``      softmax cross-entropy, float32, with the ⊥Grad projection before each AdamW step
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..config import Section, knob, unique_list, validated
from ..errors import UserError
from ..layout import GROK_RUN_DIR


@dataclass(frozen=True)
class GrokVariant:
    name: str
    model_dtype: Literal["float32", "float64"]
    loss: Literal["softmax", "stablemax"]
    perpgrad: bool
    summary: str


VARIANT_TABLE: tuple[GrokVariant, ...] = (
    GrokVariant("softmax_fp32", "float32", "softmax", False, "softmax cross-entropy, float32"),
    GrokVariant("softmax_fp64", "float64", "softmax", False, "model, inputs and loss in float64"),
    GrokVariant("stablemax", "float32", "stablemax", False, "StableMax cross-entropy (loss dtype: stablemax_dtype)"),
    GrokVariant("perpgrad", "float32", "softmax", True, "softmax, float32, ⊥Grad before each AdamW step (⊥AdamW)"),
)
VARIANTS = tuple(v.name for v in VARIANT_TABLE)
BY_NAME = {v.name: v for v in VARIANT_TABLE}
OPERATIONS = ("add", "mul")
TARGET_ACC = 0.95  # "epochs to 95 % test accuracy"

VariantName = Literal.__getitem__(VARIANTS)
Operation = Literal.__getitem__(OPERATIONS)


class Overrides(Section):
    """Per-variant hyperparameters; null keeps the study-wide value."""

    lr: float | None = knob(None, "learning rate", gt=0)
    beta2: float | None = knob(None, "Adam beta2", ge=0, lt=1)
    eps: float | None = knob(None, "Adam epsilon", ge=0)
    epochs: int | None = knob(None, "full-batch steps", ge=1)
    eval_every: int | None = knob(None, "evaluation interval in epochs", ge=1)


class Hyper(Section):
    """What every run of the study shares (and each RunSpec holds)."""

    modulus: int = knob(113, "p of (a op b) mod p", ge=2)
    train_fraction: float = knob(0.4, "share of the p^2 pairs in the training set", gt=0, lt=1)
    epochs: int = knob(200, "full-batch AdamW steps", ge=1)
    lr: float = knob(0.01, "learning rate", gt=0)
    beta1: float = knob(0.9, "Adam beta1", ge=0, lt=1)
    beta2: float = knob(0.99, "Adam beta2", ge=0, lt=1)
    eps: float = knob(1e-25, "the official code's AdamW epsilon", ge=0)
    hidden: list[int] = knob([200, 200], "widths of the ReLU layers", min_length=1)
    init_scale: float = knob(1.0, "multiplies PyTorch's default init; the paper's MLP runs use 1", gt=0)
    eval_every: int = knob(10, "evaluation interval in epochs", ge=1)
    stablemax_dtype: Literal["float32", "float64"] = knob(
        "float32", "dtype the StableMax loss is computed in (float32 model either way); official code: float64")


class GrokkingConfig(Hyper):
    """The ``grokking:`` section of the experiment config (defaults: the short CPU preset)."""

    operations: unique_list(Operation) = knob(["add"], "operations")
    variants: unique_list(VariantName) = knob(
        list(VARIANTS), "variants to run; [] switches the study off")
    seeds: unique_list(int) = knob([0], "seeds (split and init)")
    overrides: dict[VariantName, Overrides] = knob({}, "per-variant hyperparameters")


class RunSpec(Hyper):
    """One fully resolved run: what `grok-train --spec` receives as JSON."""

    variant: VariantName = knob("softmax_fp32", "the variant")
    operation: Operation = knob("add", "the operation")
    seed: int = knob(0, "seed of the split and the initialization", ge=0)

    @property
    def kind(self) -> GrokVariant:
        return BY_NAME[self.variant]

    @property
    def model_dtype(self) -> str:
        return self.kind.model_dtype

    @property
    def loss_dtype(self) -> str:
        """dtype the loss (and the Softmax-Collapse test) is computed in."""
        return self.stablemax_dtype if self.kind.loss == "stablemax" else self.model_dtype

    @property
    def loss_kind(self) -> str:
        return self.kind.loss


def check_spec(spec: RunSpec) -> RunSpec:
    n_train = round(spec.train_fraction * spec.modulus**2)
    if not 0 < n_train < spec.modulus**2:
        raise UserError(f"grokking: train_fraction {spec.train_fraction} leaves an empty train or test set "
                        f"for modulus {spec.modulus}")
    return spec


def load_config(section: dict | None) -> GrokkingConfig:
    """Strictly parse the ``grokking:`` config section (unknown keys -> UserError)."""
    return validated(GrokkingConfig, section or {}, "grokking")


def run_specs(section: dict | None) -> list[RunSpec]:
    """Every run of the study (operation x variant x seed), resolved and checked.
    An empty ``variants`` (or ``operations`` or ``seeds``) list gives no runs: the study is off."""
    cfg = load_config(section)
    shared = Hyper(**{k: getattr(cfg, k) for k in Hyper.model_fields}).to_dict()
    specs = []
    for operation in cfg.operations:
        for variant in cfg.variants:
            extra = cfg.overrides[variant].to_dict() if variant in cfg.overrides else {}
            extra = {k: v for k, v in extra.items() if v is not None}
            for seed in cfg.seeds:
                specs.append(check_spec(RunSpec(variant=variant, operation=operation, seed=seed,
                                                **{**shared, **extra})))
    return specs


def parse_spec(data: dict) -> RunSpec:
    return check_spec(validated(RunSpec, data, "spec"))


def run_subdir(spec: RunSpec) -> str:
    """Relative folder of a run inside the study folder (the Snakemake rule's pattern)."""
    return GROK_RUN_DIR.format(operation=spec.operation, variant=spec.variant, seed=spec.seed)

