"""Tables compare runs of one code: a study whose runs come from different commits or compile modes
is refused unless its config says so."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from conftest import tiny_run
from stabilab.config import load_run_config
from stabilab.errors import UserError
from stabilab.tables import write_tables
from stabilab.train import Trainer

STUDY = {"test": {"kind": "lr", "variants": ["baseline"], "depths": [2], "lrs": [1e-2, 3e-3], "seeds": [0]}}


@pytest.fixture(scope="module")
def two_runs(tiny_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("two_runs")
    for lr in (1e-2, 3e-3):
        Trainer(load_run_config(tiny_run(tiny_data["shards"], optim={"lr": lr}, train={"steps": 5})),
                root / f"lr{lr}").run()
    return root


def _with_provenance(root, tmp_path, **edits):
    """Copies of the two runs, the second's provenance edited (as if trained by other code)."""
    paths = []
    for i, lr in enumerate((1e-2, 3e-3)):
        folder = tmp_path / f"lr{lr}"
        folder.mkdir()
        for name in ("summary.json", "metrics.jsonl"):
            (folder / name).write_bytes((root / f"lr{lr}" / name).read_bytes())
        if i == 1:
            summary = json.loads((folder / "summary.json").read_text())
            summary["provenance"].update(edits)
            if edits.get("git_dirty") == "flip":  # the same commit, with and without local edits
                summary["provenance"]["git_dirty"] = not json.loads((root / f"lr{lr}" / "summary.json").read_text())[
                    "provenance"]["git_dirty"]
            (folder / "summary.json").write_text(json.dumps(summary))
        paths.append(str(folder / "summary.json"))
    return paths


@pytest.mark.parametrize("edits, says", [({"git_commit": "f" * 40}, "by ffffff"),
                                         ({"compile_mode": "reduce-overhead"}, "compile mode reduce-overhead"),
                                         ({"git_dirty": "flip"}, "with local edits")])
def test_runs_of_different_code_are_refused_before_any_table_is_written(two_runs, tmp_path, edits, says):
    paths = _with_provenance(two_runs, tmp_path, **edits)
    with pytest.raises(UserError, match=f"study test: its runs were trained by different code .*{says}"):
        write_tables(paths, tmp_path / "tables", studies=STUDY)
    assert not (tmp_path / "tables").exists() or not any((tmp_path / "tables").iterdir())


def test_mixed_code_when_the_config_says_so_and_runs_csv_says_which_run_is_which(two_runs, tmp_path):
    paths = _with_provenance(two_runs, tmp_path, git_commit="f" * 40)
    write_tables(paths, tmp_path / "tables", studies={"test": {**STUDY["test"], "mixed_code": True}})
    runs = pd.read_csv(tmp_path / "tables" / "runs.csv")
    assert runs["git_commit"].nunique() == 2 and (runs["resumes"].fillna("") == "").all()


def test_runs_of_one_code_make_tables(two_runs, tmp_path):
    written = write_tables(_with_provenance(two_runs, tmp_path), tmp_path / "tables", studies=STUDY)
    assert "summary_test.csv" in written


def test_the_sensitivity_over_a_sub_grid_is_the_sensitivity_of_those_runs_alone():
    from stabilab.tables import lr_sensitivity_rows

    rows = []
    for seed in (0, 1):
        for lr, loss in [(1e-3, 4.6), (3e-3, 4.3), (1e-2, 4.4), (1.0, None)]:
            rows.append({"variant": "base", "depth": 6, "lr": lr, "seed": seed, "initial_loss": 10.8,
                         "vocab_size": 50257, "diverged": loss is None,
                         "final_val_loss": None if loss is None else loss + 0.01 * seed})
    runs = pd.DataFrame(rows)
    spec = {"lrs": [1e-3, 3e-3, 1e-2, 1.0], "sensitivity_lrs": [1e-3, 3e-3, 1e-2]}
    got = {r["metric"]: r for r in lr_sensitivity_rows(runs, spec)}
    alone = {r["metric"]: r for r in lr_sensitivity_rows(runs[runs.lr < 1], {"lrs": spec["sensitivity_lrs"]})}
    for metric in ("lr_sensitivity", "lr_sensitivity_oec", "best_val_loss"):
        assert got[f"{metric}_sub"]["mean"] == pytest.approx(alone[metric]["mean"])
    assert got["lr_sensitivity"]["mean"] > got["lr_sensitivity_sub"]["mean"]  # diverged LR 1: in the full grid
    assert got["lr_sensitivity_sub"]["mean"] == pytest.approx((0.3 + 0 + 0.1) / 3)


@pytest.mark.parametrize("edit, says", [({"studies": {"lr": {"sensitivity_lrs": [1e-2, 7.0]}}}, "7 not among its lrs"),
                                        ({"verdicts": {"v": {"study": "nope", "arms": ["baseline", "zloss"]}}},
                                         "verdicts.v.study: no study 'nope'")])
def test_a_sub_grid_or_a_verdict_that_names_what_is_not_there_is_one_line(edit, says):
    from stabilab.config import deep_merge
    from stabilab.experiment import load_experiment, validate

    with pytest.raises(UserError, match=says):
        validate(deep_merge(load_experiment(Path(__file__).resolve().parents[1] / "config.yaml"), edit))


def test_a_smoke_tests_tables_only_warn_of_mixed_code(two_runs, tmp_path, capsys):
    paths = _with_provenance(two_runs, tmp_path, git_commit="f" * 40)
    write_tables(paths, tmp_path / "tables", studies={"test": {**STUDY["test"], "smoke_test": True}})
    assert "warning: study test: its runs were trained by different code" in capsys.readouterr().err
