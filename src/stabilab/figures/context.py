"""What a study kind's draw function receives: one study's tables and where its figures go."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd


@dataclass
class StudyTables:
    study: str  # the study's name
    spec: dict  # its config entry (kind, variants, depths, lrs, seeds)
    summary: pd.DataFrame  # summary_<study>.csv
    steps: pd.DataFrame  # steps.csv rows of this study
    runs: pd.DataFrame  # runs.csv rows of this study
    palette: dict  # variant -> colour, shared by every study
    folder: Path  # figures/<name>/<study>/
    grad_norms: pd.DataFrame | None = None  # grad_norms.csv rows of this study (runs with spike_scores)

    @property
    def variants(self) -> list[str]:
        return list(self.spec["variants"])
