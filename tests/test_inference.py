"""stabilab sample and eval: a finished run's model used again; a bad argument is refused in one
line before the run folder is read."""

from __future__ import annotations

import pytest
import torch

from conftest import write_run
from stabilab import inference
from stabilab.cli import main
from stabilab.device import pick_device
from stabilab.errors import UserError


@pytest.fixture(scope="module")
def run_dir(tiny_data, tmp_path_factory):
    folder = tmp_path_factory.mktemp("inference") / "run"
    write_run(folder, tiny_data)
    return folder


BAD = {
    "tokens-0": (["sample", "--tokens", "0"], "--tokens must be at least 1 (got 0)"),
    "tokens-negative": (["sample", "--tokens", "-1"], "--tokens must be at least 1 (got -1)"),
    "temperature-0": (["sample", "--temperature", "0"], "--temperature must be a finite number > 0 (got 0)"),
    "temperature-negative": (["sample", "--temperature", "-1"], "--temperature must be a finite number > 0 (got -1)"),
    "temperature-nan": (["sample", "--temperature", "nan"], "--temperature must be a finite number > 0 (got nan)"),
    "temperature-inf": (["sample", "--temperature", "inf"], "--temperature must be a finite number > 0 (got inf)"),
    "top-k": (["sample", "--top-k", "-1"], "--top-k must be >= 0 (0: all tokens; got -1)"),
    "seed-negative": (["sample", "--seed", "-1"], "--seed must be in [0, 2^64) (got -1)"),
    "seed-huge": (["sample", "--seed", str(2**64)], f"--seed must be in [0, 2^64) (got {2**64})"),
    "sample-device": (["sample", "--device", "gpu"], "--device must be auto, cpu, cuda or cuda:N (got 'gpu')"),
    "sample-device-meta": (["sample", "--device", "meta"], "--device must be auto, cpu, cuda or cuda:N (got 'meta')"),
    "batches-0": (["eval", "--batches", "0"], "--batches must be at least 1 (got 0)"),
    "batches-negative": (["eval", "--batches", "-2"], "--batches must be at least 1 (got -2)"),
    "eval-device": (["eval", "--device", "cuda:x"], "--device must be auto, cpu, cuda or cuda:N (got 'cuda:x')"),
    "eval-device-cudax": (["eval", "--device", "cudax"], "--device must be auto, cpu, cuda or cuda:N (got 'cudax')"),
}


@pytest.mark.parametrize("args, message", BAD.values(), ids=BAD.keys())
def test_a_bad_argument_is_refused_in_one_line_before_the_run_is_read(run_dir, capsys, monkeypatch, args, message):
    def unread(*_):
        raise AssertionError("the run's weights were read")

    monkeypatch.setattr(inference, "load_weights", unread)
    command, *rest = args
    assert main([command, "--run", str(run_dir), *rest]) == 2
    assert capsys.readouterr().err == f"error: {message}\n"


def test_good_arguments_sample_and_evaluate(run_dir, capsys, one_torch_thread):
    assert main(["sample", "--run", str(run_dir), "--prompt", "the king", "--tokens", "1", "--top-k", "5",
                 "--temperature", "0.5", "--seed", str(2**64 - 1), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("the king") and len(out) > len("the king\n")
    assert main(["eval", "--run", str(run_dir), "--batches", "1", "--device", "cpu"]) == 0
    assert '"batches": 1' in capsys.readouterr().out


def test_a_cuda_index_beyond_the_devices_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert pick_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(UserError, match=r"^--device cuda:2: this machine has 2 CUDA devices \(cuda:0 to cuda:1\)$"):
        pick_device("cuda:2")
