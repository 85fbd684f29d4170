"""The headline numbers of an experiment: per study and variant, the best final validation loss
(with where it was reached and how many runs diverged), and for LR studies the LR sensitivity in
both normalizations. Written as `tables/headline.csv` and as `tables/headline.html` (one table per
study, after the smoke-test note of a smoke test: the report's front page shows it), and printed at
the end of a pipeline run with the paths of the figures and the report."""

from __future__ import annotations

import html
import json
import textwrap
from pathlib import Path

from .errors import UserError
from .io import atomic_path, atomic_write
from .methods import label

SENSITIVITY = {"lr_sensitivity": "LR sensitivity (Wortsman, /K)", "lr_sensitivity_oec": "(OEC, /(K-1))"}
# What an experiment with `smoke_test: true` (config.yaml) says of its numbers: in the console, the
# report and the first lines of every figure's title
SMOKE_TEST_TITLE = ("SMOKE TEST of the pipeline at toy scale, not a result\n"
                    'results: the GPU presets (README, "Results at a glance"; docs/replication.md)')
SMOKE_TEST_NOTE = (
    "SMOKE TEST, not a result: this experiment (smoke_test: true in its config) runs the pipeline end to end at "
    "toy scale, minutes on a CPU; its numbers show that every step ran, not what the methods do. The "
    "replications are the GPU presets (configs/), with their verdicts in the README (\"Results at a glance\") and "
    "docs/replication.md.")


def studies_of(tables: str | Path) -> dict:
    studies_file = Path(tables) / "studies.json"
    if not studies_file.exists():
        raise UserError(f"table missing: {studies_file} (run the tables rule first)")
    return json.loads(studies_file.read_text())


def is_smoke_test(studies: dict) -> bool:
    """Whether the tables are a smoke test's (the experiment's `smoke_test`, copied into each study)."""
    return any(spec.get("smoke_test") for spec in studies.values())


def headline(tables: str | Path):
    import numpy as np
    import pandas as pd

    tables = Path(tables)
    rows = []
    for study, spec in studies_of(tables).items():
        path = tables / f"summary_{study}.csv"
        if not path.exists():
            continue
        s = pd.read_csv(path)
        if "variant" not in s:  # a kind whose summary is its own analysis (early_warning): no loss rows
            continue
        loss = s[s["metric"] == "final_val_loss"]
        for variant in spec["variants"]:
            v = loss[loss["variant"] == variant]
            if v.empty:
                continue
            finite = v[np.isfinite(v["mean"])]
            best = finite.loc[finite["mean"].idxmin()] if len(finite) else None
            row = {"study": study, "kind": spec["kind"], "variant": variant, "name": label(variant),
                   "best_final_val_loss": float(best["mean"]) if best is not None else np.nan,
                   "at_depth": int(best["depth"]) if best is not None else np.nan,
                   "at_lr": float(best["lr"]) if best is not None else np.nan,
                   "runs": int(v["n_runs"].sum()) if "n_runs" in v else int(v["n"].sum()),
                   "diverged": int(v["n_diverged"].sum())}
            for metric in ("lr_sensitivity", "lr_sensitivity_oec"):
                m = s[(s["metric"] == metric) & (s["variant"] == variant)]
                if len(m):
                    row[metric] = float(m["mean"].iloc[0])
            rows.append(row)
    return pd.DataFrame(rows)


def write_headline(tables: str | Path) -> Path:
    frame = headline(tables)
    out = Path(tables) / "headline.csv"
    with atomic_path(out) as tmp:
        frame.to_csv(tmp, index=False)
    write_headline_html(tables, frame)
    return out


def write_headline_html(tables: str | Path, frame=None) -> Path:
    """headline.html: the headline numbers (`frame`, default: computed) and, where `stabilab verdicts`
    wrote one beside them, verdicts.csv."""
    import pandas as pd

    tables = Path(tables)
    frame = headline(tables) if frame is None else frame
    verdicts = pd.read_csv(tables / "verdicts.csv") if (tables / "verdicts.csv").exists() else None
    out = tables / "headline.html"
    atomic_write(out, headline_html(frame, is_smoke_test(studies_of(tables)), verdicts))
    return out


def _number(value, digits: int) -> str:
    return f"{value:.{digits}f}" if value == value else "n/a"


def _table(header: list[str], rows: list[list], left: tuple[int, ...] = (0,), wrap: tuple[int, ...] = (0,)) -> str:
    """An HTML table styled inline (it is shown inside Snakemake's report and on its own): the columns in
    `left` left-aligned, the others right-aligned; only the columns in `wrap` break their lines."""
    def style(i: int) -> str:
        return (f'style="padding: 0.2em 0.5em; border-bottom: 1px solid #ddd; text-align: '
                f'{"left" if i in left else "right"}{"" if i in wrap else "; white-space: nowrap"}"')

    head = "".join(f"<th {style(i) if i in wrap else style(i).replace('; white-space: nowrap', '')}>"
                   f"{html.escape(h)}</th>" for i, h in enumerate(header))
    body = "".join("<tr>" + "".join(f"<td {style(i)}>{html.escape(str(v))}</td>" for i, v in enumerate(row))
                   + "</tr>\n" for row in rows)
    return (f'<table style="border-collapse: collapse; margin-bottom: 1em"><thead><tr>{head}</tr></thead>'
            f"<tbody>\n{body}</tbody></table>")


def verdicts_html(verdicts) -> list[str]:
    """verdicts.csv (`stabilab verdicts`): per claim, its paired differences and what they say."""
    from .verdicts import where

    parts = ["<p><strong>Verdicts</strong> (verdicts.csv, from <code>stabilab verdicts</code>): each claim as "
             "paired differences over seeds, the second arm minus the first; the reading by rule "
             "(n &ge; 3 seeds, the same sign in each).</p>"]
    for _, group in verdicts.groupby("verdict", sort=False):
        r = group.iloc[0]
        parts.append(f"<p><em>{html.escape(str(r['claim']) or str(r['verdict']))}</em>: {html.escape(str(r['b']))} "
                     f"&minus; {html.escape(str(r['a']))}, {html.escape(str(r['metric']))}</p>")
        rows = [[where(v), f"{v.diff_mean:+.4g}", f"[{v.diff_min:+.4g}, {v.diff_max:+.4g}]", v.n, v.reading]
                for v in group.itertuples(index=False)]
        parts.append(_table(["where", "mean difference", "range", "seeds", "reading"], rows, left=(0, 4), wrap=(4,)))
    return parts


def headline_html(frame, smoke_test: bool = False, verdicts=None) -> str:
    """headline.csv as HTML: a smoke test's note first, or a preset's verdicts (verdicts.csv), then one table
    per study (the report's front page includes it, and shows it as the 'Headline numbers' entry)."""
    parts = ['<div class="stabilab-headline">']
    if smoke_test:
        parts.append('<p style="border: 2px solid #b8860b; padding: 0.5em 0.8em; background: #fff8e1">'
                     f"{html.escape(SMOKE_TEST_NOTE)}</p>")
    if verdicts is not None and not verdicts.empty:
        parts += verdicts_html(verdicts)
    if frame.empty:
        parts.append("<p>No study of this experiment has headline numbers (a best final validation loss): "
                     "its own tables and figures are in the menu.</p>")
    for study, group in frame.groupby("study", sort=False) if not frame.empty else ():  # none: early_warning
        kind = f"{group['kind'].iloc[0]} study" + (", smoke test" if smoke_test else "")
        parts.append(f"<p><strong>{html.escape(str(study))}</strong> ({html.escape(kind)}): "
                     "best final validation loss per variant</p>")
        sensitivities = [(m, name) for m, name in SENSITIVITY.items() if m in group and group[m].notna().any()]
        rows = []
        for r in group.itertuples(index=False):
            where = f" (L{int(r.at_depth)}, LR {r.at_lr:g})" if r.at_depth == r.at_depth else ""
            rows.append([r.name, _number(r.best_final_val_loss, 4) + where, f"{r.diverged}/{r.runs}",
                         *(_number(getattr(r, m), 3) for m, _ in sensitivities)])
        parts.append(_table(["variant", "best final val. loss (at)", "diverged", *(n for _, n in sensitivities)], rows))
    if not smoke_test:
        parts.append("<p>What these numbers say about the papers' claims, with the papers' numbers beside them: "
                     "the verdicts in docs/replication.md and the README (\"Results at a glance\").</p>")
    parts.append("</div>")
    return "\n".join(parts) + "\n"


def print_summary(tables: str | Path, figures: str | Path, report: str = "report.html") -> str:
    """What a finished pipeline prints: where everything is, and the headline numbers."""
    frame = headline(tables)
    smoke = is_smoke_test(studies_of(tables))
    opens = "the smoke-test note and the headline tables" if smoke else "the headline tables"
    lines = [f"results: tables in {tables}/ (runs.csv, steps.csv, summary_<study>.csv, headline.csv)",
             f"figures: {figures}/<study>/*.png (and .pdf)",
             f"report:  snakemake --report {report}   (opens on {opens}; the figures are in its menu)"]
    if smoke:
        lines += ["", *textwrap.wrap(SMOKE_TEST_NOTE, 100)]
    if frame.empty:  # only studies whose summary is their own analysis (early_warning)
        lines.append("\nno headline numbers: no study has a best final validation loss (see its tables)")
    for study, group in frame.groupby("study", sort=False) if not frame.empty else ():
        kind = f"{group['kind'].iloc[0]} study" + (", smoke test" if smoke else "")
        lines.append(f"\n{study} ({kind}): best final validation loss per variant")
        for r in group.itertuples(index=False):
            extra = "".join(f", {name} {getattr(r, m):.3f}" for m, name in SENSITIVITY.items()
                            if m in group and getattr(r, m) == getattr(r, m))
            where = f"L{int(r.at_depth)}, LR {r.at_lr:g}" if r.at_depth == r.at_depth else "-"
            loss = f"{r.best_final_val_loss:.4f}" if r.best_final_val_loss == r.best_final_val_loss else "n/a"
            lines.append(f"  {r.name:24s} {loss} ({where}); {r.diverged}/{r.runs} runs diverged{extra}")
    text = "\n".join(lines)
    print(text, flush=True)
    return text
