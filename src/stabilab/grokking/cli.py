"""The study's subcommands: grok-train, grok-report, grok-figures (argparse only at import)."""

from __future__ import annotations

import argparse

from ..io import read_json_arg

SMOKE_TEST_HELP = "the runs are a smoke test's (the experiment's smoke_test): the figures' titles say so"


def cmd_train(args: argparse.Namespace) -> int:
    from .config import parse_spec
    from .train import train_run

    spec = parse_spec(read_json_arg(args.spec, "--spec"))
    summary = train_run(spec, args.out, threads=args.threads, device=args.device)
    e95 = summary["epochs_to_95"]
    print(f"{spec.variant} {spec.operation} s{spec.seed}: final test acc "
          f"{summary['final_test_acc']:.4f}, epochs to 95% {'never' if e95 is None else e95}, "
          f"{summary['wall_s']:.1f} s")
    return 0


def cmd_figures(args: argparse.Namespace) -> int:
    from .report import figures_from_tables

    written = figures_from_tables(args.tables, args.figures, args.smoke_test)
    print(f"grok-figures: {len(written)} figure files -> {args.figures}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .report import report

    out = report(args.runs, args.tables, args.figures, args.smoke_test)
    print(f"grok-report: {out['runs']} runs -> {len(out['tables'])} tables, {len(out['figures'])} figure files")
    return 0


def register(subparsers) -> None:
    """Add `grok-train`, `grok-report` and `grok-figures` to an argparse subparsers object; each
    sets `func(args) -> exit code`."""
    train = subparsers.add_parser(
        "grok-train", help="train one grokking run (StableMax paper, modular arithmetic MLP)",
        description="Train one grokking run; writes metrics.jsonl and summary.json into --out.")
    train.add_argument("--spec", required=True,
                       help="the resolved run as JSON (variant, operation, seed, hyperparameters), or a JSON file")
    train.add_argument("--out", required=True, help="run folder to write")
    train.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default)")
    train.add_argument("--device", default="cpu", help="auto, cpu, cuda or cuda:N")
    train.set_defaults(func=cmd_train)
    rep = subparsers.add_parser(
        "grok-report", help="tables and figures of grokking runs",
        description="Collect grokking runs into grokking_steps.csv / grokking_summary.csv and "
                    "draw the accuracy, Softmax-Collapse and weight-norm figures.")
    rep.add_argument("--runs", nargs="+", required=True, help="run folders, or folders to search for */summary.json")
    rep.add_argument("--tables", required=True, help="folder for the CSV tables")
    rep.add_argument("--figures", required=True, help="folder for the PNG and PDF figures")
    rep.add_argument("--smoke-test", action="store_true", help=SMOKE_TEST_HELP)
    rep.set_defaults(func=cmd_report)
    fig = subparsers.add_parser("grok-figures", help="redraw grokking figures from grokking_steps.csv (no training)")
    fig.add_argument("--tables", required=True, help="folder holding grokking_steps.csv")
    fig.add_argument("--figures", required=True, help="folder for the PNG and PDF figures")
    fig.add_argument("--smoke-test", action="store_true", help=SMOKE_TEST_HELP)
    fig.set_defaults(func=cmd_figures)
