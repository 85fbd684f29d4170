# Helpers shared by the rules: the resolved config, the run grid, run folders. Planning imports
# only the package's light modules (no torch, no matplotlib).
import json
import os
import sys
from pathlib import Path

from stabilab.errors import UserError
from stabilab.experiment import (
    grokking_runs,
    prepare,
    retrain_warning,
    run_config,
    runs,
    shards_dir,
    source_files,
    tokenizer_files,
    write_runtime,
)
from stabilab.grokking.config import VARIANTS as GROK_VARIANTS
from stabilab.grokking.config import run_subdir
from stabilab.grokking.figures import FIGURES as GROK_FIGURES
from stabilab.layout import FIGURES, GROK_RUN_DIR, RESULTS, RUN_DIR, TOKENIZER
from stabilab.shards import check_shards
from stabilab.studies import expected_figures

# `base:` includes resolve relative to the config file's folder; `--config a.b=value` overrides.
CONFIG_DIR = (
    Path(workflow.overwrite_configfiles[-1]).parent
    if workflow.overwrite_configfiles
    else Path(".")
)
SET = config.get("set")  # `--config set="..."`, which prepare() applies
try:
    _resolved = prepare(config, CONFIG_DIR)
    config.clear()
    config.update(_resolved)
    NAME = config["name"]
    RES = RESULTS.format(name=NAME)
    FIG = FIGURES.format(name=NAME)
    SHARDS = shards_dir(config)
    RUNS = runs(config)
    GROK_SPECS = {run_subdir(spec): spec for spec in grokking_runs(config)}
    if os.path.exists(f"{SHARDS}/meta.json"):
        # an edited or damaged meta.json stops here, before finished runs are re-planned (and their
        # outputs removed); the config's tokenizer is not compared: a changed one re-tokenizes
        check_shards(SHARDS, None, 0, f"{RES}/{TOKENIZER}", verify=False)
except UserError as error:
    sys.exit(f"config error: {error}")
try:
    # inputs of the corpus (or import_shards) and tokenizer rules; a missing one (a preset's corpus,
    # token shards or tokenizer file not yet fetched) stops here, before anything is written or run
    SOURCE_FILES = source_files(config)
    TOKENIZER_FILES = tokenizer_files(config)
except UserError as error:
    sys.exit(f"error: {error}")

RUN_BY_PATH = {run.path: run for run in RUNS}
if SET and (_warning := retrain_warning(config, RUNS, SHARDS, SET)):
    print(_warning, file=sys.stderr)  # before Snakemake retrains them
# How and where runs execute (device, compile, sinks): written to a file whose *path* is the
# train rule's param, so changing the settings never re-runs a finished run.
RUNTIME_FILE = write_runtime(config, f"{RES}/runtime.json")


wildcard_constraints:
    study=r"[A-Za-z0-9_.-]+",
    variant=r"[A-Za-z0-9_.+-]+",
    depth=r"\d+",
    lr=r"[0-9.e+-]+",
    seed=r"\d+",


def resolved_run(wildcards):
    """The run's resolved config as JSON (a param: Snakemake re-runs a run whose config changed)."""
    path = RUN_DIR.format(**wildcards)
    if path not in RUN_BY_PATH:
        sys.exit(
            f"error: {RES}/{path} is not a run of the configured grid (see `stabilab targets`)"
        )
    return json.dumps(run_config(config, RUN_BY_PATH[path], SHARDS), sort_keys=True)


def hf_tokenizer_args(tok):
    """The tokenizer rule's options for an `hf` tokenizer (name, file, EOS token), quoted."""
    from shlex import quote

    flags = {"name": "--name", "file": "--file", "eos_token": "--eos-token"}
    return "".join(
        f" {flag} {quote(str(tok[key]))}" for key, flag in flags.items() if tok.get(key)
    )


def processes(wildcards):
    """The data-parallel processes of a run (train.processes): its GPUs, one node."""
    return json.loads(resolved_run(wildcards))["train"].get("processes", 1)


def launcher(wildcards):
    """`stabilab`, or torchrun over it for a data-parallel run (one node, one process per GPU)."""
    n = processes(wildcards)
    if n == 1:
        return "stabilab"
    return f"torchrun --standalone --nproc_per_node {n} -m stabilab.cli --"  # -- : torchrun would take --run


def threads_per_process(wildcards, threads):
    """CPU threads of each of a run's processes: the job's threads shared out, at least one."""
    return max(1, threads // processes(wildcards))


def run_summaries():
    return [f"{RES}/{run.path}/summary.json" for run in RUNS]


def lm_targets():
    """Tables and figures of the language-model studies (none when `studies` is empty)."""
    if not RUNS:
        return []
    return [f"{RES}/tables/runs.csv"] + [
        f"{FIG}/{name}" for name in expected_figures(config["studies"])
    ]


def figures_folder(wildcards, output):
    """FIG, derived from the outputs (each is FIG/<study>/<name>.png or .pdf)."""
    return os.path.commonpath(
        [os.path.dirname(os.path.dirname(path)) for path in output]
    )


# ----------------------------------------------------------------------------- grokking study
GROK = f"{RES}/grokking"
GROK_FIG = f"{FIG}/grokking"


def grok_spec(wildcards):
    """The run's resolved spec as JSON (a param: Snakemake re-runs a run whose spec changed)."""
    key = GROK_RUN_DIR.format(**wildcards)
    if key not in GROK_SPECS:
        sys.exit(f"error: grokking run {key} is not in the configured grid")
    return json.dumps(GROK_SPECS[key].to_dict(), sort_keys=True)


def grok_summaries():
    return [f"{GROK}/{key}/summary.json" for key in GROK_SPECS]


def grokking_targets():
    """Final outputs of the study, for `rule all` (empty when the study is disabled)."""
    if not GROK_SPECS:
        return []
    return [
        f"{GROK}/tables/grokking_steps.csv",
        f"{GROK}/tables/grokking_summary.csv",
    ] + [f"{GROK_FIG}/{name}.{ext}" for name in GROK_FIGURES for ext in ("png", "pdf")]
