"""Early warning (issue 17; METHODS.md §5): AUROC, labels, a planted predictor, the bootstrap over
runs, and the study kind from tables to figures, on synthetic runs; the committed runs as a smoke test."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from stabilab import early_warning as ew
from stabilab.errors import UserError
from stabilab.experiment import validate
from stabilab.tables import study_summary

ROOT = Path(__file__).resolve().parents[1]
CFG = ew.settings({})


def brute_force_auroc(score, label, strata):
    pairs = right = 0.0
    for i, j in itertools.product(range(len(score)), repeat=2):
        if label[i] == 1 and label[j] == 0 and strata[i] == strata[j]:
            pairs += 1
            right += 1.0 if score[i] > score[j] else 0.5 if score[i] == score[j] else 0.0
    return right / pairs


def test_auroc_from_ranks_equals_the_pairwise_count_with_ties_strata_and_excluded_rows():
    rng = np.random.default_rng(0)
    for _ in range(20):
        n = 60
        score = rng.integers(0, 8, n).astype(float)  # many ties
        label = rng.choice([-1, 0, 1], n, p=[0.2, 0.5, 0.3])
        strata = rng.integers(0, 3, n)
        assert ew.auroc(score, label, strata) == pytest.approx(brute_force_auroc(score, label, strata))
        run = rng.integers(0, 7, n)  # per-run pair counts give the same AUROC, and a weighted one by repetition
        C, D = ew.pair_counts(score, label, run, strata, 7)
        assert C.sum() / D.sum() == pytest.approx(ew.auroc(score, label, strata))
        w = rng.integers(0, 3, 7).astype(float)
        if (w @ D @ w) > 0:
            assert (w @ C @ w) / (w @ D @ w) == pytest.approx(brute_force_weighted(score, label, strata, run, w))
    assert ew.auroc([1, 2, 3, 4], [0, 0, 1, 1]) == 1.0 and ew.auroc([4, 3, 2, 1], [0, 0, 1, 1]) == 0.0
    assert np.isnan(ew.auroc([1, 2], [0, 0]))


def brute_force_weighted(score, label, strata, run, w):
    pairs = right = 0.0
    for i, j in itertools.product(range(len(score)), repeat=2):
        if label[i] == 1 and label[j] == 0 and strata[i] == strata[j]:
            weight = w[run[i]] * w[run[j]]
            pairs += weight
            right += weight * (1.0 if score[i] > score[j] else 0.5 if score[i] == score[j] else 0.0)
    return right / pairs


def trace(fail_at=None, steps=1000, every=25, jump=2.0, nan=False):
    step = np.arange(every, steps + 1, every, dtype=float)
    loss = 5.0 - 0.5 * step / steps
    if fail_at is not None:
        loss = np.where(step >= fail_at, np.nan if nan else loss + jump, loss)
    return step, loss


def test_a_run_that_blows_up_at_k_has_positives_exactly_in_the_lead_window_and_none_after():
    step, loss = trace(fail_at=600)
    k = ew.failure_step(step, loss, CFG)
    assert k == 600
    for lead in (50, 200, 2000):
        lab = ew.labels(step, k, lead)
        assert set(step[lab == 1]) == {s for s in step if k - lead <= s < k}
        assert (lab[step >= k] == -1).all() and (lab[step < k - lead] == 0).all()
    assert ew.failure_step(*trace(fail_at=400, nan=True), CFG) == 400  # a non-finite loss
    survived_step, survived_loss = trace()
    assert np.isnan(ew.failure_step(survived_step, survived_loss, CFG))
    assert (ew.labels(survived_step, np.nan, 300) == 0).all()


def test_the_failure_needs_the_rise_to_last_unless_the_trainer_stopped_the_run():
    step, loss = trace()
    brief = loss + np.where((step >= 500) & (step < 600), 2.0, 0.0)  # up 100 steps, then back
    assert np.isnan(ew.failure_step(step, brief, CFG))
    small = loss + np.where(step >= 500, 0.2, 0.0)  # below the 0.3-nat rise
    assert np.isnan(ew.failure_step(step, small, CFG))
    cut = step <= 575  # the trainer stopped it 75 steps into the rise: a truncated excursion counts
    assert ew.failure_step(step[cut], (loss + np.where(step >= 500, 2.0, 0.0))[cut], CFG, stopped_at=575) == 500
    assert ew.failure_step(step, loss, CFG, stopped_at=900) == 900  # the trainer's stop, whatever the loss


def synthetic_study(seeds=8, lrs=(0.1,), steps=4000, signal=10.0, noise=0.05, seed=0, study="ew"):
    """Runs of one variant: half of the seeds fail at a step in [2500, 3500]; `mu_norm` rises in the
    300 steps before the failure (by `signal`, against `noise`); `tev_mean` is noise."""
    rng = np.random.default_rng(seed)
    step = np.arange(25, steps + 1, 25, dtype=float)
    runs, frames = [], []
    for lr in lrs:
        for s in range(seeds):
            k = float(rng.integers(100, 140) * 25) if s % 2 == 0 else np.nan
            loss = 5.0 - 0.3 * step / steps + 0.01 * rng.standard_normal(len(step))
            mu = 1.0 + noise * rng.standard_normal(len(step))
            if np.isfinite(k):
                loss = np.where(step >= k, loss + 2.0, loss)
                mu = mu + signal * np.clip((step - (k - 300)) / 300, 0, None) * (step < k)
            keep = step < k + 100 if np.isfinite(k) else np.ones(len(step), bool)  # stopped 100 steps in
            frames.append(pd.DataFrame({"study": study, "variant": "baseline", "depth": 2, "lr": lr, "seed": s,
                                        "step": step[keep], "tokens": step[keep] * 64, "train_loss": loss[keep],
                                        "mu_norm": mu[keep], "tev_mean": 0.02 + 0.001 * rng.standard_normal(
                                            keep.sum()), "grad_norm": 1.0}))
            runs.append({"study": study, "variant": "baseline", "depth": 2, "lr": lr, "seed": s,
                         "steps": int(step[keep][-1]), "diverged": bool(np.isfinite(k)),
                         "diverged_step": k + 100 if np.isfinite(k) else np.nan, "initial_loss": 5.0,
                         "final_val_loss": np.nan if np.isfinite(k) else 4.7})
    return pd.DataFrame(runs), pd.concat(frames, ignore_index=True)


def rows(table, metric, feature="value", scope="within_cell", quantity="auroc"):
    t = table[(table.metric == metric) & (table.feature == feature) & (table.scope == scope)
              & (table.quantity == quantity)]
    return t.set_index("lead_steps") if quantity != "warning_lead" else t.iloc[0]


def test_a_planted_predictor_warns_up_to_its_lead_and_an_irrelevant_metric_does_not():
    runs, steps = synthetic_study()
    table = ew.summary_table(runs, steps, {"early_warning": {"bootstrap": 200}})
    mu, tev = rows(table, "mu_norm"), rows(table, "tev_mean")
    assert (mu.loc[[50, 100, 200], "value"] > 0.97).all() and mu.loc[300, "value"] > 0.9  # k - 300: no rise yet
    assert mu.loc[2000, "value"] < 0.65 and mu.loc[2000, "value"] < mu.loc[500, "value"] < mu.loc[300, "value"]
    assert tev.loc[200:, "value"].between(0.35, 0.65).all()  # at 50 there are 8 positive steps: noisy
    assert rows(table, "mu_norm", quantity="warning_lead")["value"] in (300, 500)
    assert rows(table, "tev_mean", quantity="warning_lead")["value"] == 0
    assert mu.loc[100, "n_runs"] == 8 and mu.loc[100, "n_failing"] == 4
    assert set(table.quantity) == {"auroc", "warning_lead", "gain_over_lr"}


def test_the_bootstrap_interval_holds_the_estimate_and_narrows_with_more_runs():
    widths = []
    for seeds in (4, 32):
        runs, steps = synthetic_study(seeds=seeds, signal=0.06, seed=1)  # a weak signal: AUROC well below 1
        mu = rows(ew.summary_table(runs, steps, {"early_warning": {"bootstrap": 300, "leads": [300]}}), "mu_norm")
        point, low, high = mu.loc[300, ["value", "ci_low", "ci_high"]]
        assert low <= point <= high and 0.5 < point < 0.99
        widths.append(high - low)
    assert widths[1] < 0.75 * widths[0]


def test_metric_plus_lr_is_compared_with_the_lr_alone_across_lrs():
    runs, steps = synthetic_study(lrs=(0.1, 0.3))
    table = ew.summary_table(runs, steps, {"early_warning": {"bootstrap": 100, "leads": [100, 300]}})
    lr = rows(table, "lr", scope="across_lr")
    assert lr["value"].between(0.3, 0.7).all()  # half the seeds fail at either LR: the LR tells nothing
    gain = rows(table, "mu_norm", "value+lr", scope="across_lr", quantity="gain_over_lr")
    assert (gain["value"] > 0.3).all() and (gain["ci_low"] > 0).all()
    assert rows(table, "lr", scope="within_cell").empty  # constant within a cell


def test_the_study_kind_writes_its_table_and_figures(tmp_path):
    from stabilab.figures import draw_figures
    from stabilab.studies import KINDS, expected_figures

    runs, steps = synthetic_study(seeds=4)
    spec = {"kind": "early_warning", "variants": ["baseline"], "depths": [2], "lrs": [0.1], "seeds": [0, 1, 2, 3],
            "early_warning": {"bootstrap": 50}}
    tables = tmp_path / "tables"
    tables.mkdir()
    runs.to_csv(tables / "runs.csv", index=False)
    steps.to_csv(tables / "steps.csv", index=False)
    summary = study_summary(runs, "ew", "early_warning", steps, spec)
    assert {"study", "kind", "scope", "metric", "feature", "lead_steps", "value", "ci_low", "ci_high", "n_runs",
            "n_failing"} <= set(summary.columns)
    summary.to_csv(tables / "summary_ew.csv", index=False)
    (tables / "studies.json").write_text(json.dumps({"ew": spec}))
    written = draw_figures(tables, tmp_path / "figures")
    for png in expected_figures({"ew": spec}):
        assert (tmp_path / "figures" / png).stat().st_size > 10_000
    assert len(written) == 2 * len(KINDS["early_warning"].figures)
    for caption in KINDS["early_warning"].figures.values():
        assert (ROOT / "workflow" / "report" / caption).read_text().strip()


def test_the_failure_traces_draw_as_many_failing_runs_as_their_title_counts():
    """With more failing runs than max_runs, each panel draws max_runs of them (in the variant's
    colour) and every surviving seed of their cells (grey), as the title says."""
    import matplotlib.colors as mcolors

    from stabilab.figures.early_warning import failure_traces

    runs, steps = synthetic_study(seeds=12)  # 6 failing, 6 surviving, one cell
    fig = failure_traces(steps, runs, "ew", {}, {"baseline": "#1f77b4"}, max_runs=4)
    ax = fig.axes[0]
    colours = [mcolors.to_hex(line.get_color()) for line in ax.get_lines() if len(line.get_xdata()) > 2]
    assert colours.count("#1f77b4") == 4 and colours.count(mcolors.to_hex("0.65")) == 6
    assert "4 of 6 failing runs shown" in fig._suptitle.get_text()


def test_the_auroc_figure_is_small_multiples_in_readers_names_with_the_verdicts_metrics_first():
    """One panel per metric (no 11 lines on one axis), the metrics the verdicts name first (TEV here; the
    loss), panel titles and legend in readers' words (no 'train_loss', 'tev_mean'), the loss's slope drawn
    in every other panel as the baseline."""
    import re

    import matplotlib.pyplot as plt

    from stabilab.figures.early_warning import METRIC_NAMES, auroc_vs_lead

    runs, steps = synthetic_study(seeds=6)
    summary = study_summary(runs, "ew", "early_warning", steps,
                            {"kind": "early_warning", "early_warning": {"bootstrap": 20}})
    fig = auroc_vs_lead(summary, "ew")
    titles = [ax.get_title() for ax in fig.axes if ax.get_visible() and ax.get_title()]
    present = set(summary.dropna(subset=["value"])["metric"]) - {"lr"}
    assert sorted(titles) == sorted(METRIC_NAMES[m] for m in present)
    assert titles[:2] == ["training loss", "TEV mean"]  # the verdict's metrics first (no attention logit here)
    snake = re.compile(r"[a-z]+_[a-z]+")
    legend = [t.get_text() for leg in fig.legends for t in leg.get_texts()]
    assert legend and not any(snake.search(text) for text in legend + titles)
    others = [ax for ax in fig.axes if ax.get_title() not in ("", "training loss")]
    assert all(any(line.get_linestyle() == ":" and line.get_color() == "k" for line in ax.get_lines())
               for ax in others)
    plt.close(fig)


def test_labels_are_configured_with_documented_checked_fields():
    base = {"name": "x", "studies": {"ew": {"kind": "early_warning", "variants": ["baseline"], "depths": [1],
                                            "lrs": [0.1], "early_warning": {"rise": 0.5, "leads": [50, 100]}}}}
    validate(base)
    base["studies"]["ew"]["early_warning"] = {"rise": -1}
    with pytest.raises(UserError, match="early_warning.rise"):
        validate(base)
    assert ew.settings({"early_warning": {"persist_steps": 10}}).persist_steps == 10


@pytest.mark.parametrize("name", ["oec", "two_instabilities"])
def test_smoke_on_the_committed_runs(name):
    """Different LRs, not the primary comparison: no claim on the values; every run the trainer
    stopped is a failure here, and no failure comes after the trainer's stop."""
    tables = ROOT / "results" / name / "tables"
    runs, steps = pd.read_csv(tables / "runs.csv"), pd.read_csv(tables / "steps.csv")
    fails = ew.failures(steps, runs, CFG).merge(runs, on=ew.RUN)
    diverged = fails["diverged"].astype(bool)
    assert np.isfinite(fails.loc[diverged, "fail"]).all()
    assert (fails.loc[diverged, "fail"] <= fails.loc[diverged, "diverged_step"]).all()
    table = ew.summary_table(runs, steps, {"early_warning": {"bootstrap": 20, "leads": [50, 200]}})
    assert list(table.columns) == ew.COLUMNS and len(table)
    for _, g in table.groupby(["scope", "metric", "feature"]):  # a warning lead exactly where an AUROC exists
        no_auroc = g.loc[g.quantity == "auroc", "value"].isna().all()
        assert (g.loc[g.quantity == "warning_lead", "value"].isna() == no_auroc).all()


def test_the_preset_has_three_mechanisms_with_eight_seeds_per_cell_and_stable_twins():
    from stabilab.experiment import load_experiment, runs

    cfg = load_experiment(ROOT / "configs" / "early_warning.yaml")
    studies = cfg["studies"]
    assert {s["kind"] for s in studies.values()} == {"early_warning"} and len(runs(cfg)) >= 60
    assert all(len(s["seeds"]) >= 8 for s in studies.values())
    edges = [name for name in studies if not name.endswith("_twin")]
    assert len(edges) == 3 and all(f"{name}_twin" in studies and len(studies[name]["lrs"]) >= 2 for name in edges)


def test_the_preregistered_test_decides_by_its_rule_and_agrees_with_the_studys_table():
    """METHODS.md §5b: replicated when the interval is above 0.5, not when it reaches it, undecided
    with fewer than 5 failing runs; the point and interval are the study table's within-cell row."""
    runs, steps = synthetic_study(seeds=12, lrs=(0.1, 0.3))
    spec = {"early_warning": {"bootstrap": 200}}
    out = ew.preregistered_test(runs, steps, spec, metric="mu_norm", lead=100)
    row = rows(ew.summary_table(runs, steps, spec), "mu_norm").loc[100]
    assert (out["test_auroc"], out["test_ci_low"], out["test_ci_high"]) == pytest.approx(
        (row["value"], row["ci_low"], row["ci_high"]))
    assert out["decision"] == "replicated (as strong as first reported)" and out["n_failing"] == 12
    assert out["difference"] == pytest.approx(out["test_auroc"] - out["baseline_auroc"])
    assert out["difference_ci_low"] <= out["difference"] <= out["difference_ci_high"]
    noise = ew.preregistered_test(runs, steps, spec, metric="tev_mean", lead=100)
    assert noise["decision"] == "not replicated (the interval reaches 0.5)"
    few = ew.preregistered_test(runs[runs.seed < 4], steps[steps.seed < 4], spec, metric="mu_norm", lead=100,
                                lrs=[0.1])
    assert few["decision"] == "undecided: 2 failing runs, fewer than 5"
