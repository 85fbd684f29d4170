# Data: corpus source -> train/validation split -> tokenizer -> token shards.


rule corpus:
    input:
        SOURCE_FILES,
    output:
        train=f"{RES}/data/corpus/train.jsonl.gz",
        val=f"{RES}/data/corpus/val.jsonl.gz",
    log:
        f"{RES}/logs/corpus.log",
    benchmark:
        f"{RES}/benchmarks/corpus.tsv"
    # Priorities (Snakemake starts the highest of the jobs ready): data preparation (2) first, as it
    # gates every training job; then training (1); the grokking runs (0) fill the cores left free,
    # mostly while tables and figures (2) draw the end of the job (docs/performance.md)
    priority: 2
    conda:
        "../envs/stabilab.yaml"
    params:
        spec=json.dumps(config["data"], sort_keys=True),
        out=lambda wildcards, output: os.path.dirname(output.train),
    shell:
        "stabilab corpus --spec {params.spec:q} --out {params.out} > {log} 2>&1"


rule tokenizer:
    input:
        rules.corpus.output.train,
    output:
        f"{RES}/{TOKENIZER}",
    log:
        f"{RES}/logs/tokenizer.log",
    benchmark:
        f"{RES}/benchmarks/tokenizer.tsv"
    priority: 2
    conda:
        "../envs/stabilab.yaml"
    params:
        kind=config["tokenizer"].get("kind", "bpe"),
        vocab=config["tokenizer"].get("vocab_size", 2048),
        corpus=lambda wildcards, input: os.path.dirname(input[0]),
    shell:
        "stabilab tokenizer --kind {params.kind} --vocab-size {params.vocab} "
        "--corpus {params.corpus} --out {output} > {log} 2>&1"


rule tokenize:
    input:
        tokenizer=rules.tokenizer.output,
        train=rules.corpus.output.train,
        val=rules.corpus.output.val,
    output:
        f"{SHARDS}/meta.json",
    log:
        f"{RES}/logs/tokenize.log",
    benchmark:
        f"{RES}/benchmarks/tokenize.tsv"
    priority: 2
    conda:
        "../envs/stabilab.yaml"
    params:
        corpus=lambda wildcards, input: os.path.dirname(input.train),
        out=lambda wildcards, output: os.path.dirname(output[0]),
    shell:
        "stabilab tokenize --tokenizer {input.tokenizer} --corpus {params.corpus} --out {params.out} > {log} 2>&1"
