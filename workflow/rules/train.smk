# One training job per run: (study, variant, depth, learning rate, seed).
# A diverging run is data: it stops early, writes its summary and the job succeeds.
# A run with train.processes > 1 is launched with torchrun (data parallel, one node).
# Exit code 75 means: preempted (SIGTERM), checkpoint written; a retry resumes it.


rule train:
    conda:
        "../envs/stabilab.yaml"
    input:
        f"{SHARDS}/meta.json",
    output:
        f"{RES}/runs/{{study}}/{{variant}}/L{{depth}}_lr{{lr}}_s{{seed}}/summary.json",
    params:
        run=resolved_run,
        out=lambda wildcards, output: os.path.dirname(output[0]),
        launcher=launcher,
    threads: 1
    log:
        f"{RES}/logs/runs/{{study}}/{{variant}}/L{{depth}}_lr{{lr}}_s{{seed}}.log",
    benchmark:
        f"{RES}/benchmarks/runs/{{study}}/{{variant}}/L{{depth}}_lr{{lr}}_s{{seed}}.tsv"
    shell:
        "{params.launcher} train --run {params.run:q} --out {params.out} --threads {threads} > {log} 2>&1"
