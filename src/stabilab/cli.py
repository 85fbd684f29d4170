"""Command-line entry points; the Snakemake rules call these and nothing else.

One convention for every subcommand: inputs are named options (`--run`, `--spec`, `--tables`,
...), outputs `--out`; a JSON argument is inline JSON or a JSON file; config overrides are
trailing `key.path=value` words. Bad input (config, data, tokenizer) ends with one line on
stderr and exit code 2. Heavy libraries (torch, pandas, matplotlib) are imported by the
subcommand that needs them, so `stabilab --help` answers at once.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import os
import sys
import threading
from pathlib import Path

from . import __version__
from .errors import UserError
from .io import read_json_arg

# CUDA errors of a busy GPU, not of the run: the run exits as preempted, for a retry
TRANSIENT_DEVICE_ERRORS = ("busy or unavailable", "out of memory")


def cmd_corpus(args) -> None:
    from .corpus import write_split

    counts = write_split(read_json_arg(args.spec, "--spec"), args.out)
    print(f"corpus: {counts['train']} train and {counts['val']} validation documents in {args.out}")


def cmd_tokenizer(args) -> None:
    from .corpus import read_split
    from .tokenizer import build

    if args.kind == "bpe" and not args.corpus:
        raise UserError("stabilab tokenizer --kind bpe needs --corpus (the folder with train.jsonl.gz)")
    texts = read_split(Path(args.corpus) / "train.jsonl.gz") if args.kind == "bpe" else iter(())
    tok = build(args.kind, args.vocab_size, texts, name=args.name, file=args.file, eos=args.eos_token)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    tok.save(args.out)
    print(f"tokenizer: {tok.kind}, vocab {tok.vocab_size}, sha256 {tok.sha256[:12]} -> {args.out}")


def cmd_import_shards(args) -> None:
    from .token_import import import_shards
    from .tokenizer import gpt2

    spec = read_json_arg(args.spec, "--spec")
    tok = gpt2()
    meta = import_shards(spec, tok, args.out)
    Path(args.tokenizer_out).parent.mkdir(parents=True, exist_ok=True)
    tok.save(args.tokenizer_out)
    print(f"shards: {meta['tokens']['train']:,} train / {meta['tokens']['val']:,} val tokens imported from "
          f"{sum(len(v) for v in meta['imported']['files'].values())} modded-nanogpt files -> {args.out}")


def cmd_tokenize(args) -> None:
    from .shards import write_shards
    from .tokenizer import load

    tok = load(args.tokenizer)
    corpus = Path(args.corpus)
    meta = write_shards(tok, {s: corpus / f"{s}.jsonl.gz" for s in ("train", "val")}, args.out)
    print(f"shards: {meta['tokens']['train']:,} train / {meta['tokens']['val']:,} val tokens ({meta['dtype']}) "
          f"-> {args.out}")


def _add_runtime_flags(p) -> None:
    p.add_argument("--runtime", help="runtime config as JSON (the experiment's `runtime` section)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="runtime.device (default auto)")
    p.add_argument("--compile", choices=["auto", "on", "off"], help="runtime.compile (default auto: on CUDA)")
    p.add_argument("--threads", type=int, help="CPU threads for torch (0: torch's default)")
    p.add_argument("--trackers", metavar="NAMES", help="runtime.trackers, comma-separated: tensorboard,wandb,mlflow")
    p.add_argument("--keep-checkpoint", action="store_true", default=None, help="keep ckpt.pt when the run ends")


def runtime_from(args):
    """The runtime config: --runtime JSON, then the single flags over it."""
    from .config import RuntimeConfig, validated

    runtime = read_json_arg(args.runtime, "--runtime") if args.runtime else {}
    trackers = None if args.trackers is None else [n.strip() for n in args.trackers.split(",") if n.strip()]
    flags = {"device": args.device, "threads": args.threads, "trackers": trackers,
             "keep_checkpoint": args.keep_checkpoint,
             "compile": {"on": True, "off": False, "auto": "auto"}.get(args.compile)}
    runtime.update({k: v for k, v in flags.items() if v is not None})
    return validated(RuntimeConfig, runtime, "runtime")


@contextlib.contextmanager
def device_errors_as_retry(kept: str = "the last checkpoint is kept"):
    """A full or busy GPU ends the run as preempted (exit 75, one line), for the profiles' and
    bench_grid's retries; other CUDA faults keep their traceback (they are bugs to report)."""
    import torch

    from .train.trainer import PREEMPTED_EXIT_CODE

    retry = f"{kept}; exit {PREEMPTED_EXIT_CODE} for a retry"
    try:
        yield
    except torch.OutOfMemoryError:
        # on a GPU shared by several runs this is usually transient
        print(f"error: out of GPU memory (a GPU shared with other runs, or a batch too large); {retry}",
              file=sys.stderr)
        raise SystemExit(PREEMPTED_EXIT_CODE) from None
    except torch.AcceleratorError as e:
        if not any(s in str(e) for s in TRANSIENT_DEVICE_ERRORS):
            raise
        # a full GPU can refuse a new process's context (measured: 2 of 72 runs with 10-16 sharing an H200)
        print(f"error: the GPU refused the run ({str(e).splitlines()[0].removeprefix('CUDA error: ')}); {retry}",
              file=sys.stderr)
        raise SystemExit(PREEMPTED_EXIT_CODE) from None


def done_line(cfg, summary: dict) -> str:
    state = f"DIVERGED at step {summary['diverged_step']}" if summary["diverged"] else \
        f"val loss {summary['final_val_loss']:.4f}"
    return f"done: {cfg.study}/{cfg.variant} L{cfg.model.n_layer} lr {cfg.optim.lr:g} seed {cfg.seed}: {state}"


def cmd_train(args) -> None:
    from .config import deep_merge, load_run_config, parse_overrides

    run = deep_merge(read_json_arg(args.run, "--run"), parse_overrides(args.overrides))
    cfg = load_run_config(run)
    runtime = runtime_from(args)

    import torch

    from .train import train

    if runtime.threads:
        torch.set_num_threads(runtime.threads)
    with device_errors_as_retry():
        summary = train(cfg, args.out, runtime)
    if summary:  # empty on a data-parallel worker other than rank 0
        print(done_line(cfg, summary))


def cmd_train_stacked(args) -> None:
    from .config import load_run_config

    if len(args.runs) != len(args.outs):
        raise UserError(f"--runs names {len(args.runs)} runs but --outs {len(args.outs)} folders")
    cfgs = [load_run_config(read_json_arg(r, "--runs")) for r in args.runs]
    runtime = runtime_from(args)

    import torch

    from .train.stacked_runs import train_stacked

    if runtime.threads:
        torch.set_num_threads(runtime.threads)
    with device_errors_as_retry("finished members are kept, the others resume from their last checkpoints"):
        summaries = train_stacked(cfgs, args.outs, runtime)
    for cfg, summary in zip(cfgs, summaries):
        print(done_line(cfg, summary))


def cmd_eval(args) -> None:
    import json

    from .inference import evaluate

    print(json.dumps(evaluate(args.run, args.shards, args.split, args.batches, args.device), indent=2))


def cmd_sample(args) -> None:
    from .inference import sample

    print(sample(args.run, args.prompt, args.tokens, args.temperature, args.top_k, args.seed, args.device))


def cmd_export(args) -> None:
    from .export import export

    print("\n".join(export(args.run, args.out)))


def cmd_tables(args) -> None:
    from .experiment import load_experiment
    from .tables import write_tables

    studies = load_experiment(args.config)["studies"] if args.config else None
    if args.studies:
        studies = read_json_arg(args.studies, "--studies")
    written = write_tables(args.summaries, args.out, studies=studies)
    print(f"tables: {', '.join(sorted(written))} -> {args.out}")


def cmd_figures(args) -> None:
    from .figures import draw_figures

    studies = read_json_arg(args.studies, "--studies") if args.studies else None
    written = draw_figures(args.tables, args.out, studies=studies)
    print(f"figures: {len(written)} files -> {args.out}")


def _experiment(args) -> dict:
    from .config import parse_overrides
    from .experiment import load_experiment

    return load_experiment(args.config, parse_overrides(args.overrides))


def cmd_check_config(args) -> None:
    from .cost import summary_lines
    from .experiment import source_files

    exp = _experiment(args)
    print(f"{args.config}: ok (experiment '{exp['name']}')")
    print("\n".join(summary_lines(exp)))
    try:
        source_files(exp)
    except UserError as e:  # the config is fine; the pipeline would stop on this
        print(f"  note: {e}")


def cmd_targets(args) -> None:
    from .experiment import runs
    from .layout import RESULTS

    # `--study lr name=x`: the names' nargs takes every word, but a name never holds '=' (config.Name)
    studies = [w for w in args.study or [] if "=" not in w]
    variants = [w for w in args.variant or [] if "=" not in w]
    args.overrides = [w for w in (args.study or []) + (args.variant or []) if "=" in w] + args.overrides
    exp = _experiment(args)
    grid = runs(exp)
    known = sorted(exp["studies"])
    for study in studies:
        if study not in known:
            raise UserError(f"unknown study '{study}' (studies of '{exp['name']}': {', '.join(known) or 'none'})")
    chosen = [r for r in grid if not studies or r.study in studies]
    offered = sorted({r.variant for r in chosen})
    for variant in variants:
        if variant not in offered:
            where = f"study {', '.join(studies)}" if studies else f"experiment '{exp['name']}'"
            raise UserError(f"variant '{variant}' is not in {where} (its variants: {', '.join(offered)})")
    chosen = [r for r in chosen if not variants or r.variant in variants]
    print(" ".join(f"{RESULTS.format(name=exp['name'])}/{r.path}/summary.json" for r in chosen))


def cmd_methods(args) -> None:
    from .methods import BASELINE, METHODS, markdown_table

    if args.update_readme:
        from .methods import update_readme

        changed = update_readme(args.update_readme)
        print(f"{args.update_readme}: methods table {'updated' if changed else 'already up to date'}")
        return
    if args.markdown:
        print(markdown_table())
        return
    for m in (BASELINE, *METHODS):
        print(f"{m.name:14s} {m.label:20s} {m.part or '-':10s} {m.source}")


def cmd_schema(args) -> None:
    import json

    from .experiment import Experiment

    print(json.dumps(Experiment.model_json_schema(), indent=2))


def _add_overrides(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("overrides", nargs="*", metavar="key.path=value",
                   help=f"override {what} values, e.g. train.steps=50 optim.grad_clip=null (values are YAML)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stabilab", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"stabilab {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("corpus", help="read the corpus source and write the train/validation split")
    p.add_argument("--spec", required=True, help="the experiment's `data` section as JSON (or a JSON file)")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_corpus)

    p = sub.add_parser("tokenizer", help="train (bpe) or fetch (gpt2, hf) the tokenizer")
    p.add_argument("--kind", choices=["bpe", "gpt2", "hf"], default="bpe")
    p.add_argument("--vocab-size", type=int, default=2048,
                   help="bpe: the vocabulary to train; hf: the tokenizer's (checked)")
    p.add_argument("--corpus", help="folder with train.jsonl.gz (bpe: trained on it)")
    p.add_argument("--name", help="hf: the tokenizer's hub name (fetched when no --file)")
    p.add_argument("--file", help="hf: a local tokenizer.json, or a folder holding one")
    p.add_argument("--eos-token", help="hf: the token that ends each document (default: the tokenizer's EOS)")
    p.add_argument("--out", required=True, help="tokenizer JSON file to write")
    p.set_defaults(func=cmd_tokenizer)

    p = sub.add_parser("import-shards", help="import pre-tokenized shards (modded-nanogpt .bin) as token shards")
    p.add_argument("--spec", required=True, help="the experiment's `data.token_shards` section as JSON")
    p.add_argument("--out", required=True, help="shards folder to write (train.bin, val.bin, meta.json)")
    p.add_argument("--tokenizer-out", required=True, help="tokenizer JSON file to write (GPT-2's)")
    p.set_defaults(func=cmd_import_shards)

    p = sub.add_parser("tokenize", help="write token shards (numpy memmaps + meta.json)")
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--corpus", required=True)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_tokenize)

    p = sub.add_parser("train", help="train one run from a resolved run config")
    p.add_argument("--run", required=True,
                   help="resolved run config as JSON (or a JSON file, e.g. a run's config.json)")
    p.add_argument("--out", required=True, help="run folder (resumes from its checkpoint if present)")
    _add_runtime_flags(p)
    _add_overrides(p, "run-config")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("train-stacked", help="train runs that differ only in optim.lr and seed together, stacked "
                                             "in one process (each writes its own run folder)")
    p.add_argument("--runs", nargs="+", required=True, help="resolved run configs (JSON or JSON files)")
    p.add_argument("--outs", nargs="+", required=True, help="their run folders, in the same order")
    _add_runtime_flags(p)
    p.set_defaults(func=cmd_train_stacked)

    p = sub.add_parser("eval", help="validation loss and perplexity of a finished run's model on token shards")
    p.add_argument("--run", required=True, help="run folder (config.json and model.pt)")
    p.add_argument("--shards", help="token shards to evaluate on (default: the run's own)")
    p.add_argument("--split", default="val", choices=["val", "train"])
    p.add_argument("--batches", type=int, help="batches of train.batch_size sequences (default: train.eval_batches)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("sample", help="text from a finished run's model (its tokenizer, its softmax or StableMax)")
    p.add_argument("--run", required=True, help="run folder (config.json and model.pt)")
    p.add_argument("--prompt", default="", help="text to continue (empty: start from end-of-text)")
    p.add_argument("--tokens", type=int, default=50, help="tokens to generate")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("export", help="a finished run's model as a Hugging Face transformers folder (GPT-2 or "
                       "LLaMA family; needs the export extra)",
                       description="Write a finished run's final weights as a transformers model folder "
                       "(save_pretrained: config.json, model.safetensors, float32, the real vocabulary without "
                       "padding): GPT-2 family runs as GPT2LMHeadModel, LLaMA family runs (RMSNorm, full "
                       "RoPE, SwiGLU) as LlamaForCausalLM, after checking that its logits equal the run's. "
                       "A bpe tokenizer is exported beside it (PreTrainedTokenizerFast); for a gpt2 (tiktoken) "
                       "tokenizer a note names the Hugging Face tokenizer with the same ids. Refused, with the "
                       "option named: MLRA, qk-norm, partial RoPE, soft-capping, StableMax, and mixes such as "
                       "RMSNorm with learned positions.")
    p.add_argument("--run", required=True, help="run folder (config.json and model.pt)")
    p.add_argument("--out", required=True, help="folder to write (not the run folder nor inside it)")
    p.set_defaults(func=cmd_export)

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

    p = sub.add_parser("targets", help="print the summary.json targets of some runs, for snakemake",
                       description="Print the summary.json targets of some runs, for snakemake: "
                       "snakemake $(stabilab targets --study lr). Overrides (words with '=') may follow the "
                       "names anywhere: --study lr name=x is study lr of the config renamed x.")
    p.add_argument("--config", default="config.yaml")
    p.add_argument("--study", nargs="+", metavar="STUDY", help="only these studies (unknown names: an error)")
    p.add_argument("--variant", nargs="+", metavar="VARIANT", help="only these variants (of the chosen studies)")
    _add_overrides(p, "experiment-config")
    p.set_defaults(func=cmd_targets)

    p = sub.add_parser("check-config", help="validate an experiment config file; say its runs, training tokens, "
                                            "model FLOPs and roughly how long it takes")
    p.add_argument("config")
    _add_overrides(p, "experiment-config")
    p.set_defaults(func=cmd_check_config)

    p = sub.add_parser("methods", help="list the methods (variants) the pipeline knows")
    p.add_argument("--markdown", action="store_true", help="the README's methods table")
    p.add_argument("--update-readme", metavar="README", help="rewrite the methods table in this file")
    p.set_defaults(func=cmd_methods)

    p = sub.add_parser("schema", help="print the experiment config's JSON schema (generated from the config classes)")
    p.set_defaults(func=cmd_schema)

    from .grokking.cli import register
    from .verdicts_cli import register as register_verdicts

    register_verdicts(sub)
    register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; the exit code. Run as the `stabilab` program (the command Snakemake's
    rules call), the process then ends at once (`exit_now`); called from Python, or as
    `python -m stabilab.cli` (under a profiler, say), it returns."""
    code = run_command(argv)
    if argv is None and Path(sys.argv[0]).name == "stabilab":
        exit_now(code)
    return code


def exit_now(code: int) -> None:
    """End the process without the interpreter's teardown: after a train job, freeing a few
    thousand modules (torch, torch._dynamo, sympy) object by object costs about a second of CPU,
    for every job (docs/performance.md, "CPU smoke test"). What a normal exit does that matters is
    done first: the atexit handlers (logging, multiprocessing, trackers) run, stdout and stderr are
    flushed. Every output file is closed by then (summary.json is written atomically). The normal
    exit is kept while another Python thread runs (a tracker's uploader: the normal exit waits for
    it) and under a profiler or tracer (cProfile, coverage), which report at exit."""
    run_exitfuncs = getattr(atexit, "_run_exitfuncs", None)  # CPython's, what a normal exit calls
    if (run_exitfuncs is None or threading.active_count() > 1 or sys.getprofile() is not None
            or sys.gettrace() is not None):
        return
    run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe or stream: nothing more can be written anyway
            pass
    os._exit(code)


def run_command(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
        sys.stdout.flush()  # a closed stdout (`| head`) shows here, not at exit
    except BrokenPipeError:
        # the reader has gone: end quietly, as Unix tools do (128 + SIGPIPE), and let the flush at
        # exit write to nowhere
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a read-only run folder, a full disk: the file and the reason, no traceback
        where = f" {e.filename}" if e.filename else ""
        print(f"error: cannot access{where}: {e.strerror or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
