"""Tables of a set of grokking runs (and, through `figures`, their figures)."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import UserError
from ..io import atomic_path
from .config import VARIANTS, RunSpec, parse_spec

KEYS = ["operation", "variant", "seed"]
SUMMARY_COLUMNS = ["final_test_acc", "best_test_acc", "final_train_acc", "final_collapse_frac",
                   "max_collapse_frac", "final_zero_loss_frac", "final_weight_norm", "epochs_run",
                   "diverged_at", "wall_s", "device"]
TABLES = ("grokking_steps.csv", "grokking_summary.csv")


def find_run_dirs(paths: list[str | Path]) -> list[Path]:
    """Run folders (holding summary.json) among `paths` or anywhere below them."""
    found: list[Path] = []
    for p in map(Path, paths):
        if (p / "summary.json").is_file():
            found.append(p)
        elif p.is_dir():
            found += sorted(s.parent for s in p.rglob("summary.json"))
        else:
            raise UserError(f"grok-report: no such run folder: {p}")
    if not found:
        raise UserError(f"grok-report: no summary.json under {', '.join(map(str, paths))}")
    return sorted(set(found))


def load_run(run_dir: Path) -> tuple[dict, list[dict]]:
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
        return summary, [json.loads(line) for line in lines if line.strip()]
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"grok-report: unreadable run {run_dir}: {exc}") from None


def _never(epoch) -> int | str:
    return "never" if epoch is None else int(epoch)


def _run_key(spec: RunSpec) -> dict:
    return {"operation": spec.operation, "variant": spec.variant, "seed": spec.seed,
            "modulus": spec.modulus, "loss_dtype": spec.loss_dtype}


def _sorted(df):
    order = {v: i for i, v in enumerate(VARIANTS)}
    by = KEYS[:2] + (["beta2"] if "beta2" in df else []) + KEYS[2:] + (["epoch"] if "epoch" in df else [])
    return df.sort_values(by, key=lambda c: c.map(order) if c.name == "variant" else c,
                          kind="stable").reset_index(drop=True)


def build_tables(run_dirs: list[Path]):
    """(steps, summary) DataFrames: one row per run and eval epoch; one row per run."""
    import pandas as pd

    steps, rows = [], []
    for run_dir in run_dirs:
        summary, records = load_run(run_dir)
        spec = parse_spec(summary["spec"])
        key = _run_key(spec)
        steps += [{**key, **r, "beta2": spec.beta2} for r in records]  # the figures name each row's beta2
        rows.append({**key, "epochs_to_95": _never(summary["epochs_to_95"]),
                     "train_epochs_to_95": _never(summary["train_epochs_to_95"]),
                     **{c: summary.get(c) for c in SUMMARY_COLUMNS},
                     "lr": spec.lr, "beta2": spec.beta2,
                     "git_commit": summary.get("provenance", {}).get("git_commit")})  # the code that trained it
    return _sorted(pd.DataFrame(steps)), _sorted(pd.DataFrame(rows))


def report(runs: list[str | Path], tables_dir: str | Path, figures_dir: str | Path, smoke_test: bool = False) -> dict:
    """Tables (CSV) and figures (PNG + PDF) of a set of runs (a smoke test's: their titles say so)."""
    from .figures import make_figures

    run_dirs = find_run_dirs(runs)
    steps, summary = build_tables(run_dirs)
    tables = Path(tables_dir)
    tables.mkdir(parents=True, exist_ok=True)
    for name, frame in zip(TABLES, (steps, summary)):
        with atomic_path(tables / name) as tmp:
            frame.to_csv(tmp, index=False)
    figures = make_figures(steps, Path(figures_dir), smoke_test)
    return {"runs": len(run_dirs), "tables": [str(tables / name) for name in TABLES],
            "figures": [str(p) for p in figures]}


def read_table(tables_dir: str | Path, name: str):
    """One of a grok-report's TABLES as a DataFrame; a missing one is a one-line error."""
    import pandas as pd

    path = Path(tables_dir) / name
    if not path.exists():
        raise UserError(f"table missing: {path} (a grok-report's tables folder holds it)")
    return pd.read_csv(path)


def figures_from_tables(tables_dir: str | Path, figures_dir: str | Path, smoke_test: bool = False) -> list[Path]:
    """Redraw the figures from a grokking_steps.csv alone (no run folders, no training)."""
    from .figures import make_figures

    return make_figures(read_table(tables_dir, TABLES[0]), Path(figures_dir), smoke_test)
