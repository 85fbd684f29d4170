"""Grokking study of the StableMax paper (arXiv 2501.04697, METHODS.md §2–§4).

A [200, 200] ReLU MLP without biases learns (a + b) mod p or (a * b) mod p from one-hot inputs,
trained full-batch with AdamW and no weight decay, in the variants of `config.VARIANT_TABLE`.
One run = (variant, operation, seed) -> ``metrics.jsonl`` + ``summary.json`` in its own folder;
``report`` turns a set of run folders into the study's tables and figures.

Modules: `config` (variants, config section, run specs; no torch), `data`, `model`, `train`,
`report` (tables), `figures`, `cli` (the grok-* subcommands).
"""
