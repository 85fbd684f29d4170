# Data: corpus source -> train/validation split -> tokenizer -> token shards.


rule corpus:
    conda:
        "../envs/stabilab.yaml"
    output:
        train=f"{RES}/data/corpus/train.jsonl.gz",
        val=f"{RES}/data/corpus/val.jsonl.gz",
    params:
        spec=json.dumps(config["data"], sort_keys=True),
        out=lambda wildcards, output: os.path.dirname(output.train),
    log:
        f"{RES}/logs/corpus.log",
    benchmark:
        f"{RES}/benchmarks/corpus.tsv"
    shell:
        "stabilab corpus --spec {params.spec:q} --out {params.out} > {log} 2>&1"


rule tokenizer:
    conda:
        "../envs/stabilab.yaml"
    input:
        rules.corpus.output.train,
    output:
        f"{RES}/data/tokenizer.json",
    params:
        kind=config["tokenizer"].get("kind", "bpe"),
        vocab=config["tokenizer"].get("vocab_size", 2048),
        corpus=lambda wildcards, input: os.path.dirname(input[0]),
    log:
        f"{RES}/logs/tokenizer.log",
    benchmark:
        f"{RES}/benchmarks/tokenizer.tsv"
    shell:
        "stabilab tokenizer --kind {params.kind} --vocab-size {params.vocab} "
        "--corpus {params.corpus} --out {output} > {log} 2>&1"


rule tokenize:
    conda:
        "../envs/stabilab.yaml"
    input:
        tokenizer=rules.tokenizer.output,
        train=rules.corpus.output.train,
        val=rules.corpus.output.val,
    output:
        f"{SHARDS}/meta.json",
    params:
        corpus=lambda wildcards, input: os.path.dirname(input.train),
        out=lambda wildcards, output: os.path.dirname(output[0]),
    log:
        f"{RES}/logs/tokenize.log",
    benchmark:
        f"{RES}/benchmarks/tokenize.tsv"
    shell:
        "stabilab tokenize --tokenizer {input.tokenizer} --corpus {params.corpus} --out {params.out} > {log} 2>&1"
