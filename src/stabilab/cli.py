"""Command-line entry points; the Snakemake rules call these and nothing else.

Bad input (config, data, tokenizer) ends with one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

from . import grokking
from .errors import UserError


def _json_arg(text: str) -> dict:
    path = Path(text)
    if not text.lstrip().startswith("{") and path.exists():
        text = path.read_text()
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"--spec/--run is not valid JSON: {e.msg} at position {e.pos}") from None


def cmd_corpus(args) -> None:
    from .corpus import write_split

    counts = write_split(_json_arg(args.spec), args.out)
    print(f"corpus: {counts['train']} train and {counts['val']} validation documents in {args.out}")


def cmd_tokenizer(args) -> None:
    from .corpus import read_split
    from .tokenizer import build

    tok = build(args.kind, args.vocab_size, read_split(Path(args.corpus) / "train.jsonl.gz"))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    tok.save(args.out)
    print(f"tokenizer: {tok.kind}, vocab {tok.vocab_size}, sha256 {tok.sha256[:12]} -> {args.out}")


def cmd_tokenize(args) -> None:
    from .shards import write_shards
    from .tokenizer import load

    tok = load(args.tokenizer)
    corpus = Path(args.corpus)
    meta = write_shards(tok, {s: corpus / f"{s}.jsonl.gz" for s in ("train", "val")}, args.out)
    print(f"shards: {meta['tokens']['train']:,} train / {meta['tokens']['val']:,} val tokens ({meta['dtype']}) -> {args.out}")


def cmd_train(args) -> None:
    import torch

    from .config import load_run_config
    from .train import train

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_run_config(_json_arg(args.run))
    summary = train(cfg, args.out)
    if not summary:  # a data-parallel worker other than rank 0
        return
    state = f"DIVERGED at step {summary['diverged_step']}" if summary["diverged"] else \
        f"val loss {summary['final_val_loss']:.4f}"
    print(f"done: {cfg.study}/{cfg.variant} L{cfg.model.n_layer} lr {cfg.optim.lr:g} seed {cfg.seed}: {state}")


def cmd_tables(args) -> None:
    from .tables import write_tables

    studies = yaml.safe_load(Path(args.config).read_text())["studies"] if args.config else None
    written = write_tables(args.summaries, args.out, studies=_json_arg(args.studies) if args.studies else studies)
    print(f"tables: {', '.join(sorted(written))} -> {args.out}")


def cmd_figures(args) -> None:
    from .figures import draw_figures

    studies = _json_arg(args.studies) if args.studies else None
    written = draw_figures(args.tables, args.out, studies=studies)
    print(f"figures: {len(written)} files -> {args.out}")


def cmd_check_config(args) -> None:
    from .experiment import load_experiment

    exp = load_experiment(args.config)
    print(f"{args.config}: ok (experiment '{exp['name']}')")


def cmd_targets(args) -> None:
    from .experiment import load_experiment, runs

    exp = load_experiment(args.config)
    chosen = [r for r in runs(exp) if (not args.study or r.study in args.study)
              and (not args.variant or r.variant in args.variant)]
    if not chosen:
        raise UserError(f"no run matches study {args.study or 'any'} and variant {args.variant or 'any'}")
    print(" ".join(f"results/{exp['name']}/{r.path}/summary.json" for r in chosen))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stabilab", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("corpus", help="read the corpus source and write the train/validation split")
    p.add_argument("--spec", required=True, help="the experiment's `data` section as JSON (or a JSON file)")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_corpus)

    p = sub.add_parser("tokenizer", help="train (bpe) or fetch (gpt2) the tokenizer")
    p.add_argument("--kind", choices=["bpe", "gpt2"], default="bpe")
    p.add_argument("--vocab-size", type=int, default=2048)
    p.add_argument("--corpus", required=True, help="folder with train.jsonl.gz")
    p.add_argument("--out", required=True, help="tokenizer JSON file to write")
    p.set_defaults(func=cmd_tokenizer)

    p = sub.add_parser("tokenize", help="write token shards (numpy memmaps + meta.json)")
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--corpus", required=True)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_tokenize)

    p = sub.add_parser("train", help="train one run from a resolved run config")
    p.add_argument("--run", required=True, help="resolved run config as JSON (or a JSON file, e.g. a run's config.json)")
    p.add_argument("--out", required=True, help="run folder (resumes from its checkpoint if present)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("tables", help="collect runs into tidy CSV tables")
    p.add_argument("summaries", nargs="+", help="summary.json files of the runs")
    p.add_argument("--out", required=True)
    p.add_argument("--studies", help="the experiment's `studies` section as JSON")
    p.add_argument("--config", help="experiment YAML to read `studies` from (instead of --studies)")
    p.set_defaults(func=cmd_tables)

    p = sub.add_parser("figures", help="draw the figures from the tables (no training needed)")
    p.add_argument("--tables", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--studies", help="the experiment's `studies` section as JSON (default: from the tables)")
    p.set_defaults(func=cmd_figures)

    p = sub.add_parser("targets", help="print the summary.json targets of some runs, for snakemake")
    p.add_argument("--config", default="config.yaml")
    p.add_argument("--study", nargs="*", help="only these studies")
    p.add_argument("--variant", nargs="*", help="only these variants")
    p.set_defaults(func=cmd_targets)

    p = sub.add_parser("check-config", help="validate an experiment config file")
    p.add_argument("config")
    p.set_defaults(func=cmd_check_config)

    grokking.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
