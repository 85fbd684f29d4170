"""Figures from small synthetic tables (no training): every expected file is written, a missing
table is a UserError."""

from __future__ import annotations

import json
import math
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from stabilab.errors import UserError
from stabilab.figures import draw_figures
from stabilab.figures.style import fmt
from stabilab.studies import expected_figures
from stabilab.tables import study_summary

STUDIES = {
    "depth": {"kind": "depth", "variants": ["baseline", "mlra"], "depths": [1, 2], "lrs": [3e-3], "seeds": [0, 1]},
    "lr": {"kind": "lr", "variants": ["baseline", "oec_center"], "depths": [1], "lrs": [1e-2, 3.0],
           "seeds": [0, 1]},
    "spikes": {"kind": "spikes", "variants": ["adamw_noclip", "spam"], "depths": [1], "lrs": [1e-2], "seeds": [0]},
    "variants": {"kind": "compare", "variants": ["baseline", "stablemax", "mlra+oec_center"], "depths": [1],
                 "lrs": [1e-2], "seeds": [0]},
}
STEPS, LOG_EVERY, METRICS_EVERY, EVAL_EVERY, TOKENS_PER_STEP = 20, 2, 10, 10, 256
L0 = math.log(300)


def synthetic_run(study, variant, depth, lr, seed, diverge_at=None, spike_at=None):
    """One run's summary row and its logged steps, in the columns of runs.csv / steps.csv."""
    rng = np.random.default_rng(zlib.crc32(f"{study}/{variant}/{depth}/{lr}/{seed}".encode()))
    rows = []
    for step in [1] + list(range(LOG_EVERY, STEPS + 1, LOG_EVERY)):
        if diverge_at and step > diverge_at:
            break
        loss = L0 - 1.5 * (1 - math.exp(-step / 6)) + 0.05 * rng.standard_normal()
        if diverge_at and step > diverge_at // 2:
            loss = L0 + 5.0 * step  # blows up, then the trainer stops it
        gn = 1.0 + 0.1 * rng.standard_normal()
        if spike_at == step:
            gn = 500.0
        row = {"study": study, "variant": variant, "depth": depth, "lr": lr, "seed": seed, "step": step,
               "tokens": step * TOKENS_PER_STEP, "train_loss": loss, "lr_now": lr, "grad_norm": gn,
               "tokens_per_s": 1000.0}
        if step % METRICS_EVERY == 0:
            row.update({"tev_mean": 0.02 + 0.001 * step * depth, "tev_std": 0.002 + 0.0002 * step,
                        "mu_norm": 1e-8 if variant == "oec_center" else 0.1 * lr * step,
                        "logits_mean": 0.0, "logits_absmax": 3.0 + lr * step, "log_z_sq": 40.0,
                        "collapse_frac": 0.0, "zero_loss_frac": 0.0, "grad_norm_var": 0.01 * depth,
                        "spike_count": float(spike_at is not None and spike_at <= step),
                        "attn_logit_max_l0": 2.0 * lr * step})
            if variant == "spam":
                row["spam_clipped_frac"] = 1e-5
        if step % EVAL_EVERY == 0 and not diverge_at:
            row["val_loss"] = loss + 0.05
        rows.append(row)
    steps = pd.DataFrame(rows)
    last = steps.dropna(subset=["tev_mean"]).iloc[-1]
    val = None if diverge_at else float(steps["val_loss"].dropna().iloc[-1])
    run = {"study": study, "variant": variant, "depth": depth, "lr": lr, "seed": seed, "steps": int(steps.step.max()),
           "final_val_loss": val, "final_val_ppl": math.exp(val) if val else None,
           "initial_loss": float(steps.train_loss.iloc[0]), "diverged": bool(diverge_at),
           "diverged_step": diverge_at, "params": 1000 * depth,
           **{k: float(last[k]) for k in ["tev_mean", "tev_std", "mu_norm", "logits_mean", "logits_absmax",
                                          "log_z_sq", "collapse_frac", "zero_loss_frac", "spike_count",
                                          "grad_norm_var"]},
           "attn_logit_max": float(last["attn_logit_max_l0"]), "max_grad_norm": float(steps.grad_norm.max()),
           "wall_time_s": 0.5 * len(steps)}
    return run, steps


def write_tables(folder: Path) -> Path:
    runs, steps = [], []
    for study, spec in STUDIES.items():
        for variant in spec["variants"]:
            for depth in spec["depths"]:
                for lr in spec["lrs"]:
                    for seed in spec["seeds"]:
                        diverge = 12 if (lr == 3.0 and (variant == "baseline" or seed == 1)) or \
                            variant == "stablemax" else None
                        spike = 8 if variant == "adamw_noclip" else None
                        run, st = synthetic_run(study, variant, depth, lr, seed, diverge, spike)
                        runs.append(run)
                        steps.append(st)
    runs_df, steps_df = pd.DataFrame(runs), pd.concat(steps, ignore_index=True)
    folder.mkdir(parents=True, exist_ok=True)
    runs_df.to_csv(folder / "runs.csv", index=False)
    steps_df.to_csv(folder / "steps.csv", index=False)
    for study, spec in STUDIES.items():
        study_summary(runs_df, study, spec["kind"]).to_csv(folder / f"summary_{study}.csv", index=False)
    (folder / "studies.json").write_text(json.dumps(STUDIES))
    return folder


@pytest.fixture(scope="module")
def tables(tmp_path_factory) -> Path:
    return write_tables(tmp_path_factory.mktemp("figures") / "tables")


def test_synthetic_tables_have_a_diverged_run_and_two_seeds(tables):
    runs = pd.read_csv(tables / "runs.csv")
    assert runs["diverged"].any() and runs.loc[runs.diverged, "final_val_loss"].isna().all()
    assert runs.groupby(["study", "variant", "depth", "lr"])["seed"].nunique().max() == 2
    summary = pd.read_csv(tables / "summary_lr.csv")
    assert (summary["n_diverged"] > 0).any()


def test_draw_figures_writes_exactly_the_expected_files(tables, tmp_path):
    out = tmp_path / "figures"
    written = draw_figures(tables, out)  # the studies come from studies.json
    expected = set()
    for png in expected_figures(STUDIES):
        expected |= {out / png, out / png.replace(".png", ".pdf")}
    assert len(written) == len(set(written)) and set(written) == expected
    assert {p for p in out.rglob("*") if p.is_file()} == expected
    for path in expected:
        head = path.read_bytes()[:8]
        assert head.startswith(b"\x89PNG" if path.suffix == ".png" else b"%PDF"), path
        assert path.stat().st_size > 5000, path


def test_unknown_study_kind_is_a_user_error(tables, tmp_path):
    with pytest.raises(UserError, match="unknown kind"):
        draw_figures(tables, tmp_path, studies={"x": {"kind": "nonsense", "variants": ["baseline"]}})
    assert not any(tmp_path.iterdir())  # checked before anything is drawn


@pytest.mark.parametrize("missing", ["runs.csv", "steps.csv", "summary_depth.csv", "studies.json"])
def test_missing_table_is_a_user_error(tables, tmp_path, missing):
    partial = tmp_path / "tables"
    partial.mkdir()
    for f in tables.iterdir():
        if f.name != missing:
            (partial / f.name).write_bytes(f.read_bytes())
    studies = None if missing == "studies.json" else {"depth": STUDIES["depth"]}
    with pytest.raises(UserError, match="table missing"):
        draw_figures(partial, tmp_path / "out", studies=studies)


def test_headline_numbers_are_the_summary_tables_best_losses(tables, capsys):
    """headline.csv: per study and variant the best mean final loss over its settings, where it was
    reached and the diverged runs; LR studies add both sensitivities; the end-of-run summary prints it."""
    from stabilab.summary import headline, print_summary

    frame = headline(tables)
    assert set(frame["study"]) == set(STUDIES)
    lr = pd.read_csv(tables / "summary_lr.csv")
    for variant in STUDIES["lr"]["variants"]:
        row = frame[(frame.study == "lr") & (frame.variant == variant)].iloc[0]
        losses = lr[(lr.metric == "final_val_loss") & (lr.variant == variant)]
        assert row.best_final_val_loss == pytest.approx(losses["mean"].min())
        assert row.at_lr == pytest.approx(losses.loc[losses["mean"].idxmin(), "lr"])
        assert row.lr_sensitivity == pytest.approx(
            lr[(lr.metric == "lr_sensitivity") & (lr.variant == variant)]["mean"].iloc[0])
    assert frame[frame.variant == "stablemax"]["diverged"].iloc[0] == 1  # its one run diverged
    assert frame[frame.variant == "oec_center"]["name"].iloc[0] == "μ-centering"
    print_summary(tables, "figures/x")
    out = capsys.readouterr().out
    assert "best final validation loss per variant" in out and "μ-centering" in out


def test_a_studys_own_labels_name_its_variants_in_every_legend_and_nowhere_else(tables, tmp_path, monkeypatch):
    """`labels` in a study (filled from the variants' `label:`) replace the papers' names in that
    study's figures only (the depth study's legends keep 'MLRA'), and do not outlive the drawing."""
    import shutil

    import matplotlib.figure
    import matplotlib.text

    from stabilab.methods import label

    copy = tmp_path / "tables"
    shutil.copytree(tables, copy)
    studies = json.loads((copy / "studies.json").read_text())
    studies = {"lr": {**studies["lr"], "labels": {"oec_center": "centred (ours)"}}, "depth": studies["depth"]}
    (copy / "studies.json").write_text(json.dumps(studies))
    texts: dict[str, list[str]] = {}
    original = matplotlib.figure.Figure.savefig

    def recording_savefig(fig, path, *args, **kwargs):
        texts[str(path)] = [t.get_text() for t in fig.findobj(matplotlib.text.Text)]
        return original(fig, path, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", recording_savefig)
    draw_figures(copy, tmp_path / "figures")
    lr_texts = [t for path, ts in texts.items() if "/lr/" in path for t in ts]
    other_texts = [t for path, ts in texts.items() if "/lr/" not in path for t in ts]
    assert any("centred (ours)" in t for t in lr_texts)
    assert not any("μ-centering" in t for t in lr_texts)
    assert not any("centred (ours)" in t for t in other_texts) and any("MLRA" in t for t in other_texts)
    assert label("oec_center") == "μ-centering"


def test_a_smoke_tests_figures_say_so_in_the_first_line_of_their_titles(tables, tmp_path, monkeypatch):
    """A study with `smoke_test: true` (the default config's, through studies.json): every figure's title
    opens with the smoke-test lines, the loss-vs-LR figure (one axes title, no figure title) included; the
    next study's (not a smoke test) are as before."""
    import shutil

    import matplotlib.figure

    copy = tmp_path / "tables"
    shutil.copytree(tables, copy)
    studies = json.loads((copy / "studies.json").read_text())
    studies = {"lr": {**studies["lr"], "smoke_test": True}, "variants": studies["variants"]}
    (copy / "studies.json").write_text(json.dumps(studies))
    titles: dict[str, str] = {}
    original = matplotlib.figure.Figure.savefig

    def recording_savefig(fig, path, *args, **kwargs):
        titles[Path(path).parent.name + "/" + Path(path).name.split(".")[0]] = fig.get_suptitle()
        return original(fig, path, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", recording_savefig)
    draw_figures(copy, tmp_path / "figures")
    smoke = {stem: title for stem, title in titles.items() if stem.startswith("lr/")}
    assert len(smoke) == len(expected_figures({"lr": studies["lr"]}))
    for stem, title in smoke.items():
        assert title.splitlines()[:2] == [
            "SMOKE TEST of the pipeline at toy scale, not a result",
            'results: the GPU presets (README, "Results at a glance"; docs/replication.md)']
        assert len(title.splitlines()) >= (2 if "loss_vs_lr" in stem else 3), stem  # the figure's own title kept
    other = [title for stem, title in titles.items() if stem.startswith("variants/")]
    assert other and not any("SMOKE TEST" in title for title in other)


def test_a_smoke_tests_summary_says_it_is_no_result_and_where_the_replications_are(tables, tmp_path, capsys):
    import shutil

    from stabilab.summary import print_summary

    copy = tmp_path / "tables"
    shutil.copytree(tables, copy)
    print_summary(copy, "figures/x")
    assert "SMOKE TEST" not in capsys.readouterr().out
    studies = {name: {**spec, "smoke_test": True} for name, spec in STUDIES.items()}
    (copy / "studies.json").write_text(json.dumps(studies))
    print_summary(copy, "figures/x")
    out = capsys.readouterr().out
    flat = " ".join(out.split())  # the note is wrapped to the console's width
    assert "SMOKE TEST, not a result" in flat and "docs/replication.md" in flat and '("Results at a glance")' in flat
    assert "(opens on the smoke-test note and the headline tables; the figures are in its menu)" in out
    assert "lr (lr study, smoke test): best final validation loss per variant" in out.splitlines()
    assert out.index("SMOKE TEST") < out.index("lr (lr study")  # before the numbers


def front_page(files) -> str:
    """workflow/report/workflow.rst as Snakemake 9 renders it for the report's front page: Jinja (its report
    entries as `files`), then docutils' HTML body (snakemake/report/__init__.py, auto_report)."""
    from types import SimpleNamespace

    from docutils.core import publish_parts
    from jinja2 import Environment

    text = (Path(__file__).resolve().parents[1] / "workflow" / "report" / "workflow.rst").read_text()
    rendered = Environment(trim_blocks=True, lstrip_blocks=True).from_string(text).render(
        snakemake=SimpleNamespace(config={}), categories={},
        files=[SimpleNamespace(target=Path(f).name, path=Path(f)) for f in files])
    return publish_parts(rendered, writer_name="html")["html_body"]


@pytest.mark.filterwarnings("ignore:Argument \"writer_name\":PendingDeprecationWarning")  # Snakemake's call
def test_the_reports_front_page_opens_on_the_headline_table_and_a_smoke_tests_note(tables, tmp_path):
    """The tables rule writes headline.html (a report entry); the report's front page shows it as tables (HTML,
    not a CSV download) before the workflow's description, a smoke test's note first."""
    import shutil

    from stabilab.summary import write_headline

    copy = tmp_path / "tables"
    shutil.copytree(tables, copy)
    (copy / "studies.json").write_text(json.dumps({name: {**spec, "smoke_test": True}
                                                   for name, spec in STUDIES.items()}))
    write_headline(copy)
    page = front_page([copy / "headline.csv", copy / "headline.html", copy / "summary_lr.csv"])
    description = page.index("stabilab replicates")
    assert page.index("SMOKE TEST, not a result") < page.index("<table") < description
    assert page.count("<table") == len(STUDIES)  # one per study, all before the description
    assert page.rindex("</table>") < description
    assert "μ-centering" in page and "LR sensitivity (Wortsman, /K)" in page and "docs/replication.md" in page
    # Snakemake centres a page vertically, which cuts off the top of one taller than the screen: not this one
    assert "<style>.items-center.justify-center.h-screen { align-items: safe center; }</style>" in page
    (copy / "studies.json").write_text(json.dumps(STUDIES))  # not a smoke test: the tables, no note
    write_headline(copy)
    page = front_page([copy / "headline.html"])
    assert "SMOKE TEST" not in page and page.index("<table") < page.index("stabilab replicates")
    assert page.index("the verdicts in docs/replication.md") < page.index("stabilab replicates")
    assert "<table" not in front_page([])  # no language-model study: the description alone


def test_an_experiment_without_headline_numbers_gets_a_line_saying_so(tmp_path, capsys):
    """Only early_warning studies (their summary is their own analysis, no losses; configs/early_warning.yaml):
    headline.csv is empty, and the report's headline and the console summary say that there is none."""
    from stabilab.summary import print_summary, write_headline

    (tmp_path / "studies.json").write_text(json.dumps({"ew": {"kind": "early_warning", "variants": ["baseline"]}}))
    pd.DataFrame({"study": ["ew"], "scope": ["all"], "value": [0.5]}).to_csv(tmp_path / "summary_ew.csv")
    write_headline(tmp_path)
    assert "No study of this experiment has headline numbers" in (tmp_path / "headline.html").read_text()
    print_summary(tmp_path, "figures/x")
    assert "no headline numbers: no study has a best final validation loss" in capsys.readouterr().out


@pytest.mark.parametrize("value, text", [
    (3, "3"), (2.0, "2"), (1e-3, "1e-3"), (0.003, "3e-3"), (8e-3, "8e-3"), (1.6e-2, "1.6e-2"),
    (3.2e-2, "3.2e-2"), (6.4e-2, "6.4e-2"), (0.0125, "1.25e-2"), (0.1, "0.1"), (0.128, "0.128"),
    (0.256, "0.256"), (1.5, "1.5"), (123456.0, "1.23e5"), (-0.05, "-5e-2")])
def test_numbers_in_figures_follow_one_style_per_range(value, text):
    """An LR sweep's labels change notation only at 0.1 (the early-warning sweep mixed '3.2e-2'
    with '0.064' before)."""
    assert fmt(value) == text


def test_depth_figures_draw_each_lr_in_its_own_panel_and_lm_head_tev_when_untied():
    """A depth study at two peak LRs: one panel per LR, each holding that LR's seed means (not the
    first LR's for both); lm_head's TEV rows appear only when the runs logged them (untied)."""
    from stabilab.figures import depth
    from stabilab.methods import label

    lrs, variants = [3e-3, 1e-2], ["baseline", "mlra"]
    rows = [synthetic_run("depth", v, d, lr, s)[0] for v in variants for d in (1, 2) for lr in lrs for s in (0, 1)]
    runs = pd.DataFrame(rows)
    summary = study_summary(runs, "depth", "depth")
    palette = {"baseline": "0.2", "mlra": "tab:blue"}
    fig = depth._vs_depth(summary, runs, variants, palette, 2, [("final_val_ppl", "ppl")], lrs, "t", 3.0)
    panels = {}
    for ax, lr in zip(fig.axes, lrs):
        assert ax.get_title() == f"peak LR {fmt(lr)}"
        (line,) = [ln for ln in ax.lines if ln.get_label() == label("baseline")]
        want = summary[(summary.metric == "final_val_ppl") & (summary.variant == "baseline")
                       & np.isclose(summary.lr, lr)].sort_values("depth")["mean"].to_numpy()
        np.testing.assert_allclose(line.get_ydata(), want)
        panels[lr] = want
    assert not np.allclose(panels[lrs[0]], panels[lrs[1]])
    assert [m for m, _, _ in depth.tev_metrics(summary)] == ["tev_mean", "tev_std"]
    untied = runs.assign(tev_lm_head_mean=runs.tev_mean * 1.1, tev_lm_head_std=runs.tev_std * 1.1)
    assert [m for m, _, _ in depth.tev_metrics(study_summary(untied, "depth", "depth"))] == \
        ["tev_mean", "tev_std", "tev_lm_head_mean", "tev_lm_head_std"]


def test_tev_over_training_keeps_tied_variants_beside_untied_ones():
    """A depth study with an untied and a tied variant: the untied one adds lm_head rows, and the
    tied one (no lm_head TEV logged) still has its wte curves."""
    import matplotlib.colors as mcolors
    import matplotlib.pyplot as plt

    from stabilab.figures import depth

    variants, palette = ["baseline", "mlra"], {"baseline": "#222222", "mlra": "#1f77b4"}
    runs, steps = [], []
    for v in variants:
        for d in (1, 2):
            for s in (0, 1):
                run, st = synthetic_run("depth", v, d, 3e-3, s)
                if v == "baseline":  # untied
                    st["tev_lm_head_mean"] = st["tev_mean"] * 1.1
                runs.append(run)
                steps.append(st)
    runs, steps = pd.DataFrame(runs), pd.concat(steps, ignore_index=True)
    fig = depth._tev_over_training(steps, runs, variants, "depth", STUDIES["depth"], palette)
    first_row, lm_head_row = fig.axes[0], fig.axes[2]  # columns: depths 1, 2
    colours = lambda ax: {mcolors.to_hex(line.get_color()) for line in ax.lines}
    assert colours(first_row) == set(palette.values())
    assert colours(lm_head_row) == {palette["baseline"]}
    plt.close(fig)
