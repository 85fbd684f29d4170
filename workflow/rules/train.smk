# One training job per run: (study, variant, depth, learning rate, seed).
# A diverging run is data: it stops early, writes its summary and the job succeeds.


rule train:
    input:
        f"{SHARDS}/meta.json",
    output:
        f"{RES}/runs/{{study}}/{{variant}}/L{{depth}}_lr{{lr}}_s{{seed}}/summary.json",
    params:
        run=resolved_run,
        out=lambda wildcards, output: os.path.dirname(output[0]),
    threads: 1
    log:
        f"{RES}/logs/runs/{{study}}/{{variant}}/L{{depth}}_lr{{lr}}_s{{seed}}.log",
    benchmark:
        f"{RES}/benchmarks/runs/{{study}}/{{variant}}/L{{depth}}_lr{{lr}}_s{{seed}}.tsv"
    shell:
        "stabilab train --run {params.run:q} --out {params.out} --threads {threads} > {log} 2>&1"
