# Grokking study of the StableMax paper (arXiv 2501.04697): one job per variant x operation x seed,
# then one report job (tables + figures). Included after common.smk (NAME, RES, FIG).
# An empty grokking.variants list switches the study off: grokking_targets() is then empty.
import json
import os
import sys

from stabilab.errors import UserError
from stabilab.grokking import FIGURES, VARIANTS, run_specs, run_subdir

try:
    GROK_SPECS = {run_subdir(spec): spec for spec in run_specs(config.get("grokking"))}
except UserError as error:
    sys.exit(f"config error: {error}")

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


rule grok_train:
    output:
        f"{GROK}/{{operation}}/{{variant}}/s{{seed}}/summary.json",
    params:
        spec=grok_spec,
        out=lambda wildcards, output: os.path.dirname(output[0]),
    wildcard_constraints:
        operation="add|mul",
        variant="|".join(VARIANTS),
        seed=r"\d+",
    threads: 1
    log:
        f"{GROK}/logs/{{operation}}/{{variant}}/s{{seed}}.log",
    benchmark:
        f"{GROK}/benchmarks/{{operation}}/{{variant}}/s{{seed}}.tsv"
    shell:
        "stabilab grok-train --spec {params.spec:q} --out {params.out:q} --threads {threads} > {log:q} 2>&1"


rule grok_report:
    input:
        grok_summaries(),
    output:
        steps=f"{GROK}/tables/grokking_steps.csv",
        summary=f"{GROK}/tables/grokking_summary.csv",
        accuracy=report(
            f"{GROK_FIG}/grokking_test_accuracy.png",
            caption="../report/grokking_test_accuracy.rst",
            category="Grokking",
        ),
        collapse=report(
            f"{GROK_FIG}/grokking_collapse.png",
            caption="../report/grokking_collapse.rst",
            category="Grokking",
        ),
        weight_norm=report(
            f"{GROK_FIG}/grokking_weight_norm.png",
            caption="../report/grokking_weight_norm.rst",
            category="Grokking",
        ),
        pdfs=[f"{GROK_FIG}/{name}.pdf" for name in GROK_FIGURES],
    params:
        runs=lambda wildcards, input: " ".join(f"'{os.path.dirname(path)}'" for path in input),
        tables=f"{GROK}/tables",
        figures=GROK_FIG,
    log:
        f"{GROK}/logs/report.log",
    benchmark:
        f"{GROK}/benchmarks/report.tsv"
    shell:
        "stabilab grok-report --runs {params.runs} --tables {params.tables:q} --figures {params.figures:q} > {log:q} 2>&1"
