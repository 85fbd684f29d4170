"""Tidy tables from run folders (pandas).

- `steps.csv`: one row per run and logged step (every metric column of metrics.jsonl).
- `runs.csv`: one row per run (summary.json plus run-level metrics).
- `summary_<study>.csv`: per study, the exact numbers its figures show, in long form:
  study, kind, variant, depth, lr, metric, mean, ci95, n, n_diverged.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from .errors import UserError
from .metrics import lr_sensitivity

RUN_KEYS = ["study", "variant", "depth", "lr", "seed"]
# Two-sided 95 % Student-t quantiles by degrees of freedom (scipy is not a dependency).
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262,
       10: 2.228, 15: 2.131, 20: 2.086, 30: 2.042}


def t95(dof: int) -> float:
    if dof <= 0:
        return float("nan")
    keys = [k for k in sorted(T95) if k <= dof]
    return T95[keys[-1]] if dof <= 30 else 1.96


def ci95(values: pd.Series) -> float:
    """Half-width of the 95 % confidence interval of the mean (NaN with one value)."""
    v = values.dropna()
    return t95(len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v)) if len(v) > 1 else float("nan")


def read_run(summary_path: str | Path) -> tuple[dict, pd.DataFrame]:
    path = Path(summary_path)
    try:
        summary = json.loads(path.read_text())
        steps = pd.read_json(path.parent / "metrics.jsonl", lines=True)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read run {path.parent}: {e}") from None
    steps = steps.rename(columns={"lr": "lr_now"})  # the schedule's value; `lr` is the run's peak LR
    for key in RUN_KEYS:
        steps.insert(RUN_KEYS.index(key), key, summary[key])
    return summary, steps


def run_level(summary: dict, steps: pd.DataFrame) -> dict:
    """Run-level metrics: last measured value, and the grad-norm variance averaged over the
    second half of training (the first half is dominated by the warmup transient)."""
    row = dict(summary)
    measured = steps.dropna(subset=["tev_mean"]) if "tev_mean" in steps else steps.iloc[0:0]
    last = measured.iloc[-1] if len(measured) else None
    for col in ["tev_mean", "tev_std", "tev_lm_head_mean", "tev_lm_head_std", "mu_norm", "mu_norm_wte",
                "logits_mean", "logits_absmax", "log_z_sq", "collapse_frac", "zero_loss_frac", "spike_count"]:
        row[col] = float(last[col]) if last is not None and col in last and pd.notna(last[col]) else np.nan
    attn = [c for c in steps.columns if c.startswith("attn_logit_max_l")]
    row["attn_logit_max"] = float(last[attn].max()) if last is not None and attn else np.nan
    if "grad_norm_var" in measured and len(measured):
        late = measured[measured["step"] > measured["step"].max() / 2]
        row["grad_norm_var"] = float((late if len(late) else measured)["grad_norm_var"].mean())
    else:
        row["grad_norm_var"] = np.nan
    row["max_grad_norm"] = float(steps["grad_norm"].max()) if "grad_norm" in steps else np.nan
    if "spam_clipped_frac" in steps:
        row["spam_clipped_frac"] = float(steps["spam_clipped_frac"].mean())
    return row


def _aggregate(df: pd.DataFrame, by: list[str], metrics: list[str]) -> pd.DataFrame:
    rows = []
    for keys, group in df.groupby(by, dropna=False, sort=True):
        keys = keys if isinstance(keys, tuple) else (keys,)
        for metric in metrics:
            if metric not in group:
                continue
            values = group[metric].astype(float)
            rows.append({**dict(zip(by, keys)), "metric": metric, "mean": values.mean(), "ci95": ci95(values),
                         "n": int(values.notna().sum()), "n_diverged": int(group["diverged"].sum())})
    return pd.DataFrame(rows)


STUDY_METRICS = {
    "depth": ["final_val_ppl", "final_val_loss", "tev_mean", "tev_std", "tev_lm_head_mean", "tev_lm_head_std",
              "grad_norm_var", "params"],
    "lr": ["final_val_loss", "mu_norm", "logits_absmax", "logits_mean", "attn_logit_max"],
    "spikes": ["final_val_loss", "spike_count", "max_grad_norm", "spam_clipped_frac"],
    "compare": ["final_val_loss", "final_val_ppl", "params", "tev_mean", "mu_norm", "logits_absmax",
                "collapse_frac", "wall_time_s"],
}


def study_summary(runs: pd.DataFrame, study: str, kind: str) -> pd.DataFrame:
    df = runs[runs["study"] == study]
    out = _aggregate(df, ["variant", "depth", "lr"], STUDY_METRICS[kind])
    if kind == "lr":  # LR sensitivity per variant (and depth), one value per seed, then mean and CI
        rows = []
        for (variant, depth), group in df.groupby(["variant", "depth"]):
            l0 = float(group["initial_loss"].dropna().mean())
            per_seed = [lr_sensitivity(g["final_val_loss"].astype(float).fillna(np.inf).tolist(), l0)
                        for _, g in group.groupby("seed")]
            s = pd.Series(per_seed)
            rows.append({"variant": variant, "depth": depth, "lr": np.nan, "metric": "lr_sensitivity",
                         "mean": s.mean(), "ci95": ci95(s), "n": len(s), "n_diverged": int(group["diverged"].sum())})
        out = pd.concat([out, pd.DataFrame(rows)], ignore_index=True)
    out.insert(0, "kind", kind)
    out.insert(0, "study", study)
    return out


def write_tables(summary_paths: list[str], out_dir: str | Path, studies: dict | None = None) -> list[str]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    run_rows, step_frames = [], []
    for path in summary_paths:
        summary, steps = read_run(path)
        run_rows.append(run_level(summary, steps))
        step_frames.append(steps)
    runs = pd.DataFrame(run_rows)
    steps = pd.concat(step_frames, ignore_index=True)
    written = {"runs.csv": runs, "steps.csv": steps}
    for study, spec in (studies or {}).items():
        if study in set(runs["study"]):
            written[f"summary_{study}.csv"] = study_summary(runs, study, spec["kind"])
    for name, frame in written.items():
        tmp = out / f"{name}.tmp"
        frame.to_csv(tmp, index=False)
        tmp.replace(out / name)
    (out / "studies.json").write_text(json.dumps(studies or {}, indent=2, sort_keys=True) + "\n")
    return list(written) + ["studies.json"]
