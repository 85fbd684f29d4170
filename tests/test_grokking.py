"""Grokking study (StableMax paper): data, collapse metric, config, a short seeded run, report."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from stabilab.errors import UserError
from stabilab.grokking import cli as GCLI
from stabilab.grokking import config as GC
from stabilab.grokking import data as GD
from stabilab.grokking import figures as GF
from stabilab.grokking import model as GM
from stabilab.grokking import report as GR
from stabilab.grokking import train as GT
from stabilab.metrics import collapse_fractions

# ----------------------------------------------------------------------------- data


@pytest.mark.parametrize("operation, fn", [("add", lambda a, b: a + b), ("mul", lambda a, b: a * b)])
def test_pairs_cover_all_inputs_with_correct_labels(operation, fn):
    p = 7
    pairs, labels = GD.make_pairs(p, operation)
    assert pairs.shape == (p * p, 2) and labels.shape == (p * p,)
    assert len({tuple(x) for x in pairs.tolist()}) == p * p
    for (a, b), y in zip(pairs.tolist(), labels.tolist()):
        assert y == fn(a, b) % p


@pytest.mark.parametrize("p, fraction, n_train", [(113, 0.4, 5108), (7, 0.4, 20), (10, 0.25, 25)])
def test_split_is_exact_disjoint_and_seeded(p, fraction, n_train):
    n = p * p
    train, test = GD.split_indices(n, fraction, seed=3)
    assert len(train) == n_train == round(fraction * n)
    assert len(test) == n - n_train
    assert sorted(train.tolist() + test.tolist()) == list(range(n))
    again, _ = GD.split_indices(n, fraction, seed=3)
    other, _ = GD.split_indices(n, fraction, seed=4)
    assert torch.equal(train, again) and not torch.equal(train, other)


def test_one_hot_inputs_concatenate_a_and_b():
    p = 5
    pairs, labels = GD.make_pairs(p, "add")
    x = GD.one_hot_inputs(pairs, p, torch.float64)
    assert x.shape == (p * p, 2 * p) and x.dtype == torch.float64
    assert torch.equal(x.sum(1), torch.full((p * p,), 2.0, dtype=torch.float64))
    assert torch.equal(x[:, :p].argmax(1), pairs[:, 0]) and torch.equal(x[:, p:].argmax(1), pairs[:, 1])


def test_split_dataset_matches_spec_and_dtype():
    spec = GC.RunSpec(variant="softmax_fp64", modulus=11, train_fraction=0.5)
    data = GD.make_split(spec)
    assert data.x_train.shape == (round(0.5 * 121), 22) and data.x_train.dtype == torch.float64
    assert len(data.y_train) + len(data.y_test) == 121


def test_mlp_has_no_biases_and_paper_shape():
    model = GM.build_mlp(226, [200, 200], 113)
    linears = [m for m in model if isinstance(m, torch.nn.Linear)]
    assert [tuple(m.weight.shape) for m in linears] == [(200, 226), (200, 200), (113, 200)]
    assert all(m.bias is None for m in linears)
    assert sum(isinstance(m, torch.nn.ReLU) for m in model) == 2


# ----------------------------------------------------------------------------- collapse metric


def floats(tensors: dict) -> dict:
    return {k: float(v) for k, v in tensors.items()}


def test_collapse_metric_on_constructed_logits():
    target = torch.tensor([0])
    big = torch.tensor([[100.0, 0.0, 0.0]])  # 1 + 2 exp(-100) rounds to 1 (float32 and float64)
    small = torch.tensor([[1.0, 0.0, 0.0]])
    assert floats(collapse_fractions(big, target, "softmax")) == {"collapse_frac": 1.0, "zero_loss_frac": 1.0}
    assert floats(collapse_fractions(small, target, "softmax")) == {"collapse_frac": 0.0, "zero_loss_frac": 0.0}
    # a gap of 30: exp(-30) ~ 1e-13 is absorbed in float32 (eps 1.2e-7) but not in float64 (2.2e-16)
    gap30 = torch.tensor([[30.0, 0.0, 0.0]])
    assert floats(collapse_fractions(gap30, target, "softmax"))["collapse_frac"] == 1.0
    assert floats(collapse_fractions(gap30.double(), target, "softmax"))["collapse_frac"] == 0.0
    assert floats(collapse_fractions(big.double(), target, "softmax"))["collapse_frac"] == 1.0
    # StableMax of [100, 0, 0] is [101, 1, 1] / 103: no collapse
    assert floats(collapse_fractions(big, target, "stablemax"))["collapse_frac"] == 0.0


def test_loss_per_sample_matches_definitions():
    logits = torch.tensor([[2.0, -1.0, 0.5]])
    y = torch.tensor([2])
    s = torch.tensor([3.0, 0.5, 1.5])  # s(x) = x + 1 (x >= 0), 1 / (1 - x) (x < 0)
    assert torch.allclose(GM.loss_per_sample(logits, y, "stablemax"), -torch.log(s[2] / s.sum()))
    assert torch.allclose(GM.loss_per_sample(logits, y, "softmax"), -torch.log_softmax(logits, 1)[:, 2])


# ----------------------------------------------------------------------------- config


def test_default_config_runs_every_variant():
    specs = GC.run_specs({})
    assert [s.variant for s in specs] == list(GC.VARIANTS)
    assert all(s.modulus == 113 and s.train_fraction == 0.4 and s.operation == "add" for s in specs)


def test_empty_variants_disable_the_study_and_overrides_apply():
    assert GC.run_specs({"variants": []}) == []
    specs = GC.run_specs({"variants": ["stablemax", "perpgrad"], "operations": ["add", "mul"], "seeds": [0, 1],
                         "overrides": {"perpgrad": {"epochs": 7}}})
    assert len(specs) == 8
    assert {s.epochs for s in specs if s.variant == "perpgrad"} == {7}
    assert {s.epochs for s in specs if s.variant == "stablemax"} == {GC.GrokkingConfig().epochs}


@pytest.mark.parametrize("section", [
    {"variant": ["stablemax"]},  # unknown key
    {"variants": ["adam"]},
    {"train_fraction": 1.0},
    {"modulus": 1},
    {"epochs": 0},
    {"overrides": {"stablemax": {"momentum": 0.9}}},
    {"seeds": [0, 0]},
])
def test_bad_config_is_a_user_error(section):
    with pytest.raises(UserError):
        GC.run_specs(section)


# ----------------------------------------------------------------------------- short seeded runs


def _run(tmp_path, **kw):
    spec = GC.RunSpec(**kw)
    return GT.train_run(spec, tmp_path / f"{spec.variant}_{spec.modulus}", threads=1, log=lambda *a: None)


def test_perp_adamw_generalizes_while_float32_softmax_only_memorizes(tmp_path):
    """Reliably true at a small budget (p = 59, 250 epochs, lr 0.01): ⊥AdamW reaches >= 90 % test
    accuracy, plain AdamW on the same softmax loss, seed and split memorizes the training set and
    stays near 0 % on the test pairs (seen for seeds 0-2; ⊥AdamW hits 95 % at epochs 130-160).
    With the ⊥ projection removed the first assertion fails (test accuracy 0.0)."""
    common = dict(modulus=59, epochs=250, eval_every=50, seed=0)
    perp = _run(tmp_path, variant="perpgrad", **common)
    plain = _run(tmp_path, variant="softmax_fp32", **common)
    assert perp["final_test_acc"] >= 0.9
    assert perp["epochs_to_95"] is not None
    assert plain["final_train_acc"] == 1.0
    assert plain["final_test_acc"] < 0.05 and plain["epochs_to_95"] is None
    assert perp["final_weight_norm"] < plain["final_weight_norm"]


def test_float32_softmax_collapses_while_stablemax_does_not(tmp_path):
    """Reliably true at a small budget (p = 23, 400 epochs): float32 softmax puts a share of the
    training samples into Softmax Collapse (0.13-0.17 for seeds 0-2 from epoch ~100 on; it climbs
    to ~0.8 by epoch 1500), while StableMax in float32 keeps every sample out of it. StableMax does
    NOT grok at such budgets (it needs ~7e4 epochs at p = 113 with a float64 loss), so that is not
    claimed here. Replacing StableMax by softmax makes the last assertion fail."""
    common = dict(modulus=23, epochs=400, eval_every=50, seed=0)
    soft = _run(tmp_path, variant="softmax_fp32", **common)
    stable = _run(tmp_path, variant="stablemax", **common)
    records = [json.loads(line) for line in
               (tmp_path / "softmax_fp32_23" / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["collapse_frac"] == 0.0 and soft["final_collapse_frac"] > 0.05
    assert soft["final_zero_loss_frac"] > 0.0
    assert stable["max_collapse_frac"] == 0.0 and stable["final_zero_loss_frac"] == 0.0


# ----------------------------------------------------------------------------- files, CLI, report


def _parser():
    parser = argparse.ArgumentParser()
    GCLI.register(parser.add_subparsers(dest="command", required=True))
    return parser


def test_cli_train_and_report_write_every_output(tmp_path):
    parser = _parser()
    runs = []
    for variant in GC.VARIANTS:
        spec = GC.RunSpec(variant=variant, modulus=7, epochs=20, eval_every=5).to_dict()
        out = tmp_path / "runs" / variant
        args = parser.parse_args(["grok-train", "--spec", json.dumps(spec), "--out", str(out), "--threads", "1"])
        assert args.func(args) == 0
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert [r["epoch"] for r in records] == [0, 5, 10, 15, 20]
        assert {"train_acc", "test_acc", "train_loss", "test_loss", "collapse_frac", "zero_loss_frac",
                "weight_norm"} <= set(records[0])
        summary = json.loads((out / "summary.json").read_text())
        assert summary["spec"] == spec and summary["epochs_run"] == 20
        assert not list(out.glob("*.tmp"))
        runs.append(str(out))

    args = parser.parse_args(["grok-report", "--runs", *runs, "--tables", str(tmp_path / "t"),
                              "--figures", str(tmp_path / "f")])
    assert args.func(args) == 0
    steps = pd.read_csv(tmp_path / "t" / "grokking_steps.csv")
    summary = pd.read_csv(tmp_path / "t" / "grokking_summary.csv")
    assert len(steps) == 4 * 5 and len(summary) == 4
    assert list(summary["variant"]) == list(GC.VARIANTS)
    assert all(v == "never" or str(v).isdigit() for v in summary["epochs_to_95"])
    # each row names the commit that trained its run (a verdict compares runs of one commit)
    trained_by = [json.loads((Path(r) / "summary.json").read_text())["provenance"]["git_commit"] for r in runs]
    assert list(summary["git_commit"].fillna("")) == [c or "" for c in trained_by]
    for name in GF.FIGURES:
        for ext in ("png", "pdf"):
            assert (tmp_path / "f" / f"{name}.{ext}").stat().st_size > 1000


@pytest.mark.parametrize("spec, message", [
    ("{not json", "not valid JSON"),
    ('{"variant": "adam"}', "variant"),
    ('{"variant": "stablemax", "lr": -1}', "lr"),
    ('{"variant": "stablemax", "colour": 1}', "colour"),
])
def test_bad_spec_is_a_one_line_user_error(tmp_path, spec, message):
    args = _parser().parse_args(["grok-train", "--spec", spec, "--out", str(tmp_path)])
    with pytest.raises(UserError, match=message) as info:
        args.func(args)
    assert "\n" not in str(info.value)


def test_report_without_runs_is_a_user_error(tmp_path):
    with pytest.raises(UserError):
        GR.report([tmp_path], tmp_path / "t", tmp_path / "f")
    with pytest.raises(UserError):
        GR.report([tmp_path / "missing"], tmp_path / "t", tmp_path / "f")


def test_a_smoke_tests_grokking_figures_say_so_in_their_titles(tmp_path, monkeypatch):
    """grok-figures (and grok-report) --smoke-test: the default config's shortened grokking runs are a
    smoke test; each figure's title opens with the smoke-test lines, and without the flag it does not (its own
    two lines, the claim and the regime, stay)."""
    import matplotlib.figure

    rows = [{"variant": variant, "loss_dtype": "float64" if variant == "softmax_fp64" else "float32",
             "operation": "add", "modulus": 7, "seed": 0, "epoch": epoch, "train_acc": min(1.0, epoch / 10),
             "test_acc": epoch / 40, "collapse_frac": 0.0, "weight_norm": 10.0 + epoch}
            for variant in GC.VARIANTS for epoch in (0, 10, 20)]
    (tmp_path / "t").mkdir()
    pd.DataFrame(rows).to_csv(tmp_path / "t" / "grokking_steps.csv", index=False)
    titles = {}
    original = matplotlib.figure.Figure.savefig

    def recording_savefig(fig, path, *args, **kwargs):
        titles[str(path)] = fig.get_suptitle()
        return original(fig, path, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", recording_savefig)
    for flag in (["--smoke-test"], []):
        titles.clear()
        args = _parser().parse_args(["grok-figures", "--tables", str(tmp_path / "t"), "--figures",
                                     str(tmp_path / "f"), *flag])
        assert args.func(args) == 0
        assert len(titles) == 2 * len(GF.FIGURES)
        for title in titles.values():
            smoke = title.splitlines()[0] == "SMOKE TEST of the pipeline at toy scale, not a result"
            assert smoke == bool(flag) and len(title.splitlines()) == (4 if flag else 2), title


def test_grokking_figures_tell_seeds_apart_on_linear_epoch_axes_of_their_own(tmp_path, monkeypatch):
    """Each variant in its own panel on a linear epoch axis (a 300-epoch run beside a 100 000-epoch one; on
    a log axis a late collapse was a sliver); one colour per seed within a panel; the paper's figure has one
    panel per run (variants x seeds) with the collapse fraction shaded."""
    import matplotlib.colors as mcolors
    import matplotlib.figure

    rows = [{"variant": variant, "loss_dtype": "float32", "operation": "add", "modulus": 7, "seed": seed,
             "epoch": epoch, "train_acc": 1.0, "test_acc": min(1.0, epoch / last), "collapse_frac": 0.0,
             "weight_norm": 10.0 + epoch}
            for variant, last in (("softmax_fp32", 100_000), ("perpgrad", 300)) for seed in (0, 1, 2)
            for epoch in np.linspace(0, last, 11)]
    figures = {}
    original = matplotlib.figure.Figure.savefig

    def recording_savefig(fig, path, *args, **kwargs):
        figures[Path(str(path).removesuffix(".tmp")).name] = fig
        return original(fig, path, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", recording_savefig)
    GF.make_figures(pd.DataFrame(rows), tmp_path)
    accuracy = figures["grokking_test_accuracy.png"]
    panels = [ax for ax in accuracy.axes if ax.get_lines()]
    assert len(panels) == 2 and all(ax.get_xscale() == "linear" for ax in panels)
    assert sorted(ax.get_xlim()[1] for ax in panels)[0] < 1000  # ⊥AdamW's 300 epochs on an axis of their own
    for ax in panels:
        solid = [mcolors.to_hex(line.get_color()) for line in ax.get_lines() if line.get_linestyle() == "-"]
        assert len(solid) == 3 and len(set(solid)) == 3  # the seeds told apart
    claim = figures["grokking_claim.png"]
    drawn = [ax for ax in claim.axes if ax.get_visible() and ax.get_lines()]
    assert len(drawn) == 2 * 3 and all(ax.collections for ax in drawn)  # one panel per run, collapse shaded


def test_runs_of_one_loss_at_two_beta2_get_a_row_each_named_by_its_beta2(tmp_path, monkeypatch):
    """The matched-beta2 check reads softmax and StableMax each at beta2 0.99 and 0.999 in one report: the
    claim figure gets one row per (variant, loss dtype, beta2), labelled with its beta2, holding that
    beta2's runs only; a table written before beta2 was kept (no column) still draws, unlabelled."""
    import matplotlib.axes

    rows = [{"variant": variant, "loss_dtype": "float64" if variant == "stablemax" else "float32",
             "operation": "add", "modulus": 7, "seed": 0, "epoch": epoch, "train_acc": 1.0,
             "test_acc": beta2 if epoch else 0.0, "collapse_frac": 0.0, "weight_norm": 1.0, "beta2": beta2}
            for variant in ("softmax_fp32", "stablemax") for beta2 in (0.99, 0.999) for epoch in (0, 10)]
    steps = pd.DataFrame(rows)
    labels, finals = [], {}
    original_ylabel, original_plot = matplotlib.axes.Axes.set_ylabel, matplotlib.axes.Axes.plot

    def ylabel(ax, text, *a, **k):
        labels.append(text)
        return original_ylabel(ax, text, *a, **k)

    def plot(ax, x, y, *a, **k):
        finals.setdefault(id(ax), []).append(list(y))
        return original_plot(ax, x, y, *a, **k)

    monkeypatch.setattr(matplotlib.axes.Axes, "set_ylabel", ylabel)
    monkeypatch.setattr(matplotlib.axes.Axes, "plot", plot)
    GF.claim_figure(steps, tmp_path / "claim")
    assert labels == ["softmax, float32\nAdam β2 0.99", "softmax, float32\nAdam β2 0.999",
                      "StableMax, float64 loss\nAdam β2 0.99", "StableMax, float64 loss\nAdam β2 0.999"]
    # each panel's test-accuracy line (the second line drawn) ends at its own row's beta2
    assert sorted(lines[1][-1] for lines in finals.values()) == [0.99, 0.99, 0.999, 0.999]
    labels.clear()
    GF.claim_figure(steps[steps["beta2"] == 0.99].drop(columns="beta2"), tmp_path / "old")
    assert labels == ["softmax, float32", "StableMax, float64 loss"]
