# Grokking study of the StableMax paper (arXiv 2501.04697): one job per variant x operation x seed,
# then one report job (tables + figures). Helpers (GROK_SPECS, grokking_targets) are in common.smk.


rule grok_train:
    output:
        f"{GROK}/{GROK_RUN_DIR}/summary.json",
    log:
        f"{GROK}/logs/{GROK_RUN_DIR}.log",
    benchmark:
        f"{GROK}/benchmarks/{GROK_RUN_DIR}.tsv"
    wildcard_constraints:
        operation="add|mul",
        variant="|".join(GROK_VARIANTS),
        seed=r"\d+",
    conda:
        "../envs/stabilab.yaml"
    threads: 1
    params:
        spec=grok_spec,
        out=lambda wildcards, output: os.path.dirname(output[0]),
    shell:
        "stabilab grok-train --spec {params.spec:q} --out {params.out:q} --threads {threads} > {log:q} 2>&1"


rule grok_report:
    input:
        grok_summaries(),
    output:
        steps=f"{GROK}/tables/grokking_steps.csv",
        summary=f"{GROK}/tables/grokking_summary.csv",
        claim=report(
            f"{GROK_FIG}/grokking_claim.png",
            caption="../report/grokking_claim.rst",
            category="Grokking",
        ),
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
    log:
        f"{GROK}/logs/report.log",
    benchmark:
        f"{GROK}/benchmarks/report.tsv"
    conda:
        "../envs/stabilab.yaml"
    params:
        runs=lambda wildcards, input: " ".join(
            f"'{os.path.dirname(path)}'" for path in input
        ),
        tables=lambda wildcards, output: os.path.dirname(output.steps),
        figures=lambda wildcards, output: os.path.dirname(output.accuracy),
        smoke_test="--smoke-test" if config.get("smoke_test") else "",
    shell:
        "stabilab grok-report --runs {params.runs} --tables {params.tables:q} --figures {params.figures:q} "
        "{params.smoke_test} > {log:q} 2>&1"
