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
    "lr": {"kind": "lr", "variants": ["baseline", "oec_center"], "depths": [1], "lrs": [1e-2, 0.1, 0.3, 3.0],
           "sensitivity_lrs": [1e-2, 0.1, 0.3], "seeds": [0, 1]},
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
                        "logits_mean": 1e-6 if variant == "oec_center" else -3.0 + 2.0 * lr * step,
                        "hidden_mu_cos": 0.3 * rng.standard_normal() if variant == "oec_center" else -0.3 + 0.01 * step,
                        "logits_absmax": 3.0 + lr * step, "log_z_sq": 40.0,
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
        study_summary(runs_df, study, spec["kind"], spec=spec).to_csv(folder / f"summary_{study}.csv", index=False)
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


def describe(fig) -> dict:
    """What a reader sees in a figure, for the tests: its title, every legend's texts, and per panel its
    title, labels, y scale and limits, and its lines (colour, label, data) and marker collections."""
    import matplotlib.colors as mcolors

    legends = [leg for leg in fig.legends] + [ax.get_legend() for ax in fig.axes if ax.get_legend()]
    axes = []
    for ax in fig.axes:
        if not ax.get_visible():
            continue
        axes.append({
            "title": ax.get_title() + ax.get_title("left"), "xlabel": ax.get_xlabel(), "ylabel": ax.get_ylabel(),
            "yscale": ax.get_yscale(), "ylim": ax.get_ylim(), "ax": ax,
            "lines": [(mcolors.to_hex(ln.get_color()), ln.get_label(), np.asarray(ln.get_xdata(), float),
                       np.asarray(ln.get_ydata(), float)) for ln in ax.get_lines()],
            "markers": [(c.get_offsets().copy(), c.get_paths()) for c in ax.collections
                        if hasattr(c, "get_offsets") and len(c.get_offsets())],
            "texts": [t.get_text() for t in ax.texts]})
    return {"suptitle": fig.get_suptitle(), "axes": axes,
            "legend": [t.get_text() for leg in legends for t in leg.get_texts()]
            + [leg.get_title().get_text() for leg in legends]}


@pytest.fixture(scope="module")
def drawn(tables, tmp_path_factory):
    """Every figure of the synthetic tables, drawn once: (folder, files written, {PNG path: `describe`})."""
    import matplotlib.figure

    out = tmp_path_factory.mktemp("drawn") / "figures"
    records: dict[str, dict] = {}
    original = matplotlib.figure.Figure.savefig

    def recording_savefig(fig, path, *args, **kwargs):
        if str(path).endswith(".png.tmp"):
            records[str(path).removesuffix(".tmp")] = describe(fig)
        return original(fig, path, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(matplotlib.figure.Figure, "savefig", recording_savefig)
        written = draw_figures(tables, out)  # the studies come from studies.json
    return out, written, records


def figure(drawn, name: str) -> dict:
    (record,) = [r for path, r in drawn[2].items() if path.endswith(name)]
    return record


def panel(record: dict, title_part: str) -> dict:
    (found,) = [a for a in record["axes"] if title_part in a["title"]]
    return found


def test_draw_figures_writes_exactly_the_expected_files(drawn):
    out, written, _ = drawn
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


# ------------------------------------------------------------------ what a reader takes in at a glance


def code_identifiers() -> set[str]:
    """Names a reader should never meet in a figure: variants whose paper name differs from the code's,
    and the early-warning metrics."""
    from stabilab.early_warning import PREDICTORS
    from stabilab.methods import BY_NAME, label

    return {name for name in BY_NAME if label(name) != name} | {m for m in PREDICTORS if "_" in m}


def test_no_legend_or_title_shows_a_code_identifier(drawn):
    """Legends, titles and axis labels name variants and metrics as the papers do (`methods.label`,
    the early-warning METRIC_NAMES), never as the code does; no legend entry is snake_case at all."""
    import re

    names = re.compile(r"(?<![\w.])(" + "|".join(map(re.escape, sorted(code_identifiers()))) + r")(?![\w(])")
    snake = re.compile(r"(?<![\w<])[a-z]+(?:_[a-z0-9]+)+(?![\w>.])")
    for path, record in drawn[2].items():
        for text in record["legend"]:
            assert not names.search(text) and not snake.search(text), (path, text)
        for a in record["axes"]:
            for text in (a["title"], a["xlabel"], a["ylabel"]):
                assert not names.search(text), (path, text)
        assert not names.search(record["suptitle"]), (path, record["suptitle"])


def test_every_title_states_a_claim_then_the_regime_and_n(drawn):
    """The figures reworked for the issue open with the claim they show, and the second line gives the
    regime and the number of seeds."""
    for name in ("loss_vs_lr", "lr_sensitivity", "mu_norm_logits_vs_lr", "drift_vs_summed_lr", "ppl_vs_depth",
                 "ppl_vs_depth_best_lr", "loss_gap_vs_step", "grad_norm_traces", "spike_counts"):
        for path, record in drawn[2].items():
            if path.endswith(f"/{name}.png"):
                lines = record["suptitle"].splitlines()
                assert len(lines) >= 2 and "n = " in lines[1], (path, lines)


def test_a_sign_that_matters_is_drawn_on_a_symlog_axis(drawn):
    """The mean logit changes sign (negative in these runs, positive in OEC's): vs LR and over training
    it is drawn signed on a symlog axis, not as |mean logit| on a log one, with OEC's values as stars."""
    record = figure(drawn, "lr/mu_norm_logits_vs_lr.png")
    mean_logit = panel(record, "mean logit")
    assert mean_logit["yscale"] == "symlog"
    ys = np.concatenate([y for _, _, _, y in mean_logit["lines"] if len(y)])
    assert (ys < 0).any() and (ys > 0).any()
    assert not any("|mean logit|" in a["ylabel"] for a in record["axes"])
    assert any("OEC" in text for text in record["legend"])
    drift = figure(drawn, "lr/drift_vs_summed_lr.png")
    assert panel(drift, "mean logit")["yscale"] == "symlog"


def test_rounding_level_mu_and_its_cosine_are_not_drawn_as_data(drawn):
    """μ-centering's ‖μ‖ is float rounding (1e-8 here): neither it nor a cosine against it is drawn, and
    the panel says so; the ‖μ‖ axis then spans the measured values, not 1e-8 … 1e6."""
    from stabilab.methods import BY_NAME

    centred = BY_NAME["oec_center"].colour
    record = figure(drawn, "lr/mu_norm_logits_vs_lr.png")
    mu = panel(record, "of the output embedding")
    assert "not drawn: μ-centering" in mu["title"]
    assert centred not in {c for c, _, _, y in mu["lines"] if len(y)}
    assert mu["ylim"][0] > 1e-4
    drift = figure(drawn, "lr/drift_vs_summed_lr.png")
    for title in ("of the output embedding", "alignment"):
        p = panel(drift, title)
        assert "not drawn: μ-centering" in p["title"] and centred not in {c for c, _, _, y in p["lines"] if len(y)}


def test_diverged_runs_are_never_averaged_with_the_runs_that_survived():
    """At an LR where one seed diverged, the point is the survivor's value, and the diverged run's last
    measurement is drawn apart (a ✕ at its own value); the line does not pass through it."""
    import matplotlib.pyplot as plt

    from stabilab.figures.points import vs_x

    rows = [synthetic_run("lr", "baseline", 1, lr, s, diverge_at=12 if (lr == 3.0 and s == 1) else None)[0]
            for lr in (1e-2, 3.0) for s in (0, 1)]
    runs = pd.DataFrame(rows)
    runs.loc[runs["diverged"], "mu_norm"] = 1e4  # the diverged run's last measurement, far above the survivor's
    summary = study_summary(runs, "lr", "lr")
    fig, ax = plt.subplots()
    marks = vs_x(ax, summary[summary.metric == "mu_norm"], "lr", ["baseline"], {"baseline": "#404040"}, 2,
                 logx=True, logy=True, runs=runs)
    (line,) = [ln for ln in ax.get_lines() if ln.get_label() == "baseline"]
    survivor = runs[(runs.lr == 3.0) & ~runs.diverged]["mu_norm"].iloc[0]
    assert line.get_ydata()[-1] == pytest.approx(survivor)
    assert "diverged_values" in marks
    apart = np.concatenate([c.get_offsets()[:, 1] for c in ax.collections if len(c.get_offsets())])
    assert 1e4 in apart
    assert summary[(summary.metric == "mu_norm") & (summary.lr == 3.0)]["mean"].iloc[0] > 2 * survivor  # the table's
    plt.close(fig)


def test_panels_that_are_compared_share_one_y_scale():
    """Perplexity vs depth at two LRs: one y range for both panels (a 0.01-nat gap at one LR must not look
    like the 0.6-nat gap at the other)."""
    import matplotlib.pyplot as plt

    from stabilab.figures import depth

    lrs, variants = [3e-3, 1e-2], ["baseline", "mlra"]
    runs = pd.DataFrame([synthetic_run("depth", v, d, lr, s)[0] for v in variants for d in (1, 2) for lr in lrs
                         for s in (0, 1)])
    runs.loc[runs.lr == 1e-2, "final_val_ppl"] *= 3  # one LR far worse than the other
    summary = study_summary(runs, "depth", "depth")
    fig = depth._vs_depth(summary, runs, variants, {"baseline": "#404040", "mlra": "#0173b2"}, 2,
                          [("final_val_ppl", "ppl")], lrs, "t", 3.0)
    first, second = fig.axes[:2]
    assert first.get_ylim() == pytest.approx(second.get_ylim())
    plt.close(fig)


def test_lr_sensitivity_is_read_over_the_studys_own_lrs_with_the_papers_numbers(drawn, tables):
    """loss_vs_lr's legend gives each method's sensitivity over the study's `sensitivity_lrs` (the
    `_sub` rows, what the verdicts test) and OEC's own number; lr_sensitivity draws the seeds as dots
    and the best loss on an axis at least 0.5 nats tall; a study of 2 LRs says it has no sensitivity."""
    summary = pd.read_csv(tables / "summary_lr.csv")
    sub = summary[(summary.metric == "lr_sensitivity_sub") & (summary.variant == "baseline")]["mean"].iloc[0]
    legend = figure(drawn, "lr/loss_vs_lr.png")["legend"]
    assert any(text.startswith(f"baseline: {sub:.3f}") for text in legend), legend
    assert any("3 LRs 1e-2 … 0.3" in text for text in legend)
    record = figure(drawn, "lr/lr_sensitivity.png")
    best = panel(record, "best final loss")
    assert best["ylim"][1] - best["ylim"][0] >= 0.5 - 1e-9
    assert not any(a["ax"].patches for a in record["axes"])  # no bars
    import matplotlib.pyplot as plt

    from stabilab.figures.context import StudyTables
    from stabilab.figures.lr import loss_vs_lr, lr_sensitivity

    runs = pd.read_csv(tables / "runs.csv")
    two = runs[(runs.study == "lr") & runs.lr.isin([0.01, 0.1])].assign(diverged=False)
    spec = {"kind": "lr", "variants": ["baseline", "oec_center"], "lrs": [0.01, 0.1], "seeds": [0]}
    t = StudyTables("lr", spec, study_summary(two, "lr", "lr", spec=spec), pd.DataFrame(), two,
                    {"baseline": "#404040", "oec_center": "#029e73"}, tables)
    assert "not measured" in lr_sensitivity(t).get_suptitle()
    loss = loss_vs_lr(t)
    assert any("no LR sensitivity" in text for text in describe(loss)["legend"])
    low, high = loss.axes[0].get_ylim()
    assert high - low >= 0.5  # a loss axis at least 0.5 nats tall
    plt.close("all")


def test_the_best_lr_figure_marks_an_edge_and_pairs_the_seeds(drawn):
    """ppl_vs_depth_best_lr: each arm at its own best LR (the verdict's `over: best_lr`), labelled, and
    "(edge)" where that LR is the grid's smallest or largest; with one LR in the grid the title says no
    best LR was chosen; below, the paired differences seed by seed with the verdict's reading."""
    import matplotlib.pyplot as plt

    from stabilab.figures.claims import ppl_vs_depth_best_lr
    from stabilab.figures.context import StudyTables

    record = figure(drawn, "depth/ppl_vs_depth_best_lr.png")  # one LR in the synthetic grid
    assert "one LR in the grid" in record["suptitle"] and "optima may lie outside" in record["suptitle"]
    bottom = record["axes"][1]
    assert "not tested" in bottom["title"] and "MLRA − baseline" in bottom["title"]
    lrs = [1e-3, 3e-3, 1e-2]
    runs = pd.DataFrame([synthetic_run("depth", v, d, lr, s)[0] for v in ("baseline", "mlra") for d in (1, 2)
                         for lr in lrs for s in (0, 1)])
    runs.loc[runs.lr == 3e-3, "final_val_loss"] -= 1.0  # the middle LR best: inside the grid ...
    runs.loc[(runs.lr == 1e-2) & (runs.depth == 2), "final_val_loss"] -= 2.0  # ... but at depth 2 the edge
    runs["final_val_ppl"] = np.exp(runs["final_val_loss"])
    spec = {"kind": "depth", "variants": ["baseline", "mlra"], "depths": [1, 2], "lrs": lrs, "seeds": [0, 1]}
    fig = ppl_vs_depth_best_lr(StudyTables("depth", spec, pd.DataFrame(), pd.DataFrame(), runs,
                                           {"baseline": "#404040", "mlra": "#0173b2"}, Path(".")))
    labels = sorted(t.get_text() for t in fig.axes[0].texts)
    assert labels == ["1e-2 (edge)", "1e-2 (edge)", "3e-3", "3e-3"], labels
    plt.close(fig)


def test_the_spam_gap_is_the_verdicts_paired_difference(tables):
    """loss_gap_vs_step: the mean gap drawn at each evaluation is the verdict's (`over: step`) mean paired
    difference of validation losses, SPAM minus the first variant, and the paper's gap is marked."""
    from stabilab.figures.claims import SPAM_PAPER_GAP, loss_gap_vs_step
    from stabilab.figures.context import StudyTables
    from stabilab.verdicts import verdict_rows

    runs, steps = pd.read_csv(tables / "runs.csv"), pd.read_csv(tables / "steps.csv")
    runs, steps = runs[runs.study == "spikes"], steps[steps.study == "spikes"]
    spec = STUDIES["spikes"]
    t = StudyTables("spikes", spec, pd.DataFrame(), steps, runs, {"adamw_noclip": "#17a3c7", "spam": "#6a3d9a"},
                    tables)
    fig = loss_gap_vs_step(t)
    rows = pd.DataFrame(verdict_rows("x", {"study": "spikes", "metric": "val_loss", "arms": ["adamw_noclip", "spam"],
                                           "over": "step"}, runs, steps, spec))
    bottom = fig.axes[1]
    (mean,) = [ln for ln in bottom.get_lines() if mcolor(ln) == "#6a3d9a"]
    np.testing.assert_allclose(mean.get_ydata(), rows.sort_values("step")["diff_finite_mean"])
    assert any(np.allclose(ln.get_ydata(), SPAM_PAPER_GAP) for ln in bottom.get_lines())


def mcolor(line) -> str:
    import matplotlib.colors as mcolors

    return mcolors.to_hex(line.get_color())


def test_spike_counts_put_the_dense_weights_first_on_a_symlog_axis():
    """Per-element spike counts by parameter kind: symlog (zero kept, the embedding's 1e8 beside the
    attention's 1e2), attention, MLP and norm gains before the embedding and head; one y per LR panel."""
    import matplotlib.pyplot as plt

    from stabilab.figures.context import StudyTables
    from stabilab.figures.spikes import spike_counts

    rows = []
    for variant in ("adamw_noclip", "spam"):
        for lr in (1e-3, 4e-3):
            for seed in (0, 1):
                run = synthetic_run("spikes", variant, 1, lr, seed)[0]
                run.update(gss_spikes_embedding=1.5e8, gss_spikes_attn=300.0 * lr / 1e-3, gss_spikes_mlp=0.0,
                           gss_spikes_norm=5.0, gss_spikes_head=4e7)
                rows.append(run)
    runs = pd.DataFrame(rows)
    spec = {"kind": "spikes", "variants": ["adamw_noclip", "spam"], "lrs": [1e-3, 4e-3], "seeds": [0, 1]}
    t = StudyTables("spikes", spec, study_summary(runs, "spikes", "spikes"), pd.DataFrame(), runs,
                    {"adamw_noclip": "#17a3c7", "spam": "#6a3d9a"}, Path("."))
    fig = spike_counts(t)
    ax = fig.axes[0]
    assert ax.get_yscale() == "symlog" and ax.get_ylim()[0] == 0
    assert [t.get_text() for t in ax.get_xticklabels()] == ["attention", "MLP", "norm gains", "embedding",
                                                            "output head"]
    assert fig.axes[0].get_ylim() == fig.axes[1].get_ylim()
    plt.close(fig)
