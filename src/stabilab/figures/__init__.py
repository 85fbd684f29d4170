"""Paper-style figures (seaborn; PNG and PDF) drawn from the tables alone.

Each study kind (`studies.KINDS`) names its figures, their captions (workflow/report/) and the
function that draws them: loss curves first (`curves`), then the kind's own module (`depth`,
`lr`, `spikes`, `compare`). `style` holds the conventions every figure shares, `points` the
points-with-intervals and bar charts.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import UserError
from ..studies import KINDS


def load_tables(tables: Path):
    """runs.csv and steps.csv, with the columns every figure relies on normalized."""
    import numpy as np
    import pandas as pd

    for name in ("runs.csv", "steps.csv"):
        if not (tables / name).exists():
            raise UserError(f"table missing: {tables / name} (run the tables rule first)")
    runs, steps = pd.read_csv(tables / "runs.csv"), pd.read_csv(tables / "steps.csv")
    for frame in (runs, steps):
        if "study" in frame:
            frame["study"] = frame["study"].astype(str)
    if "diverged" in runs:
        runs["diverged"] = runs["diverged"].astype(str).str.lower().isin(["true", "1", "1.0"])
    else:
        runs["diverged"] = False
    if "diverged_step" not in runs:
        runs["diverged_step"] = np.nan
    return runs, steps


def draw_figures(tables_dir: str | Path, out_dir: str | Path, studies: dict | None = None) -> list[Path]:
    tables, out = Path(tables_dir), Path(out_dir)
    if studies is None:
        studies_file = tables / "studies.json"
        if not studies_file.exists():
            raise UserError(f"table missing: {studies_file} (run the tables rule first)")
        studies = json.loads(studies_file.read_text())
    for study, spec in studies.items():
        if spec.get("kind") not in KINDS:
            raise UserError(f"study '{study}': unknown kind '{spec.get('kind')}' (one of {', '.join(KINDS)})")
    runs, steps = load_tables(tables)

    import pandas as pd
    import seaborn as sns

    from ..methods import given_labels
    from .context import StudyTables
    from .curves import loss_curves
    from .style import palette_for, read_summary, save, smoke_test_titles

    norms = pd.read_csv(tables / "grad_norms.csv") if (tables / "grad_norms.csv").exists() else None
    palette = palette_for(studies)
    written: list[Path] = []
    with sns.axes_style("whitegrid"), sns.plotting_context("paper", font_scale=1.15):
        for study, spec in studies.items():
            folder = out / study
            t = StudyTables(study, spec, read_summary(tables, study), steps[steps["study"] == study],
                            runs[runs["study"] == study], palette, folder,
                            norms[norms["study"].astype(str) == study] if norms is not None else None)
            with given_labels(spec.get("labels") or {}), smoke_test_titles(spec.get("smoke_test", False)):
                written += save(loss_curves(steps, runs, study, spec, palette), folder, "loss_curves")
                written += KINDS[spec["kind"]].function("draw")(t)
    return written
