"""Verdict tables: paired differences over seeds, the sign test, and each arm at its own best LR."""

from __future__ import annotations

import itertools
import math

import pandas as pd
import pytest

from stabilab.errors import UserError
from stabilab.verdicts import paired, sign_test_p, verdict_rows


@pytest.mark.parametrize("pos, neg", [(3, 0), (0, 4), (5, 0), (4, 1), (2, 2), (7, 3), (0, 1)])
def test_the_sign_test_counts_every_sign_pattern_at_least_as_extreme(pos, neg):
    """Its definition by enumeration: of the 2^n equally likely sign patterns under no difference,
    the share whose count of positives is at least as far from n/2 as the one observed."""
    n = pos + neg
    patterns = list(itertools.product((0, 1), repeat=n))
    extreme = sum(abs(sum(p) - n / 2) >= abs(pos - n / 2) for p in patterns)
    assert sign_test_p(pos, neg) == pytest.approx(extreme / len(patterns))


def test_three_seeds_of_one_sign_read_as_consistent_never_as_significant():
    r = paired({0: 4.10, 1: 4.12, 2: 4.11}, {0: 4.08, 1: 4.11, 2: 4.09})
    assert r["reading"] == "lower in 3 of 3 seeds" and r["p_sign"] == 0.25
    assert r["diff_mean"] == pytest.approx(-0.05 / 3) and r["diff_min"] == pytest.approx(-0.02)


def test_a_gap_inside_the_seed_spread_is_no_difference_measured():
    r = paired({0: 4.10, 1: 4.20, 2: 4.00}, {0: 4.05, 1: 4.25, 2: 3.99})
    assert r["reading"].startswith("no difference measured (2 lower, 1 higher")


def test_two_seeds_are_not_tested_and_only_shared_seeds_pair():
    r = paired({0: 1.0, 1: 2.0, 5: 3.0}, {0: 0.5, 1: 1.5, 2: 9.0})
    assert r["n"] == 2 and r["seeds"] == "0 1" and r["reading"] == "n = 2 < 3: not tested"


def test_a_diverged_run_loses_its_pair():
    r = paired({0: 4.1, 1: 4.2, 2: 4.3}, {0: math.inf, 1: 4.0, 2: 4.1})
    assert r["diff_mean"] == math.inf and r["reading"].startswith("no difference measured")
    assert r["diff_finite_mean"] == pytest.approx(-0.2)


def _runs(losses: dict) -> pd.DataFrame:
    """runs.csv rows: {(variant, lr): [loss per seed]}; None: diverged."""
    rows = [{"study": "lr", "variant": v, "depth": 6, "lr": lr, "seed": s, "final_val_loss": x,
             "diverged": x is None, "git_commit": "a" * 40, "compile_mode": "reduce-overhead"}
            for (v, lr), xs in losses.items() for s, x in enumerate(xs)]
    return pd.DataFrame(rows)


def test_each_arm_is_compared_at_its_own_best_lr_and_an_edge_is_flagged():
    runs = _runs({("base", 1e-3): [4.5, 4.6, 4.55], ("base", 3e-3): [4.3, 4.35, 4.32], ("base", 1e-2): [4.4] * 3,
                  ("mlra", 1e-3): [4.4, 4.45, 4.42], ("mlra", 3e-3): [4.5, 4.5, 4.6], ("mlra", 1e-2): [None] * 3})
    spec = {"study": "lr", "metric": "final_val_loss", "arms": ["base", "mlra"], "over": "best_lr"}
    [row] = verdict_rows("v", spec, runs, None, {"lrs": [1e-3, 3e-3, 1e-2]})
    assert (row["lr_a"], row["lr_b"]) == (3e-3, 1e-3) and row["best_lr_inside_grid"] is False
    assert row["reading"] == "higher in 3 of 3 seeds" and row["git_commit"] == "aaaaaaa"
    [row] = verdict_rows("v", {**spec, "arms": ["base", "base"]}, runs, None, {"lrs": [1e-3, 3e-3, 1e-2]})
    assert row["best_lr_inside_grid"] is True


def test_an_unknown_arm_or_metric_is_one_line():
    runs = _runs({("base", 1e-3): [4.5, 4.6, 4.55]})
    with pytest.raises(UserError, match="no run of variant 'spam'"):
        verdict_rows("v", {"study": "lr", "metric": "final_val_loss", "arms": ["base", "spam"]}, runs, None)
    with pytest.raises(UserError, match="'nope' is not a column of runs.csv"):
        verdict_rows("v", {"study": "lr", "metric": "nope", "arms": ["base", "base"]}, runs, None)


def test_over_the_sweep_each_seeds_sensitivity_is_paired_and_both_diverged_is_said():
    from stabilab.tables import sweep_values

    runs = _runs({("base", 1e-3): [4.5, 4.6, 4.55], ("base", 3e-3): [4.3, 4.35, 4.32], ("base", 1.0): [None] * 3,
                  ("oec", 1e-3): [4.4, 4.45, 4.42], ("oec", 3e-3): [4.31, 4.36, 4.3], ("oec", 1.0): [None] * 3})
    runs["initial_loss"], runs["vocab_size"] = 10.8, 50257
    spec = {"study": "lr", "metric": "lr_sensitivity_oec", "arms": ["base", "oec"], "over": "sweep", "lrs": "sub"}
    [row] = verdict_rows("v", spec, runs, None, {"lrs": [1e-3, 3e-3, 1.0], "sensitivity_lrs": [1e-3, 3e-3]})
    sub = runs[runs.lr < 1]
    a, b = (sweep_values(sub[sub.variant == v], {1e-3, 3e-3})["lr_sensitivity_oec"] for v in ("base", "oec"))
    assert row["diff_mean"] == pytest.approx(sum(b[s] - a[s] for s in range(3)) / 3) and row["lrs"] == "0.001 0.003"
    assert row["reading"] == "lower in 3 of 3 seeds"
    [*_, at_1] = verdict_rows("v", {**spec, "metric": "final_val_loss", "over": "lr"}, runs, None)
    assert at_1["lr_a"] == 1.0 and at_1["reading"] == "both diverged in 3 of 3 seeds" and at_1["b_diverged"] == 3


def test_a_preset_inherits_no_verdicts_and_a_verdicts_arm_must_be_in_its_study():
    from pathlib import Path

    from stabilab.config import deep_merge
    from stabilab.experiment import load_experiment, validate

    root = Path(__file__).resolve().parents[1]
    assert "center_sensitivity" in load_experiment(root / "configs/oec.yaml")["verdicts"]
    assert not load_experiment(root / "configs/early_warning.yaml").get("verdicts")  # base: oec.yaml
    bad = {"verdicts": {"v": {"study": "lr", "arms": ["baseline", "mlra"]}}}
    with pytest.raises(UserError, match="verdicts.v.arms: mlra not a variant of study lr"):
        validate(deep_merge(load_experiment(root / "configs/oec.yaml"), bad))


def test_stabilab_verdicts_puts_the_verdicts_first_on_the_reports_front_page(tmp_path, capsys):
    """`stabilab verdicts` rewrites headline.html (the report's front page) with the verdict tables before the
    headline numbers: a preset's report opens on what its claims came to, per claim, one row per comparison."""
    import shutil
    from pathlib import Path

    from stabilab.cli import main

    root = Path(__file__).resolve().parents[1]
    tables = tmp_path / "tables"
    shutil.copytree(root / "results" / "oec" / "tables", tables)
    (tables / "headline.html").unlink()
    assert main(["verdicts", "--config", str(root / "configs" / "oec.yaml"), "--tables", str(tables)]) == 0
    assert f"report: {tables / 'headline.html'}" in capsys.readouterr().out
    page = (tables / "headline.html").read_text()
    verdicts = pd.read_csv(tables / "verdicts.csv")
    assert page.index("<strong>Verdicts</strong>") < page.index("<strong>lr</strong> (lr study)")
    assert page.count("<table") == verdicts["verdict"].nunique() + 1  # one per claim, then the headline table
    assert page.count("n = 2 &lt; 3: not tested") == (verdicts["reading"] == "n = 2 < 3: not tested").sum() > 0
    assert "μ-centering lowers LR sensitivity" in page or "mu-centering lowers LR sensitivity" in page


def _grok_summary(acc: dict) -> pd.DataFrame:
    """A grokking_summary.csv frame: acc[(variant, beta2)] = final test accuracies of seeds 0, 1, 2, ..."""
    return pd.DataFrame([{"operation": "add", "modulus": 113, "variant": variant, "seed": seed, "beta2": beta2,
                          "final_test_acc": a, "git_commit": "abcdef0123"}
                         for (variant, beta2), accs in acc.items() for seed, a in enumerate(accs)])


def test_a_grokking_verdict_pairs_seeds_within_each_beta2_never_across():
    """study: grokking, by: [beta2]: one row per beta2, each pairing the arms' runs of that beta2 seed by seed;
    a beta2 where one arm has fewer than 3 seeds is not tested, one where an arm has no run gives no row."""
    from stabilab.verdicts import grokking_rows

    summary = _grok_summary({("softmax_fp32", 0.99): [0.01, 0.04, 0.02], ("stablemax", 0.99): [0.78, 0.93, 0.91],
                             ("softmax_fp32", 0.999): [0.50, 0.01], ("stablemax", 0.999): [0.86, 0.98],
                             ("stablemax", 0.9): [0.5, 0.5, 0.5]})
    spec = {"metric": "final_test_acc", "arms": ["softmax_fp32", "stablemax"], "by": ["beta2"]}
    rows = {r["beta2"]: r for r in grokking_rows("v", spec, summary)}
    assert set(rows) == {0.99, 0.999}
    assert rows[0.99]["reading"] == "higher in 3 of 3 seeds" and rows[0.99]["git_commit"] == "abcdef0"
    assert rows[0.99]["diff_min"] == pytest.approx(0.77) and rows[0.99]["diff_max"] == pytest.approx(0.89)
    assert rows[0.999]["reading"] == "n = 2 < 3: not tested"
    # without `by`, runs of one seed at two beta2 would be paired as one: refused
    with pytest.raises(UserError, match="a seed of one arm appears twice"):
        grokking_rows("v", {**spec, "by": []}, summary)
    with pytest.raises(UserError, match="'colour' is not a column of grokking_summary.csv"):
        grokking_rows("v", {**spec, "by": ["colour"]}, summary)
    with pytest.raises(UserError, match="no operation / modulus / beta2 where both softmax_fp32 and stablemax"):
        grokking_rows("v", spec, _grok_summary({("softmax_fp32", 0.999): [0.0] * 3, ("stablemax", 0.99): [0.9] * 3}))
    with pytest.raises(UserError, match="no grokking run of variant 'perpgrad'"):
        grokking_rows("v", {**spec, "arms": ["perpgrad", "stablemax"]}, summary)


def test_stabilab_verdicts_of_a_grokking_preset_reads_its_summary_table(tmp_path, capsys):
    """configs/grokking_beta2.yaml's verdict over the committed two-preset report: both beta2 rows, StableMax
    higher in 3 of 3 seeds at each; a grokking verdict's arms must be grokking variants."""
    import shutil
    from pathlib import Path

    from stabilab.cli import main
    from stabilab.config import deep_merge
    from stabilab.experiment import load_experiment, validate

    root = Path(__file__).resolve().parents[1]
    tables = tmp_path / "t"
    tables.mkdir()
    shutil.copy(root / "results/grokking_beta2/grokking/beside_official/grokking_summary.csv", tables)
    assert main(["verdicts", "--config", str(root / "configs/grokking_beta2.yaml"), "--tables", str(tables)]) == 0
    out = capsys.readouterr().out
    assert "add mod 113, beta2 0.99: +0.8562" in out and "add mod 113, beta2 0.999: +0.9324" in out
    verdicts = pd.read_csv(tables / "verdicts.csv")
    assert list(verdicts["reading"]) == ["higher in 3 of 3 seeds"] * 2 and set(verdicts["n"]) == {3}
    config = load_experiment(root / "configs/grokking_beta2.yaml")
    with pytest.raises(UserError, match="verdicts.stablemax_vs_softmax.arms: perpgrad not a grokking variant"):
        validate(deep_merge(config, {"verdicts": {"stablemax_vs_softmax": {"arms": ["perpgrad", "stablemax"]}}}))
    with pytest.raises(UserError, match="no grokking section"):
        validate({**config, "grokking": None})
