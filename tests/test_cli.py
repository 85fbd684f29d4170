"""The command line as a newcomer meets it: `stabilab targets`, `check-config`, a closed stdout."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from stabilab.cli import main

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
