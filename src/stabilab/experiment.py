"""The experiment config (config.yaml): validation against the JSON schema and the run grid."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from .config import format_lr, load_run_config, resolve_run, variant_overlay
from .errors import UserError

SCHEMA = Path(__file__).resolve().parents[2] / "workflow" / "schemas" / "config.schema.yaml"
# Sections an experiment may leave out (e.g. a grokking-only config).
DEFAULTS = {"data": {"source": "embedded"}, "tokenizer": {"kind": "bpe", "vocab_size": 2048}, "studies": {}}


@dataclass(frozen=True)
class Run:
    study: str
    variant: str
    depth: int
    lr: float
    seed: int

    @property
    def path(self) -> str:
        """Run folder relative to the experiment's results folder."""
        return f"runs/{self.study}/{self.variant}/L{self.depth}_lr{format_lr(self.lr)}_s{self.seed}"


def _where(path) -> str:
    return ".".join(str(p) for p in path) or "<top level>"


def _message(error) -> str:
    where = _where(error.absolute_path)
    if error.validator == "additionalProperties":
        allowed = sorted(error.schema.get("properties", {}))
        extra = sorted(set(error.instance) - set(allowed))
        key = f"{where}.{extra[0]}" if error.absolute_path else extra[0]
        return f"unknown config key '{key}' (allowed: {', '.join(allowed)})"
    if error.validator == "enum":
        return f"bad value for config key '{where}': {error.instance!r} (allowed: {', '.join(map(repr, error.validator_value))})"
    if error.validator == "required":
        return f"missing config key in '{where}': {error.message}"
    return f"bad value for config key '{where}': {error.message}"


def validate(config: dict, schema_path: str | Path = SCHEMA) -> None:
    """Check `config` against the schema; raise UserError with one line naming the key."""
    import jsonschema

    schema = yaml.safe_load(Path(schema_path).read_text())
    validator = jsonschema.Draft202012Validator(schema)
    error = jsonschema.exceptions.best_match(validator.iter_errors(config))
    if error is not None:
        raise UserError(_message(error))
    for name, study in config.get("studies", {}).items():
        for variant in study["variants"]:
            variant_overlay(variant, config.get("variants", {}))  # unknown names, conflicting combinations


def runs(config: dict) -> list[Run]:
    """Every run of every study: variants x depths x learning rates x seeds."""
    out = []
    for study, spec in config.get("studies", {}).items():
        for variant in spec["variants"]:
            for depth in spec["depths"]:
                for lr in spec["lrs"]:
                    for seed in spec.get("seeds", [0]):
                        out.append(Run(study, variant, int(depth), float(lr), int(seed)))
    return out


def run_config(config: dict, run: Run, shards: str) -> dict:
    return resolve_run(config, run.study, run.variant, run.depth, run.lr, run.seed, shards)


def check_runs(config: dict, shards: str = "") -> list[Run]:
    """Validate every resolved run config up front, so a bad combination fails before any training."""
    grid = runs(config)
    for run in grid:
        try:
            load_run_config(run_config(config, run, shards))
        except UserError as e:
            raise UserError(f"study '{run.study}', variant '{run.variant}': {e}") from None
    return grid


def load_experiment(path: str | Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise UserError(f"config file not found: {path}")
    try:
        config = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    validate(config)
    check_runs(config)
    return config
