# Data: corpus source -> train/validation split -> tokenizer -> token shards; or, for pre-tokenized
# shards (data.source: token_shards), one import into the pipeline's own checksummed shards.
# Priorities (Snakemake starts the highest of the jobs ready): data preparation (2) first, as it
# gates every training job; then training (1); the grokking runs (0) fill the cores left free,
# mostly while tables and figures (2) draw the end of the job (docs/performance.md).

if config["data"].get("source") == "token_shards":

    rule import_shards:
        input:
            SOURCE_FILES,
        output:
            meta=f"{SHARDS}/meta.json",
            tokenizer=f"{RES}/{TOKENIZER}",
        log:
            f"{RES}/logs/import_shards.log",
        benchmark:
            f"{RES}/benchmarks/import_shards.tsv"
        priority: 2
        conda:
            "../envs/stabilab.yaml"
        params:
            spec=json.dumps(config["data"]["token_shards"], sort_keys=True),
            out=lambda wildcards, output: os.path.dirname(output.meta),
        shell:
            "stabilab import-shards --spec {params.spec:q} --out {params.out} "
            "--tokenizer-out {output.tokenizer} > {log} 2>&1"

else:

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
            corpus=rules.corpus.output.train,
            files=TOKENIZER_FILES,  # an hf tokenizer's local tokenizer.json
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
            corpus=lambda wildcards, input: os.path.dirname(input.corpus),
            hf=hf_tokenizer_args(config["tokenizer"]),
        shell:
            "stabilab tokenizer --kind {params.kind} --vocab-size {params.vocab} "
            "--corpus {params.corpus}{params.hf} --out {output} > {log} 2>&1"

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
