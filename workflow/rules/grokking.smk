# Grokking study of the StableMax paper (arXiv 2501.04697): one job per variant x operation x seed,
# then one report job (tables + figures). Helpers (GROK_SPECS, grokking_targets) are in common.smk.


rule grok_train:
    conda:
        "../envs/stabilab.yaml"
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
    conda:
        "../envs/stabilab.yaml"
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
        tables=lambda wildcards, output: os.path.dirname(output.steps),
        figures=lambda wildcards, output: os.path.dirname(output.accuracy),
    log:
        f"{GROK}/logs/report.log",
    benchmark:
        f"{GROK}/benchmarks/report.tsv"
    shell:
        "stabilab grok-report --runs {params.runs} --tables {params.tables:q} --figures {params.figures:q} > {log:q} 2>&1"
