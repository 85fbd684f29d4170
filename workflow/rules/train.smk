# One training job per run: (study, variant, depth, learning rate, seed).
# A diverging run is data: it stops early, writes its summary and the job succeeds.
# A run with train.processes = N is launched with torchrun (data parallel, one node): the job asks
# for N GPUs on one node (resources gpu and nodes; on SLURM: sbatch --gpus=N --nodes=1), and its
# threads are shared out among the N processes.
# Exit code 75 means: preempted (SIGTERM), checkpoint written; a retry resumes it.


rule train:
    input:
        f"{SHARDS}/meta.json",
    output:
        f"{RES}/{RUN_DIR}/summary.json",
    log:
        f"{RES}/logs/{RUN_DIR}.log",
    benchmark:
        f"{RES}/benchmarks/{RUN_DIR}.tsv"
    # before the grokking runs (priorities: data.smk)
    priority: 1
    conda:
        "../envs/stabilab.yaml"
    threads: 1
    resources:
        gpu=processes,
        nodes=1,
    params:
        run=resolved_run,
        out=lambda wildcards, output: os.path.dirname(output[0]),
        launcher=launcher,
        runtime=RUNTIME_FILE,
        threads=threads_per_process,
    shell:
        "{params.launcher} train --run {params.run:q} --out {params.out} --runtime {params.runtime} --threads {params.threads} > {log} 2>&1"
