"""Where things live: every output path pattern of the pipeline, written once.

Patterns use `str.format` fields, so that Snakemake rules (which fill them with wildcards) and
the package (which fills them with values) share them.
"""

from __future__ import annotations

from pathlib import Path

RESULTS = "results/{name}"
FIGURES = "figures/{name}"
SHARDS = "data/shards"  # under RESULTS
TOKENIZER = "data/tokenizer.json"  # under RESULTS, beside SHARDS: the tokenizer the shards were made with
# one language-model run, under RESULTS; its name (trackers' run names) is the folder below runs/
RUN_NAME = "{study}/{variant}/L{depth}_lr{lr}_s{seed}"
RUN_DIR = "runs/" + RUN_NAME
# one grokking run, under RESULTS/grokking
GROK_RUN_DIR = "{operation}/{variant}/s{seed}"


def tokenizer_beside(shards: str | Path) -> str:
    """The tokenizer file of a shards folder (TOKENIZER lies beside SHARDS)."""
    return str(Path(shards).parent / Path(TOKENIZER).name)


def format_lr(lr: float) -> str:
    """Learning rate as it appears in run folder names: 0.003 -> '0.003', 3e-05 -> '3e-05'."""
    return f"{lr:g}"


def run_name(study: str, variant: str, depth: int, lr: float | str, seed: int) -> str:
    lr = lr if isinstance(lr, str) else format_lr(lr)
    return RUN_NAME.format(study=study, variant=variant, depth=depth, lr=lr, seed=seed)


def run_dir(study: str, variant: str, depth: int, lr: float | str, seed: int) -> str:
    return "runs/" + run_name(study, variant, depth, lr, seed)
