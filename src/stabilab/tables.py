"""Tidy tables from run folders (pandas).

- `steps.csv`: one row per run and logged step (every metric column of metrics.jsonl).
- `runs.csv`: one row per run (summary.json, its provenance flattened, plus run-level metrics).
- `grad_norms.csv`: every step's total grad norm, for runs with `train.spike_scores`.
- `headline.csv`: per study and variant, the best final loss and the LR sensitivities (`summary.py`).
- `summary_<study>.csv`: per study, the exact numbers its figures show, in long form:
  study, kind, variant, depth, lr, metric, mean, gmean, min, max, ci95, n, n_runs, n_diverged (`spread`);
  which metrics, and which
  extra rows (LR sensitivity), the study kind's record says (`studies.KINDS`); an early_warning
  study's is its AUROC table instead (`early_warning.summary_table`).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from .errors import UserError
from .io import atomic_path, atomic_write
from .stats import ci95, lr_sensitivity
from .studies import KINDS

RUN_KEYS = ["study", "variant", "depth", "lr", "seed"]
LAST_VALUE = ["tev_mean", "tev_std", "tev_lm_head_mean", "tev_lm_head_std", "mu_norm", "mu_norm_wte",
              "logits_mean", "logits_absmax", "log_z_sq", "hidden_norm", "hidden_mu_cos", "collapse_frac",
              "zero_loss_frac", "spike_count"]


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
    row = {k: v for k, v in summary.items() if k not in ("provenance", "resumes")}
    resumes = summary.get("resumes")  # absent from records made before it was kept: unknown, not none
    row["resumes"] = None if resumes is None else "; ".join(f"from step {r['from_step']} ({r['reason']})"
                                                            for r in resumes)
    measured = steps.dropna(subset=["tev_mean"]) if "tev_mean" in steps else steps.iloc[0:0]
    last = measured.iloc[-1] if len(measured) else None
    for col in LAST_VALUE:
        row[col] = float(last[col]) if last is not None and col in last and pd.notna(last[col]) else np.nan
    row["logits_mean_abs"] = abs(row["logits_mean"])  # for log axes: OEC's mean logit is large and positive
    attn = [c for c in steps.columns if c.startswith("attn_logit_max_l")]
    row["attn_logit_max"] = float(last[attn].max()) if last is not None and attn else np.nan
    if "grad_norm_var" in measured and len(measured):
        late = measured[measured["step"] > measured["step"].max() / 2]
        row["grad_norm_var"] = float((late if len(late) else measured)["grad_norm_var"].mean())
    else:
        row["grad_norm_var"] = np.nan
    row["max_grad_norm"] = float(steps["grad_norm"].max()) if "grad_norm" in steps else np.nan
    for col in [c for c in steps.columns if c.startswith("gss_spikes")]:  # cumulative counts: the last
        row[col] = float(steps[col].dropna().iloc[-1]) if steps[col].notna().any() else np.nan
    if "spam_clipped_frac" in steps:
        row["spam_clipped_frac"] = float(steps["spam_clipped_frac"].mean())
    row.update(summary.get("provenance", {}))  # last: the columns added after the numbers
    return row


def spread(values: pd.Series) -> dict:
    """What the tables say about one point's values over seeds: the mean, the geometric mean (for
    log axes; NaN unless all values are positive), the range (min, max: the interval the figures
    draw), the 95 % t-interval half-width (for reference; with few seeds it is wide: t = 12.7 for
    two), and how many values there are."""
    v = values.dropna()
    gmean = float(np.exp(np.log(v).mean())) if len(v) and (v > 0).all() else np.nan
    return {"mean": v.mean() if len(v) else np.nan, "gmean": gmean, "min": v.min() if len(v) else np.nan,
            "max": v.max() if len(v) else np.nan, "ci95": ci95(v), "n": int(len(v))}


def _aggregate(df: pd.DataFrame, by: list[str], metrics: tuple[str, ...]) -> pd.DataFrame:
    rows = []
    for keys, group in df.groupby(by, dropna=False, sort=True):
        keys = keys if isinstance(keys, tuple) else (keys,)
        for metric in metrics:
            if metric not in group:
                continue
            values = group[metric].astype(float).replace([np.inf, -np.inf], np.nan)
            rows.append({**dict(zip(by, keys)), "metric": metric, **spread(values), "n_runs": len(group),
                         "n_diverged": int(group["diverged"].sum())})
    return pd.DataFrame(rows)


def lr_sensitivity_rows(runs: pd.DataFrame, spec: dict | None = None) -> list[dict]:
    """Per variant (and depth), one value per seed that ran every LR of the study's sweep (`spec`'s
    lrs; without a spec, every LR the variant ran), then mean and CI:
    - `lr_sensitivity`: Wortsman et al.'s, L0 the measured initial loss, divided by K;
    - `lr_sensitivity_oec`: the OEC code's, L0 = ln(V padded to a multiple of 64) (10.83 for GPT-2's
      vocabulary), divided by K - 1; OEC's published numbers are in this convention;
    - `best_val_loss`: the best final validation loss of the sweep (what the sensitivity is measured from).
    With the study's `sensitivity_lrs` (a sub-grid, e.g. the paper's own LRs), the same three again
    over those LRs alone, as `<metric>_sub`."""
    rows = []
    swept = {float(lr) for lr in spec["lrs"]} if spec and spec.get("lrs") else None
    rows += _sensitivity_rows(runs, swept, "")
    if spec and spec.get("sensitivity_lrs"):
        sub = {float(lr) for lr in spec["sensitivity_lrs"]}
        rows += _sensitivity_rows(runs[runs["lr"].astype(float).isin(sub)], sub, "_sub")
    return rows


def sweep_values(group: pd.DataFrame, grid: set | None = None) -> dict[str, dict[int, float]]:
    """One variant's (and depth's) runs over an LR sweep: per metric (lr_sensitivity, lr_sensitivity_oec,
    best_val_loss), {seed: value} for each seed that ran every LR of `grid` (default: the LRs it ran)."""
    l0 = float(group["initial_loss"].dropna().mean())
    vocab = group["vocab_size"].dropna() if "vocab_size" in group else pd.Series(dtype=float)
    l0_oec = math.log(64 * math.ceil(float(vocab.iloc[0]) / 64)) if len(vocab) else float("nan")
    out = {"lr_sensitivity": {}, "lr_sensitivity_oec": {}, "best_val_loss": {}}
    grid = grid if grid is not None else set(group["lr"])
    for seed, g in group.groupby("seed"):
        if set(g["lr"]) != grid:  # a seed run at only some LRs has no sensitivity over the sweep
            continue
        losses = g["final_val_loss"].astype(float).fillna(np.inf).tolist()
        out["lr_sensitivity"][int(seed)] = lr_sensitivity(losses, l0)
        if math.isfinite(l0_oec):  # runs made before the summary recorded the vocabulary have none
            out["lr_sensitivity_oec"][int(seed)] = lr_sensitivity(losses, l0_oec, divide_by="K-1")
        out["best_val_loss"][int(seed)] = min(losses)
    if not math.isfinite(l0_oec):
        del out["lr_sensitivity_oec"]
    return out


def _sensitivity_rows(runs: pd.DataFrame, swept: set | None, suffix: str) -> list[dict]:
    rows = []
    for (variant, depth), group in runs.groupby(["variant", "depth"]):
        for metric, values in sweep_values(group, swept).items():
            s = pd.Series(list(values.values()), dtype=float).replace([np.inf, -np.inf], np.nan)
            rows.append({"variant": variant, "depth": depth, "lr": np.nan, "metric": metric + suffix, **spread(s),
                         "n_runs": len(group), "n_diverged": int(group["diverged"].sum())})
    return rows


def study_summary(runs: pd.DataFrame, study: str, kind: str, steps: pd.DataFrame | None = None,
                  spec: dict | None = None) -> pd.DataFrame:
    record = KINDS[kind]
    df = runs[runs["study"] == study]
    if record.table:  # a kind with its own analysis of the steps (early_warning)
        st = steps[steps["study"].astype(str) == study] if steps is not None else pd.DataFrame()
        out = record.function("table")(df, st, spec or {"kind": kind})
    else:
        out = _aggregate(df, ["variant", "depth", "lr"], record.metrics)
    if record.extra_rows:
        out = pd.concat([out, pd.DataFrame(record.function("extra_rows")(df, spec))], ignore_index=True)
    out.insert(0, "kind", kind)
    out.insert(0, "study", study)
    return out


CODE_KEYS = ["git_commit", "git_dirty", "compile_mode"]  # what trained a run: commit, local edits, graph mode


def check_one_code(runs: pd.DataFrame, study: str, spec: dict) -> None:
    """A study's runs compared in one table come from one commit and one compile mode, unless its
    spec says `mixed_code: true`: otherwise a difference between arms could be one of code. A smoke
    test's study (the default config's) only warns: a commit made while it runs is no confound there."""
    df = runs[runs["study"] == study]
    if spec.get("mixed_code") or df.empty:
        return
    codes = df.reindex(columns=CODE_KEYS).astype(object).where(lambda f: f.notna(), None)
    counts = codes.value_counts(dropna=False)
    if len(counts) < 2:
        return
    said = ", ".join(f"{n} by {str(c or 'an unknown commit')[:7]}{' with local edits' if d else ''} "
                     f"(compile mode {m or 'none recorded'})" for (c, d, m), n in counts.items())
    if spec.get("smoke_test"):  # a check of the pipeline, not a comparison: say it, do not stop
        print(f"warning: study {study}: its runs were trained by different code ({said}); a smoke test, so "
              f"the tables are made anyway", file=sys.stderr)
        return
    raise UserError(f"study {study}: its runs were trained by different code ({said}); a table comparing them "
                    f"would confound the arms with the code: re-train them from one commit, or set "
                    f"studies.{study}.mixed_code: true to compare them anyway")


def write_tables(summary_paths: list[str], out_dir: str | Path, studies: dict | None = None) -> list[str]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    run_rows, step_frames, norm_frames = [], [], []
    for path in summary_paths:
        summary, steps = read_run(path)
        run_rows.append(run_level(summary, steps))
        step_frames.append(steps)
        norms = Path(path).parent / "grad_norm.csv"
        if norms.exists():
            frame = pd.read_csv(norms, names=["step", "grad_norm"])
            for key in reversed(RUN_KEYS):
                frame.insert(0, key, summary[key])
            norm_frames.append(frame)
    runs = pd.DataFrame(run_rows)
    for study, spec in (studies or {}).items():
        check_one_code(runs, study, spec)
    steps = pd.concat(step_frames, ignore_index=True)
    written = {"runs.csv": runs, "steps.csv": steps}
    if norm_frames:
        written["grad_norms.csv"] = pd.concat(norm_frames, ignore_index=True)
    for study, spec in (studies or {}).items():
        if study in set(runs["study"]):
            written[f"summary_{study}.csv"] = study_summary(runs, study, spec["kind"], steps, spec)
    for name, frame in written.items():
        with atomic_path(out / name) as tmp:
            frame.to_csv(tmp, index=False)
    atomic_write(out / "studies.json", json.dumps(studies or {}, indent=2, sort_keys=True) + "\n")
    from .summary import write_headline

    write_headline(out)
    return list(written) + ["studies.json", "headline.csv", "headline.html"]
