# Figures (PNG and PDF) from the tables alone: re-drawing them never retrains.


rule figures:
    input:
        rules.tables.output.runs,
        rules.tables.output.steps,
    output:
        [
            report(f"{FIG}/{png}", caption=f"../report/{caption}", category=category)
            for png, (caption, category) in expected_figures(config["studies"]).items()
        ],
        [
            f"{FIG}/{png.removesuffix('.png')}.pdf"
            for png in expected_figures(config["studies"])
        ],
    log:
        f"{RES}/logs/figures.log",
    benchmark:
        f"{RES}/benchmarks/figures.tsv"
    priority: 2
    conda:
        "../envs/stabilab.yaml"
    params:
        studies=json.dumps(config["studies"], sort_keys=True),
        tables=lambda wildcards, input: os.path.dirname(input[0]),
        out=figures_folder,
    shell:
        "stabilab figures --tables {params.tables} --studies {params.studies:q} --out {params.out} > {log} 2>&1"
