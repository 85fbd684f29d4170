"""Early warning (METHODS.md §5): which logged metric rises before a run fails, and how far ahead.

From one early_warning study's rows of steps.csv and runs.csv (numpy and pandas only):
- `failure_step`: a run's failure, dated at its onset: a non-finite loss, the trainer's divergence
  stop, or the smoothed training loss >= its running minimum + `rise` for `persist_steps`;
- `labels`: at lead N a step is positive when the run fails within the next N steps, negative when
  it does not, excluded from the failure on (`eligible` also keeps negatives to the steps where that
  stratum's positives lie, so training time itself cannot separate them);
- `predictor_frame`: every predictor's value and slope at the metric steps, from data up to that step;
- `auroc` (ranks: Mann-Whitney), `pair_counts` per pair of runs, and the bootstrap over runs they allow;
- `summary_table`: the study's tidy table, `summary_<study>.csv`.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from .config import EarlyWarningConfig, validated
from .errors import UserError

CELL = ["variant", "depth", "lr"]
RUN = CELL + ["seed"]
# the primary comparison pairs steps of runs that differ only in their seed; the secondary one
# pools the LRs of one variant and depth (there the LR alone is a predictor, the baseline to beat)
SCOPES = {"within_cell": CELL, "across_lr": ["variant", "depth"]}
FEATURES = ("value", "slope")
FOLDS = 5  # cross-validation folds (by run) of the metric + LR logistic fit
# predictor -> (steps.csv column, slope taken of its log: a scale that grows multiplicatively)
PREDICTORS = {
    "train_loss": ("train_loss", False),  # its slope is the baseline "the loss's own slope"
    "grad_norm": ("grad_norm", True),
    "grad_norm_var": ("grad_norm_var", True),
    "spike_rate": ("spike_count", False),  # per step since the previous measurement, from the cumulative count
    "gss_rate": ("gss_spikes", False),  # the same for SPAM's per-element count (train.spike_scores)
    "spam_clipped_frac": ("spam_clipped_frac", False),
    "tev_mean": ("tev_mean", True),
    "tev_std": ("tev_std", True),
    "attn_logit_max": ("attn_logit_max_l", True),  # the max over layers of attn_logit_max_l<i>
    "mu_norm": ("mu_norm", True),
    "logits_mean": ("logits_mean", False),
    "logits_absmax": ("logits_absmax", True),
    "log_z_sq": ("log_z_sq", True),
}
RATES = ("spike_rate", "gss_rate")
COLUMNS = ["scope", "metric", "feature", "quantity", "lead_steps", "value", "ci_low", "ci_high", "n_runs",
           "n_failing", "n_pos", "n_neg"]


def settings(spec: dict | None) -> EarlyWarningConfig:
    return validated(EarlyWarningConfig, (spec or {}).get("early_warning") or {}, "early_warning")


# ----------------------------------------------------------------------------- labels


def smoothed_loss(step: np.ndarray, loss: np.ndarray, window: int) -> np.ndarray:
    """At each logged step t, the mean of the logged losses at steps in (t - window, t]."""
    lo = np.searchsorted(step, step - window, side="right")
    sums = np.concatenate([[0.0], np.cumsum(loss)])
    i = np.arange(len(step))
    return (sums[i + 1] - sums[lo]) / (i + 1 - lo)


def failure_step(step, loss, cfg: EarlyWarningConfig, stopped_at: float = np.nan) -> float:
    """The step a run's failure begins, NaN if it survived: the earliest of its first non-finite
    loss, the trainer's divergence stop (`stopped_at`), and the first logged step whose smoothed loss
    is >= its running minimum + `cfg.rise` and stays so for `cfg.persist_steps` (or until the run
    was stopped: a truncated excursion of a stopped run counts)."""
    step, loss = np.asarray(step, float), np.asarray(loss, float)
    order = np.argsort(step, kind="stable")
    step, loss = step[order], loss[order]
    bad = ~np.isfinite(loss)
    first_bad = step[bad][0] if bad.any() else np.nan
    candidates = [first_bad, float(stopped_at) if stopped_at is not None else np.nan]
    s, x = step[~bad & ~(step > first_bad)], loss[~bad & ~(step > first_bad)]
    if len(s):
        sm = smoothed_loss(s, x, cfg.smooth_steps)
        above = sm >= np.minimum.accumulate(sm) + cfg.rise
        truncated = bool(bad.any() or np.isfinite(candidates[1]))
        for i in np.flatnonzero(above):
            below = np.flatnonzero(~above[i:])
            end = s[i + below[0]] if below.size else s[-1]
            if end - s[i] >= cfg.persist_steps or (not below.size and truncated):
                candidates.append(s[i])
                break
    finite = [c for c in candidates if np.isfinite(c)]
    return float(min(finite)) if finite else np.nan


def labels(step, fail: float, lead: int) -> np.ndarray:
    """1: the run fails within the next `lead` steps (fail - lead <= step < fail); 0: it does not;
    -1: excluded (at or after the failure). Every step of a surviving run (fail NaN) is 0."""
    step = np.asarray(step, float)
    if not np.isfinite(fail):
        return np.zeros(len(step), int)
    return np.where(step >= fail, -1, (step >= fail - lead).astype(int))


def eligible(frame: pd.DataFrame, lead: int, stratum: np.ndarray) -> np.ndarray:
    """`labels` of every row of `frame` (columns step, fail), with the negatives of each stratum kept to
    the steps [min fail - lead, max fail) where its positives can lie; a stratum without a failing run
    gives no pairs and is left out (-1)."""
    step, fail = frame["step"].to_numpy(float), frame["fail"].to_numpy(float)
    out = np.full(len(frame), -1)
    for st in np.unique(stratum):
        m = stratum == st
        fails = fail[m][np.isfinite(fail[m])]
        if not fails.size:
            continue
        lab = np.where(np.isfinite(fail[m]), np.where(step[m] >= fail[m], -1, (step[m] >= fail[m] - lead)), 0)
        window = (step[m] >= fails.min() - lead) & (step[m] < fails.max())
        out[m] = np.where((lab == 0) & ~window, -1, lab)
    return out


# ----------------------------------------------------------------------------- predictors


def _slopes(s: np.ndarray, y: np.ndarray, at: np.ndarray, window: int) -> np.ndarray:
    """Least-squares slope of y(s) over the points with s in (t - window, t], at each t of `at`."""
    lo, hi = np.searchsorted(s, at - window, side="right"), np.searchsorted(s, at, side="right")
    s = s - (s[0] if len(s) else 0.0)

    def window_sum(a):
        c = np.concatenate([[0.0], np.cumsum(a)])
        return c[hi] - c[lo]

    n, sx, sy, sxx, sxy = hi - lo, window_sum(s), window_sum(y), window_sum(s * s), window_sum(s * y)
    den = n * sxx - sx * sx
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where((n >= 2) & (den > 0), (n * sxy - sx * sy) / den, np.nan)


def _series(g: pd.DataFrame, name: str) -> tuple[np.ndarray, np.ndarray] | None:
    """(steps, values) of one predictor in one run's rows (sorted by step), or None if not logged."""
    column, _ = PREDICTORS[name]
    cols = [c for c in g.columns if c.startswith(column)] if name == "attn_logit_max" else [column]
    if not cols or cols[0] not in g:
        return None
    x = g[cols].astype(float).max(axis=1, skipna=True) if len(cols) > 1 else g[cols[0]].astype(float)
    keep = x.notna().to_numpy()
    s, v = g["step"].to_numpy(float)[keep], x.to_numpy(float)[keep]
    if name in RATES and len(s):
        v = np.concatenate([[np.nan], np.diff(v) / np.maximum(np.diff(s), 1)])
    return (s, v) if np.isfinite(v).any() else None


def failures(steps: pd.DataFrame, runs: pd.DataFrame | None, cfg: EarlyWarningConfig) -> pd.DataFrame:
    """One row per run of `steps`: its keys and `fail`, the onset of its failure (NaN: it survived)."""
    stopped = {}
    if runs is not None and len(runs) and "diverged_step" in runs:
        div = runs["diverged"].astype(str).str.lower().isin(["true", "1", "1.0"]) if "diverged" in runs else True
        for r in runs[div].itertuples(index=False):
            stopped[tuple(getattr(r, k) for k in RUN)] = float(r.diverged_step)
    rows = []
    for key, g in steps.groupby(RUN, sort=True):
        rows.append({**dict(zip(RUN, key)), "fail": failure_step(g["step"], g["train_loss"], cfg,
                                                                   stopped.get(tuple(key), np.nan))})
    return pd.DataFrame(rows, columns=RUN + ["fail"])


def predictor_frame(steps: pd.DataFrame, runs: pd.DataFrame | None, cfg: EarlyWarningConfig) -> pd.DataFrame:
    """One row per run and metric step (the steps where the stability probe ran: tev_mean logged;
    every logged step if none did): RUN keys, step, fail, and `<predictor>:value` / `:slope`."""
    fails = failures(steps, runs, cfg).set_index(RUN)["fail"]
    frames = []
    for key, g in steps.groupby(RUN, sort=True):
        g = g.sort_values("step")
        at = g.loc[g["tev_mean"].notna(), "step"] if "tev_mean" in g else g["step"]
        at = at.drop_duplicates().to_numpy(float)
        out = pd.DataFrame({**dict(zip(RUN, key)), "step": at, "fail": fails.loc[key]})
        for name, (_, log) in PREDICTORS.items():
            series = _series(g, name)
            if series is None:
                continue
            s, v = series
            i = np.searchsorted(s, at, side="right") - 1
            out[f"{name}:value"] = np.where(i >= 0, v[np.maximum(i, 0)], np.nan)
            y = np.log(np.maximum(np.abs(v), 1e-30)) if log else v
            ok = np.isfinite(y)
            out[f"{name}:slope"] = _slopes(s[ok], y[ok], at, cfg.slope_steps)
        frames.append(out)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=RUN + ["step", "fail"])


# ----------------------------------------------------------------------------- AUROC and the bootstrap


def _ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks, ties given their average rank."""
    order = np.argsort(x, kind="mergesort")
    _, first, counts = np.unique(x[order], return_index=True, return_counts=True)
    ranks = np.empty(len(x))
    ranks[order] = np.repeat(first + (counts + 1) / 2, counts)
    return ranks


def auroc(score, label, strata=None) -> float:
    """P(a positive scores above a negative), ties 1/2, from the Mann-Whitney U of the ranks; with
    `strata`, over the pairs within a stratum only (their U and pair counts summed)."""
    score, label = np.asarray(score, float), np.asarray(label)
    strata = np.zeros(len(score)) if strata is None else np.asarray(strata)
    u = pairs = 0.0
    for st in np.unique(strata):
        m = strata == st
        pos, n_pos, n_neg = label[m] == 1, int((label[m] == 1).sum()), int((label[m] == 0).sum())
        keep = (label[m] == 1) | (label[m] == 0)
        r = _ranks(score[m][keep])
        u += r[pos[keep]].sum() - n_pos * (n_pos + 1) / 2
        pairs += n_pos * n_neg
    return u / pairs if pairs else np.nan


def pair_counts(score, label, run, stratum, n_runs: int) -> tuple[np.ndarray, np.ndarray]:
    """C[r, s]: pairs (positive step of run r, negative step of run s, in one stratum) in which the
    positive scores higher, ties 1/2; D[r, s]: all such pairs. AUROC = 1'C1 / 1'D1, and with runs
    drawn w_r times, w'Cw / w'Dw: the bootstrap over runs without re-sorting."""
    C, D = np.zeros((n_runs, n_runs)), np.zeros((n_runs, n_runs))
    for st in np.unique(stratum):
        m = stratum == st
        pos = {r: np.sort(score[m & (label == 1) & (run == r)]) for r in np.unique(run[m & (label == 1)])}
        for s in np.unique(run[m & (label == 0)]):
            neg = np.sort(score[m & (label == 0) & (run == s)])
            for r, p in pos.items():
                lo, hi = np.searchsorted(neg, p, side="left"), np.searchsorted(neg, p, side="right")
                C[r, s] += lo.sum() + 0.5 * (hi - lo).sum()
                D[r, s] += p.size * neg.size
    return C, D


def bootstrap_weights(cell: np.ndarray, replicates: int, rng: np.random.Generator) -> np.ndarray:
    """(replicates, runs): how often each run is drawn, runs resampled with replacement within their cell."""
    w = np.zeros((replicates, len(cell)))
    for c in np.unique(cell):
        members = np.flatnonzero(cell == c)
        draws = rng.integers(0, members.size, size=(replicates, members.size))
        w[:, members] = (draws[:, :, None] == np.arange(members.size)).sum(axis=1)
    return w


def _ratio(w: np.ndarray, C: np.ndarray, D: np.ndarray) -> np.ndarray:
    num, den = np.einsum("br,rs,bs->b", w, C, w), np.einsum("br,rs,bs->b", w, D, w)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)


def _interval(boot: np.ndarray) -> tuple[float, float]:
    boot = boot[np.isfinite(boot)]
    return (float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))) if boot.size else (np.nan, np.nan)


def warning_lead(leads: list[int], aurocs: np.ndarray, threshold: float) -> np.ndarray:
    """The largest lead up to which the AUROC stays >= threshold at every lead of the grid (0: not even
    at the shortest); `aurocs` is (..., len(leads)), NaN counts as below."""
    ok = np.cumprod(np.nan_to_num(aurocs, nan=0.0) >= threshold, axis=-1).astype(bool)
    return np.where(ok.any(axis=-1), np.asarray(leads)[np.maximum(ok.sum(axis=-1) - 1, 0)], 0)


def _logistic(X: np.ndarray, y: np.ndarray, ridge: float = 1e-3, iterations: int = 50) -> np.ndarray:
    """Ridge-penalized logistic regression by Newton's method (the intercept is column 0)."""
    beta = np.zeros(X.shape[1])
    for _ in range(iterations):
        p = 1 / (1 + np.exp(-np.clip(X @ beta, -30, 30)))
        hess = (X * (p * (1 - p))[:, None]).T @ X + ridge * np.eye(X.shape[1])
        step = np.linalg.solve(hess, X.T @ (p - y) + ridge * beta)
        beta -= step
        if np.abs(step).max() < 1e-8:
            break
    return beta


def with_lr(x: np.ndarray, lr: np.ndarray, y: np.ndarray, fold: np.ndarray) -> np.ndarray:
    """Out-of-fold scores of a logistic fit of y on (log LR, x), folds by run."""
    out = np.full(len(x), np.nan)
    X = np.column_stack([np.log(lr), x])
    for f in np.unique(fold):
        train, test = fold != f, fold == f
        if len(np.unique(y[train])) < 2:
            continue
        mu, sd = X[train].mean(0), X[train].std(0)
        sd[sd == 0] = 1.0
        design = np.column_stack([np.ones(len(X)), (X - mu) / sd])
        out[test] = design[test] @ _logistic(design[train], y[train].astype(float))
    return out


# ----------------------------------------------------------------------------- the study's table


def runs_and_replicates(frame: pd.DataFrame, cfg: EarlyWarningConfig) -> tuple[np.ndarray, int, np.ndarray]:
    """Each row's run index (runs in key order), the number of runs, and the bootstrap replicates
    (runs drawn within their cell) that every AUROC of the frame shares."""
    run = frame.groupby(RUN, sort=True).ngroup().to_numpy()
    keys = frame.drop_duplicates(RUN).sort_values(RUN)
    weights = bootstrap_weights(keys.groupby(CELL).ngroup().to_numpy(), cfg.bootstrap, np.random.default_rng(cfg.seed))
    return run, int(run.max()) + 1, weights


def summary_table(runs: pd.DataFrame, steps: pd.DataFrame, spec: dict) -> pd.DataFrame:
    """Per scope (within_cell: the primary comparison; across_lr), predictor, feature and lead: the
    AUROC with its bootstrap interval over runs; per predictor and feature the warning lead; in
    across_lr, the LR alone, metric + LR (cross-validated) and its gain over the LR alone."""
    cfg = settings(spec)
    frame = predictor_frame(steps, runs, cfg) if len(steps) else pd.DataFrame()
    if frame.empty:
        return pd.DataFrame(columns=COLUMNS)
    run, n_runs, weights = runs_and_replicates(frame, cfg)
    leads = sorted(cfg.leads)
    fold, lr = run % FOLDS, frame["lr"].to_numpy(float)  # runs in key order: a cell's seeds in different folds
    frame["lr:value"] = np.log(lr)
    rows = []

    def score_rows(scope, metric, feature, scores, stratum):
        """AUROC rows of one score at every lead, then its warning-lead row; the replicates (runs drawn)."""
        boots = []
        for lead in leads:
            lab = eligible(frame, lead, stratum)
            s = scores(lab) if callable(scores) else scores
            ok = (lab >= 0) & np.isfinite(s)
            C, D = pair_counts(np.where(ok, s, 0.0), np.where(ok, lab, -1), run, stratum, n_runs)
            point, boot = _ratio(np.ones((1, n_runs)), C, D)[0], _ratio(weights, C, D)
            boots.append(boot)
            used, failing = np.unique(run[ok]), np.unique(run[ok & (lab == 1)])
            rows.append({"scope": scope, "metric": metric, "feature": feature, "quantity": "auroc",
                         "lead_steps": lead, "value": point, **dict(zip(("ci_low", "ci_high"), _interval(boot))),
                         "n_runs": used.size, "n_failing": failing.size, "n_pos": int((ok & (lab == 1)).sum()),
                         "n_neg": int((ok & (lab == 0)).sum())})
        points, stacked = np.array([r["value"] for r in rows[-len(leads):]]), np.stack(boots, axis=-1)
        lead, boot_leads = (np.where(np.isfinite(a).any(axis=-1), warning_lead(leads, a, cfg.warn_auroc), np.nan)
                            for a in (points, stacked))  # no AUROC at any lead: no lead either
        rows.append({**rows[-len(leads)], "quantity": "warning_lead", "lead_steps": np.nan, "value": float(lead),
                     **dict(zip(("ci_low", "ci_high"), _interval(boot_leads)))})
        return np.stack(boots)

    names = [n for n in PREDICTORS if f"{n}:value" in frame]
    for scope, by in SCOPES.items():
        stratum = frame.groupby(by, sort=True).ngroup().to_numpy()
        for name in names:
            for feature in FEATURES:
                score_rows(scope, name, feature, frame[f"{name}:{feature}"].to_numpy(float), stratum)
        if scope != "across_lr":
            continue
        lr_boot = score_rows(scope, "lr", "value", frame["lr:value"].to_numpy(float), stratum)
        lr_rows = rows[-len(leads) - 1:-1]
        for name in names:
            for feature in FEATURES:
                x = frame[f"{name}:{feature}"].to_numpy(float)
                if PREDICTORS[name][1] and feature == "value":
                    x = np.log(np.maximum(np.abs(x), 1e-30))

                def combined(lab, x=x):
                    ok = (lab >= 0) & np.isfinite(x)
                    out = np.full(len(x), np.nan)
                    out[ok] = with_lr(x[ok], lr[ok], (lab[ok] == 1).astype(int), fold[ok])
                    return out

                boot = score_rows(scope, name, f"{feature}+lr", combined, stratum)
                for i, (combo, base) in enumerate(zip(rows[-len(leads) - 1:-1], lr_rows)):
                    rows.append({**combo, "quantity": "gain_over_lr", "value": combo["value"] - base["value"],
                                 **dict(zip(("ci_low", "ci_high"), _interval(boot[i] - lr_boot[i])))})
    return pd.DataFrame(rows, columns=COLUMNS)


# ----------------------------------------------------------------------------- one pre-registered test


MIN_FAILING = 5  # METHODS.md §5b: fewer failing runs than this leave the test undecided


def preregistered_test(runs: pd.DataFrame, steps: pd.DataFrame, spec: dict, metric: str = "attn_logit_max",
                       feature: str = "value", lead: int = 50, baseline: tuple[str, str] = ("train_loss", "slope"),
                       lrs: list[float] | None = None) -> dict:
    """METHODS.md §5b: the one AUROC fixed before the runs (`metric`'s `feature` at `lead`, within
    cell, the cells pooled, bootstrap over runs within their cell), its decision, and beside it the
    baseline's AUROC and the difference of the two over the same replicates. `lrs`: the cells' LRs."""
    cfg = settings(spec)
    frame = predictor_frame(steps, runs, cfg) if len(steps) else pd.DataFrame()
    if lrs is not None and len(frame):
        frame = frame[frame["lr"].astype(float).isin([float(x) for x in lrs])].reset_index(drop=True)
    if frame.empty or f"{metric}:{feature}" not in frame:
        raise UserError(f"early warning: no logged {metric} to test (is this an early_warning study's tables?)")
    run, n_runs, weights = runs_and_replicates(frame, cfg)
    stratum = frame.groupby(SCOPES["within_cell"], sort=True).ngroup().to_numpy()
    lab = eligible(frame, lead, stratum)
    out = {"metric": metric, "feature": feature, "lead_steps": lead, "n_runs": n_runs,
           "n_failing": int(np.unique(run[lab == 1]).size)}
    boots = {}
    for name, (m, f) in {"test": (metric, feature), "baseline": baseline}.items():
        s = frame[f"{m}:{f}"].to_numpy(float)
        ok = (lab >= 0) & np.isfinite(s)
        C, D = pair_counts(np.where(ok, s, 0.0), np.where(ok, lab, -1), run, stratum, n_runs)
        boots[name] = _ratio(weights, C, D)
        out[f"{name}_auroc"] = float(_ratio(np.ones((1, n_runs)), C, D)[0])
        out[f"{name}_ci_low"], out[f"{name}_ci_high"] = _interval(boots[name])
    out["baseline"] = f"{baseline[0]}:{baseline[1]}"
    out["difference"] = out["test_auroc"] - out["baseline_auroc"]
    out["difference_ci_low"], out["difference_ci_high"] = _interval(boots["test"] - boots["baseline"])
    if out["n_failing"] < MIN_FAILING:
        out["decision"] = f"undecided: {out['n_failing']} failing runs, fewer than {MIN_FAILING}"
    elif out["test_ci_low"] > 0.5:
        strength = "as strong as first reported" if out["test_auroc"] >= cfg.warn_auroc else \
            f"weaker than first reported (below {cfg.warn_auroc})"
        out["decision"] = f"replicated ({strength})"
    else:
        out["decision"] = "not replicated (the interval reaches 0.5)"
    return out
