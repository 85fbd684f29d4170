"""Verdict tables: each claim of a preset as paired differences over seeds, from the committed
tables alone (`stabilab verdicts --config <preset>` writes `tables/verdicts.csv`).

A preset's `verdicts:` section names, per claim, the study, the metric, the two arms (the
difference is arms[1] - arms[0], seed by seed: runs of one seed share their initialisation and
batch order) and where to compare them:

- `over: lr` (default): at every depth and LR of the study (a metric of runs.csv: final values);
- `over: best_lr`: each arm at its own best LR per depth (the LR of its lowest mean `select`,
  default final_val_loss), and whether that LR is inside the grid or at its edge;
- `over: step`: at every step where both arms logged the metric (steps.csv: a trajectory);
- `over: sweep`: a quantity of the whole LR sweep per seed (metric lr_sensitivity, lr_sensitivity_oec
  or best_val_loss; `tables.sweep_values`), over the study's LRs or, with `lrs: sub`, its
  `sensitivity_lrs`.

`study: grokking` compares grokking runs instead, from a grok-report's grokking_summary.csv (metric
one of its columns, e.g. final_test_acc), per operation and per value of the columns in `by`.

What a row says (`reading`), by rule, never by eye: with n >= 3 seeds in both arms, "<b> lower"
("higher") "in n of n seeds" when every paired difference has the same sign, else "no difference
measured" (the gap is inside the seed-to-seed spread); with n < 3, "n < 3: not tested". Beside it:
the mean, min and max of the paired differences, the sign count and the exact two-sided sign-test
p (0.25 is the smallest there is for 3 seeds: three seeds can show a consistent sign, not a
significant one), the commits and compile modes of the runs (a table of one code: `tables.py`).
A diverged run's loss counts as +inf (it lost), so a difference with it is +-inf.
"""

from __future__ import annotations

import math
from pathlib import Path

from .errors import UserError

MIN_SEEDS = 3
LOSSES = ("final_val_loss", "val_loss", "train_loss", "final_val_ppl")  # a diverged run's is +inf


def sign_test_p(n_pos: int, n_neg: int) -> float:
    """Exact two-sided sign-test p of n_pos positive and n_neg negative differences (ties dropped)."""
    n = n_pos + n_neg
    if n == 0:
        return float("nan")
    k = min(n_pos, n_neg)
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n)


def paired(a: dict, b: dict) -> dict:
    """Paired differences b[s] - a[s] over the seeds both arms have: their summary and the reading."""
    seeds = sorted(set(a) & set(b))
    diffs = [b[s] - a[s] if not (math.isinf(a[s]) and math.isinf(b[s])) else 0.0 for s in seeds]
    finite = [d for d in diffs if math.isfinite(d)]
    n_pos, n_neg = sum(d > 0 for d in diffs), sum(d < 0 for d in diffs)
    n = len(seeds)
    if n < MIN_SEEDS:
        reading = f"n = {n} < {MIN_SEEDS}: not tested"
    elif all(math.isinf(a[s]) and math.isinf(b[s]) for s in seeds):
        reading = f"both diverged in {n} of {n} seeds"
    elif n_neg == n:
        reading = f"lower in {n} of {n} seeds"
    elif n_pos == n:
        reading = f"higher in {n} of {n} seeds"
    else:
        reading = f"no difference measured ({n_neg} lower, {n_pos} higher, {n - n_pos - n_neg} equal)"
    mean = sum(diffs) / n if n else math.nan  # +-inf with a diverged run (nan if both arms have one)
    return {"n": n, "seeds": " ".join(map(str, seeds)),
            "a_diverged": sum(math.isinf(a[s]) for s in seeds), "b_diverged": sum(math.isinf(b[s]) for s in seeds),
            "a_mean": _mean([a[s] for s in seeds]), "b_mean": _mean([b[s] for s in seeds]),
            "diff_mean": mean, "diff_min": min(diffs) if n else math.nan, "diff_max": max(diffs) if n else math.nan,
            "diff_finite_mean": _mean(finite), "n_b_lower": n_neg, "n_b_higher": n_pos,
            "p_sign": sign_test_p(n_pos, n_neg), "reading": reading}


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def _values(frame, metric: str) -> dict:
    """{seed: value} of one arm in one cell; a diverged run's loss is +inf."""
    out = {}
    for _, row in frame.iterrows():
        v = float(row[metric]) if metric in row and row[metric] == row[metric] else math.nan
        if math.isnan(v) and metric in LOSSES and bool(row.get("diverged", False)):
            v = math.inf
        if not math.isnan(v):
            out[int(row["seed"])] = v
    return out


def _codes(frame) -> dict:
    cols = [c for c in ("git_commit", "compile_mode") if c in frame]
    return {c: " ".join(sorted({str(v)[:7] if c == "git_commit" else str(v) for v in frame[c].dropna()})) or "-"
            for c in cols}


def verdict_rows(name: str, spec: dict, runs, steps, study_spec: dict | None = None) -> list[dict]:
    """The rows of one verdict (see the module doc) from runs.csv and steps.csv frames."""
    study, metric, (arm_a, arm_b) = spec["study"], spec["metric"], spec["arms"]
    over = spec.get("over", "lr")
    df = runs[runs["study"] == study]
    for arm in (arm_a, arm_b):
        if arm not in set(df["variant"]):
            raise UserError(f"verdict {name}: no run of variant '{arm}' in study '{study}'")
    base = {"verdict": name, "claim": spec.get("claim", ""), "study": study, "metric": metric,
            "a": arm_a, "b": arm_b, **_codes(df[df["variant"].isin([arm_a, arm_b])])}
    rows = []
    if over == "step":
        st = steps[(steps["study"] == study) & steps["variant"].isin([arm_a, arm_b])]
        if metric not in st:
            raise UserError(f"verdict {name}: metric '{metric}' is not a column of steps.csv")
        st = st.dropna(subset=[metric])
        for (depth, lr, step), cell in st.groupby(["depth", "lr", "step"]):
            a = _values(cell[cell["variant"] == arm_a], metric)
            b = _values(cell[cell["variant"] == arm_b], metric)
            if a and b:
                rows.append({**base, "depth": depth, "lr_a": lr, "lr_b": lr, "step": step, **paired(a, b)})
        return rows
    if over == "sweep":
        from .tables import sweep_values

        key = "sensitivity_lrs" if spec.get("lrs") == "sub" else "lrs"
        grid = {float(x) for x in (study_spec or {}).get(key) or df["lr"].unique()}
        sweep = df[df["lr"].astype(float).isin(grid)]
        for depth, cell in sweep.groupby("depth"):
            a, b = (sweep_values(cell[cell["variant"] == arm], grid).get(metric) for arm in (arm_a, arm_b))
            if a is None:
                raise UserError(f"verdict {name}: '{metric}' is not a sweep quantity (lr_sensitivity, "
                                "lr_sensitivity_oec, best_val_loss)")
            rows.append({**base, "depth": depth, "lr_a": math.nan, "lr_b": math.nan, "step": math.nan,
                         "lrs": " ".join(f"{x:g}" for x in sorted(grid)), **paired(a, b)})
        return rows

    if metric not in df:
        raise UserError(f"verdict {name}: metric '{metric}' is not a column of runs.csv")
    grid = sorted(float(x) for x in (study_spec or {}).get("lrs") or df["lr"].unique())
    for depth, cell in df.groupby("depth"):
        if over == "lr":
            pairs = [(lr, lr) for lr in sorted(cell["lr"].unique())]
        elif over == "best_lr":
            pairs = [(_best_lr(cell[cell["variant"] == arm_a], spec), _best_lr(cell[cell["variant"] == arm_b], spec))]
        else:
            raise UserError(f"verdict {name}: over must be lr, best_lr, step or sweep, not '{over}'")
        for lr_a, lr_b in pairs:
            a = _values(cell[(cell["variant"] == arm_a) & (cell["lr"] == lr_a)], metric)
            b = _values(cell[(cell["variant"] == arm_b) & (cell["lr"] == lr_b)], metric)
            row = {**base, "depth": depth, "lr_a": lr_a, "lr_b": lr_b, "step": math.nan, **paired(a, b)}
            if over == "best_lr":
                row["best_lr_inside_grid"] = all(grid[0] < lr < grid[-1] for lr in (lr_a, lr_b))
            rows.append(row)
    return rows


def grokking_rows(name: str, spec: dict, summary) -> list[dict]:
    """The rows of one grokking verdict from a grokking_summary.csv frame: arms paired by seed within
    each operation (and modulus) and each value of the `by` columns."""
    metric, (arm_a, arm_b) = spec["metric"], spec["arms"]
    by = ["operation", "modulus", *spec.get("by", [])]
    for column in (metric, *by):
        if column not in summary:
            raise UserError(f"verdict {name}: '{column}' is not a column of grokking_summary.csv")
    for arm in (arm_a, arm_b):
        if arm not in set(summary["variant"]):
            raise UserError(f"verdict {name}: no grokking run of variant '{arm}'")
    base = {"verdict": name, "claim": spec.get("claim", ""), "study": "grokking", "metric": metric,
            "a": arm_a, "b": arm_b}
    rows = []
    for key, cell in summary.groupby(by):
        twice = cell[cell["variant"].isin([arm_a, arm_b])].duplicated(["variant", "seed"])
        if twice.any():
            raise UserError(f"verdict {name}: a seed of one arm appears twice within {dict(zip(by, key))}: "
                            "name the column that tells those runs apart in `by` (e.g. beta2)")
        a = _values(cell[cell["variant"] == arm_a], metric)
        b = _values(cell[cell["variant"] == arm_b], metric)
        if a and b:
            rows.append({**base, **_codes(cell[cell["variant"].isin([arm_a, arm_b])]), **dict(zip(by, key)),
                         **paired(a, b)})
    if not rows:
        raise UserError(f"verdict {name}: no {' / '.join(by)} where both {arm_a} and {arm_b} have runs in this "
                        "table (a grok-report of both arms' runs holds them)")
    return rows


def _best_lr(frame, spec: dict) -> float:
    """The LR of the arm's lowest mean `select` (default final_val_loss; a diverged run counts +inf)."""
    select = spec.get("select", "final_val_loss")
    means = {lr: _mean(list(_values(g, select).values())) for lr, g in frame.groupby("lr")}
    means = {lr: m for lr, m in means.items() if m == m}
    if not means:
        raise UserError(f"no run with a finite {select} to choose the best LR from")
    return min(means, key=lambda lr: (means[lr], lr))


def where(r, by: tuple = ()) -> str:
    """Where a verdicts.csv row compares (a row of `itertuples`): 'L12 LR 0.002', 'L6 LR 0.003 vs 0.01',
    'L12 LRs 0.003 0.01 0.03', 'L12 LR 0.003 step 500'; a grokking row: 'add mod 113, beta2 0.99'."""
    if r.study == "grokking":
        return ", ".join([f"{r.operation} mod {r.modulus}"] + [f"{c} {getattr(r, c):g}" if isinstance(
            getattr(r, c), float) else f"{c} {getattr(r, c)}" for c in by])
    text = f"L{r.depth} " + (f"LRs {getattr(r, 'lrs', '')}" if r.lr_a != r.lr_a else f"LR {r.lr_a:g}" + (
        f" vs {r.lr_b:g}" if r.lr_b != r.lr_a else ""))
    return text + (f" step {int(r.step)}" if r.step == r.step else "")


def write_verdicts(config: dict, tables: str | Path):
    """verdicts.csv in `tables` from its runs.csv and steps.csv, for the preset's `verdicts:`."""
    import pandas as pd

    from .figures import load_tables
    from .io import atomic_path

    tables = Path(tables)
    specs = config.get("verdicts") or {}
    if not specs:
        raise UserError(f"experiment '{config.get('name')}' declares no verdicts (a `verdicts:` section)")
    rows = []
    grokking = {name: spec for name, spec in specs.items() if spec["study"] == "grokking"}
    if grokking:
        from .grokking.report import TABLES, read_table

        summary = read_table(tables, TABLES[1])
        rows += [row for name, spec in grokking.items() for row in grokking_rows(name, spec, summary)]
    if len(grokking) < len(specs):
        runs, steps = load_tables(tables)
        studies = config.get("studies") or {}
        rows += [row for name, spec in specs.items() if name not in grokking
                 for row in verdict_rows(name, spec, runs, steps, studies.get(spec["study"]))]
    frame = pd.DataFrame(rows)
    with atomic_path(tables / "verdicts.csv") as tmp:
        frame.to_csv(tmp, index=False)
    return frame
