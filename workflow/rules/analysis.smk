# Metric extraction: every run's JSONL and summary into tidy CSV tables.


rule tables:
    input:
        run_summaries(),
    output:
        runs=f"{RES}/tables/runs.csv",
        steps=f"{RES}/tables/steps.csv",
        headline=report(
            f"{RES}/tables/headline.csv",
            caption="../report/headline.rst",
            category="0. Headline numbers",
        ),
        # the same as HTML: shown in the report, and on its front page (workflow/report/workflow.rst)
        headline_html=report(
            f"{RES}/tables/headline.html",
            caption="../report/headline.rst",
            category="0. Headline numbers",
        ),
        summaries=[
            report(
                f"{RES}/tables/summary_{study}.csv",
                caption="../report/summary_table.rst",
                category="1. Summary tables",
            )
            for study in config["studies"]
        ],
    log:
        f"{RES}/logs/tables.log",
    benchmark:
        f"{RES}/benchmarks/tables.tsv"
    # priorities: data.smk
    priority: 2
    conda:
        "../envs/stabilab.yaml"
    params:
        studies=json.dumps(config["studies"], sort_keys=True),
        out=lambda wildcards, output: os.path.dirname(output.runs),
    shell:
        "stabilab tables {input:q} --studies {params.studies:q} --out {params.out} > {log} 2>&1"
