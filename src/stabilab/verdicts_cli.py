"""The verdict subcommands: `verdicts` (each claim of a preset as paired differences over seeds)
and `early-warning-test` (the pre-registered test of METHODS.md §5b)."""

from __future__ import annotations

from pathlib import Path

from .errors import UserError


def cmd_verdicts(args) -> None:
    from .cli import _experiment
    from .layout import RESULTS
    from .summary import write_headline_html
    from .verdicts import where, write_verdicts

    exp = _experiment(args)
    specs = exp.get("verdicts") or {}
    only_grokking = bool(specs) and all(spec["study"] == "grokking" for spec in specs.values())
    folder = "grokking/tables" if only_grokking else "tables"
    tables = Path(args.tables or f"{RESULTS.format(name=exp['name'])}/{folder}")
    frame = write_verdicts(exp, tables)
    for r in frame.itertuples(index=False):
        reading = f"{r.b} {r.reading}" if r.reading.startswith(("lower", "higher")) else r.reading
        if getattr(r, "best_lr_inside_grid", True) is False:
            reading += " (a best LR at the grid's edge)"
        by = tuple(specs.get(r.verdict, {}).get("by", ()))
        print(f"{r.verdict}: {r.b} - {r.a}, {r.metric}, {where(r, by)}: {r.diff_mean:+.4f} "
              f"[{r.diff_min:+.4f}, {r.diff_max:+.4f}]: {reading}")
    print(f"verdicts: {len(frame)} rows -> {tables / 'verdicts.csv'}")
    if (tables / "studies.json").exists():  # the report's front page shows the verdicts first
        print(f"report: {write_headline_html(tables)}")


def cmd_early_warning_test(args) -> None:
    import pandas as pd

    from .early_warning import preregistered_test
    from .figures import load_tables
    from .io import atomic_path
    from .summary import studies_of

    tables = Path(args.tables)
    studies = studies_of(tables)
    if args.study not in studies:
        raise UserError(f"no study '{args.study}' in {tables} (studies: {', '.join(sorted(studies))})")
    runs, steps = load_tables(tables)
    out = preregistered_test(runs[runs["study"] == args.study], steps[steps["study"] == args.study],
                             studies[args.study], metric=args.metric, feature=args.feature, lead=args.lead)
    with atomic_path(tables / f"preregistered_{args.study}.csv") as tmp:
        pd.DataFrame([out]).to_csv(tmp, index=False)
    print(f"{args.study}: AUROC of {args.metric} ({args.feature}) {args.lead} steps ahead, within cell, "
          f"{out['n_runs']} runs ({out['n_failing']} failing): {out['test_auroc']:.3f} "
          f"[{out['test_ci_low']:.3f}, {out['test_ci_high']:.3f}]; the loss's slope {out['baseline_auroc']:.3f} "
          f"[{out['baseline_ci_low']:.3f}, {out['baseline_ci_high']:.3f}]; difference {out['difference']:+.3f} "
          f"[{out['difference_ci_low']:+.3f}, {out['difference_ci_high']:+.3f}]\n{out['decision']}")



def register(sub) -> None:
    """Add `verdicts` and `early-warning-test` to an argparse subparsers object."""
    from .cli import _add_overrides

    p = sub.add_parser("verdicts", help="each claim of a preset as paired differences over seeds (verdicts.csv)")
    p.add_argument("--config", required=True, help="the preset (its `verdicts:` section)")
    p.add_argument("--tables", help="its tables folder (default: results/<name>/tables)")
    _add_overrides(p, "experiment-config")
    p.set_defaults(func=cmd_verdicts)

    p = sub.add_parser("early-warning-test", help="the pre-registered early-warning test (METHODS.md 5b) of a "
                                                  "study's tables: one AUROC, its interval and decision")
    p.add_argument("--tables", required=True, help="the experiment's tables folder")
    p.add_argument("--study", default="attn_growth", help="an early_warning study")
    p.add_argument("--metric", default="attn_logit_max", help="the predictor fixed in advance")
    p.add_argument("--feature", default="value", choices=["value", "slope"])
    p.add_argument("--lead", type=int, default=50, help="lead in steps")
    p.set_defaults(func=cmd_early_warning_test)
