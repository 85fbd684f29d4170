# Helpers shared by the rules: config validation, the run grid, run folders.
import json
import os
import sys

from stabilab.errors import UserError
from stabilab.experiment import DEFAULTS, check_runs, run_config, validate
from stabilab.figures import expected_figures
from stabilab.grokking import FIGURES, VARIANTS, run_specs, run_subdir

try:
    validate(config, workflow.source_path("../schemas/config.schema.yaml"))
    for section, default in DEFAULTS.items():
        config.setdefault(section, default)
    NAME = config["name"]
    RES = f"results/{NAME}"
    FIG = f"figures/{NAME}"
    SHARDS = f"{RES}/data/shards"
    RUNS = check_runs(config, SHARDS)
    GROK_SPECS = {run_subdir(spec): spec for spec in run_specs(config.get("grokking"))}
except UserError as error:
    sys.exit(f"config error: {error}")

RUN_BY_PATH = {run.path: run for run in RUNS}


wildcard_constraints:
    study=r"[A-Za-z0-9_.-]+",
    variant=r"[A-Za-z0-9_.+-]+",
    depth=r"\d+",
    lr=r"[0-9.e+-]+",
    seed=r"\d+",


def run_path(wildcards):
    return f"runs/{wildcards.study}/{wildcards.variant}/L{wildcards.depth}_lr{wildcards.lr}_s{wildcards.seed}"


def resolved_run(wildcards):
    """The run's resolved config as JSON (a param: Snakemake re-runs a run whose config changed)."""
    path = run_path(wildcards)
    if path not in RUN_BY_PATH:
        raise ValueError(f"{path} is not a run of the configured grid")
    return json.dumps(run_config(config, RUN_BY_PATH[path], SHARDS), sort_keys=True)


def launcher(wildcards):
    """`stabilab`, or torchrun over it for a data-parallel run."""
    processes = json.loads(resolved_run(wildcards))["train"].get("processes", 1)
    if processes == 1:
        return "stabilab"
    return f"torchrun --standalone --nproc_per_node {processes} -m stabilab.cli --"  # -- : torchrun would take --run


def run_summaries():
    return [f"{RES}/{run.path}/summary.json" for run in RUNS]


def lm_targets():
    """Tables and figures of the language-model studies (none when `studies` is empty)."""
    if not RUNS:
        return []
    return [f"{RES}/tables/runs.csv"] + [f"{FIG}/{name}" for name in expected_figures(config["studies"])]


def figures_folder(wildcards, output):
    """FIG, derived from the outputs (each is FIG/<study>/<name>.png or .pdf)."""
    return os.path.commonpath([os.path.dirname(os.path.dirname(path)) for path in output])


# ----------------------------------------------------------------------------- grokking study
GROK = f"{RES}/grokking"
GROK_FIG = f"{FIG}/grokking"
GROK_FIGURES = list(FIGURES)  # file stems, each written as .png and .pdf


def grok_spec(wildcards):
    """The run's resolved spec as JSON (a param: Snakemake re-runs a run whose spec changed)."""
    key = f"{wildcards.operation}/{wildcards.variant}/s{wildcards.seed}"
    if key not in GROK_SPECS:
        raise ValueError(f"grokking run {key} is not in the configured grid")
    return json.dumps(GROK_SPECS[key].to_dict(), sort_keys=True)


def grok_summaries():
    return [f"{GROK}/{key}/summary.json" for key in GROK_SPECS]


def grokking_targets():
    """Final outputs of the study, for `rule all` (empty when the study is disabled)."""
    if not GROK_SPECS:
        return []
    return [f"{GROK}/tables/grokking_steps.csv", f"{GROK}/tables/grokking_summary.csv"] + [
        f"{GROK_FIG}/{name}.{ext}" for name in GROK_FIGURES for ext in ("png", "pdf")
    ]


