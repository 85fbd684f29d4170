"""The trainer: outputs, exact resume, divergence as data."""

from __future__ import annotations

import json
import math

import pytest

from conftest import run_killed_at, tiny_run
from stabilab.config import load_run_config
from stabilab.errors import UserError
from stabilab.train import Trainer

TIMING = {"tokens_per_s"}


def records(folder) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING}
            for line in (folder / "metrics.jsonl").read_text().splitlines()]


def test_outputs_and_summary(tiny_data, tmp_path):
    summary = Trainer(load_run_config(tiny_run(tiny_data["shards"])), tmp_path).run()
    assert {p.name for p in tmp_path.iterdir()} == {"config.json", "metrics.jsonl", "summary.json", "model.pt"}
    recs = records(tmp_path)
    assert recs[0]["step"] == 1 and recs[-1]["step"] == 40
    assert {"train_loss", "lr", "grad_norm", "tokens"} <= set(recs[0])
    assert [r["step"] for r in recs if "val_loss" in r] == [20, 40]
    assert recs[-1]["train_loss"] < recs[0]["train_loss"] - 1.0
    assert summary["final_val_loss"] == recs[-1]["val_loss"]
    assert summary["final_val_ppl"] == pytest.approx(math.exp(summary["final_val_loss"]))
    assert not summary["diverged"] and summary["params"] > 0
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model"]["vocab_size"] == 300 and saved["optim"]["lr"] == 1e-2


@pytest.mark.parametrize("variant", [{}, {"optim": {"name": "spam", "spam": {"reset_interval": 15}}},
                                     {"optim": {"perpgrad": True}}], ids=["adamw", "spam", "perpgrad"])
def test_resume_equals_uninterrupted_run(tiny_data, tmp_path, variant):
    run = tiny_run(tiny_data["shards"], **variant)
    Trainer(load_run_config(run), tmp_path / "full").run()

    first = Trainer(load_run_config(run), tmp_path / "resumed")
    run_killed_at(first, 25)  # after the checkpoint at step 20: steps 21-25 are lost work
    assert not (tmp_path / "resumed" / "summary.json").exists()  # unfinished runs never look finished
    Trainer(load_run_config(run), tmp_path / "resumed").run()
    assert records(tmp_path / "resumed") == records(tmp_path / "full")


def test_changed_config_starts_afresh(tiny_data, tmp_path):
    Trainer(load_run_config(tiny_run(tiny_data["shards"], train={"steps": 10})), tmp_path).run()
    Trainer(load_run_config(tiny_run(tiny_data["shards"], train={"steps": 15})), tmp_path).run()
    assert [r["step"] for r in records(tmp_path)] == [1, 5, 10, 15]


def test_absurd_learning_rate_is_recorded_as_divergence(tiny_data, tmp_path):
    run = tiny_run(tiny_data["shards"], optim={"lr": 1e3, "warmup_steps": 1, "grad_clip": None},
                   train={"steps": 200, "divergence": {"margin": 1.0, "patience": 10}})
    summary = Trainer(load_run_config(run), tmp_path).run()
    assert summary["diverged"] and summary["diverged_step"] < 200
    assert summary["final_val_loss"] is None
    assert records(tmp_path)[-1]["step"] == summary["diverged_step"]


def test_final_weights_live_on_for_eval_sample_and_a_new_run(tiny_data, tmp_path):
    """model.pt (kept by default) evaluates to the run's own final validation loss, samples text
    with the run's tokenizer, and starts another run from where this one ended."""
    import subprocess
    import sys

    from stabilab.inference import evaluate, sample

    run = tiny_run(tiny_data["shards"], data={"tokenizer_file": str(tiny_data["root"] / "tokenizer.json")})
    summary = Trainer(load_run_config(run), tmp_path / "a").run()
    assert (tmp_path / "a" / "model.pt").exists() and not (tmp_path / "a" / "ckpt.pt").exists()
    result = evaluate(tmp_path / "a", device="cpu")
    assert result["loss"] == pytest.approx(summary["final_val_loss"], rel=1e-6)
    text = sample(tmp_path / "a", "the king", tokens=12, seed=1, device="cpu")
    assert text.startswith("the king") and len(text) > len("the king")
    assert sample(tmp_path / "a", "the king", tokens=12, seed=1, device="cpu") == text  # seeded
    cli = subprocess.run([sys.executable, "-m", "stabilab.cli", "eval", "--run", str(tmp_path / "a"),
                          "--device", "cpu"], capture_output=True, text=True)
    assert cli.returncode == 0 and '"loss"' in cli.stdout

    warm = tiny_run(tiny_data["shards"], train={"steps": 10, "init_from": str(tmp_path / "a" / "model.pt")},
                    optim={"warmup_steps": 1, "lr": 1e-4})
    Trainer(load_run_config(warm), tmp_path / "b").run()
    first = records(tmp_path / "b")[0]["train_loss"]
    assert first < records(tmp_path / "a")[0]["train_loss"] - 1.0  # it starts trained
    (tmp_path / "a" / "model.pt").unlink()
    with pytest.raises(UserError, match="no final weights"):
        evaluate(tmp_path / "a", device="cpu")
    with pytest.raises(UserError, match="not a run folder"):
        evaluate(tmp_path / "missing", device="cpu")


@pytest.mark.parametrize("mode, graphs", [("default", False), ("reduce-overhead", True),
                                          ("max-autotune-no-cudagraphs", False), ("auto", False)])
def test_compile_mode_reaches_the_model_graph_and_marks_steps_only_with_cuda_graphs(
        mode, graphs, tiny_data, tmp_path, monkeypatch):
    """runtime.compile_mode is the mode the model + loss graph is compiled with (auto: torch's
    default on the CPU) and the one summary.json records; only the CUDA-graph modes make the loop
    mark each call's start (on CUDA: here `graphs` is forced to see the calls)."""
    import torch

    from stabilab.config import CUDA_GRAPH_MODES, RuntimeConfig

    modes, marks = [], []
    monkeypatch.setattr(torch, "compile", lambda fn, mode=None, **kw: modes.append(mode) or fn)
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    runtime = RuntimeConfig(device="cpu", compile=True, compile_mode=mode)
    cfg = load_run_config(tiny_run(tiny_data["shards"], train={"grad_accum": 2, "steps": 2}))
    trainer = Trainer(cfg, tmp_path, runtime)
    resolved = "default" if mode == "auto" else mode
    assert modes[0] == resolved and trainer.graphs is False  # CPU: no graphs
    trainer.graphs = resolved in CUDA_GRAPH_MODES
    trainer.train_step(measure=False)
    assert len(marks) == (2 if graphs else 0)  # one mark per micro-batch call
    trainer.graphs = False
    assert trainer.run()["provenance"]["compile_mode"] == resolved


def test_auto_compile_mode_records_cuda_graphs_only_for_one_process_on_cuda():
    import torch

    from stabilab.config import RuntimeConfig

    auto, fixed = RuntimeConfig(), RuntimeConfig(compile_mode="max-autotune")
    assert auto.compile_mode == "auto"
    assert auto.compile_mode_on(torch.device("cuda", 0)) == "reduce-overhead"
    assert auto.compile_mode_on(torch.device("cuda", 1), world=2) == "default"
    assert auto.compile_mode_on(torch.device("cpu")) == "default"
    assert fixed.compile_mode_on(torch.device("cpu"), world=4) == "max-autotune"


def test_with_cuda_graphs_accumulated_gradients_leave_the_graph_memory_before_the_next_replay(
        tiny_data, tmp_path, monkeypatch):
    """Under CUDA graphs a backward's outputs live in the graph's memory pool, which the next
    micro-batch's replay overwrites; autograd makes the first micro-batch's gradient tensors the
    .grad themselves. So before the second micro-batch starts, no .grad may still be a tensor the
    first backward produced (on the GPU: "accessing tensor output of CUDAGraphs that has been
    overwritten"); the step's gradients, and so the run, stay those of the loop without graphs."""
    import torch

    from stabilab.config import RuntimeConfig

    def step(graphs: bool):
        produced, shared = {}, []

        def mark():  # called before each micro-batch's forward
            shared.append(sum(p.grad is not None and p.grad.data_ptr() == produced.get(i)
                              for i, p in enumerate(trainer.params)))
            produced.clear()

        monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", mark)
        trainer = Trainer(load_run_config(tiny_run(tiny_data["shards"], train={"grad_accum": 2})), tmp_path,
                          RuntimeConfig(device="cpu", compile=False))
        for i, p in enumerate(trainer.params):  # only the pointer: a kept reference would make autograd copy
            p.register_hook(lambda g, i=i: produced.__setitem__(i, g.data_ptr()))
        trainer.graphs = graphs
        trainer.train_step(measure=False)
        mark()
        return shared, [p.detach().clone() for p in trainer.params]

    shared, weights = step(graphs=True)
    assert shared == [0, 0, 0]
    _, plain = step(graphs=False)
    assert all(torch.equal(a, b) for a, b in zip(weights, plain))


def test_an_unknown_compile_mode_is_one_line(tiny_data, tmp_path):
    import subprocess
    import sys

    run = tmp_path / "run.json"
    run.write_text(json.dumps(tiny_run(tiny_data["shards"])))
    proc = subprocess.run([sys.executable, "-m", "stabilab.cli", "train", "--run", str(run), "--out",
                           str(tmp_path / "out"), "--runtime", json.dumps({"compile_mode": "fast"})],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and "compile_mode" in proc.stderr


def _signal_at(trainer, step: int, signum) -> None:
    """Send `signum` to this process just before `trainer` takes step `step + 1` (once)."""
    import os

    original = trainer.train_step

    def train_step(measure):
        if trainer.step == step:
            os.kill(os.getpid(), signum)
        return original(measure)

    trainer.train_step = train_step


def test_ctrl_c_checkpoints_like_sigterm_and_the_resume_says_from_where_and_why(tiny_data, tmp_path, capsys):
    import signal

    run = tiny_run(tiny_data["shards"])
    Trainer(load_run_config(run), tmp_path / "full").run()
    first = Trainer(load_run_config(run), tmp_path / "resumed")
    _signal_at(first, 12, signal.SIGINT)  # stops at the next log step, 15, with a checkpoint there
    before = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal (pytest may run ignoring it)
    try:
        with pytest.raises(SystemExit) as stop:
            first.run()
        assert stop.value.code == 130 and signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, before)
    assert "interrupted: checkpoint written at step 15; run the same command again to resume" in capsys.readouterr().out
    summary = Trainer(load_run_config(run), tmp_path / "resumed").run()
    assert records(tmp_path / "resumed") == records(tmp_path / "full")  # nothing lost, nothing changed
    assert summary["resumes"] == [{"from_step": 15, "reason": "interrupted (SIGINT) at step 15"}]
    assert json.loads((tmp_path / "full" / "summary.json").read_text())["resumes"] == []


def test_a_resume_after_running_out_of_memory_or_a_kill_says_so(tiny_data, tmp_path):
    import torch

    run = tiny_run(tiny_data["shards"])
    trainer = Trainer(load_run_config(run), tmp_path)
    original = trainer.train_step

    def out_of_memory_at_25(measure):
        if trainer.step == 25:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return original(measure)

    trainer.train_step = out_of_memory_at_25
    with pytest.raises(torch.OutOfMemoryError):
        trainer.run()
    run_killed_at(Trainer(load_run_config(run), tmp_path), 33)  # resumes from 20, then dies at 33
    (tmp_path / "attempts.jsonl").write_text(  # as if SIGKILLed: the second attempt left no record
        "\n".join((tmp_path / "attempts.jsonl").read_text().splitlines()[:-1]) + "\n")
    summary = Trainer(load_run_config(run), tmp_path).run()
    assert summary["resumes"] == [{"from_step": 20, "reason": "out of GPU memory at step 25"},
                                  {"from_step": 30, "reason": "unknown (the attempt before left no record: killed)"}]


def test_a_changed_config_forgets_the_earlier_attempts(tiny_data, tmp_path):
    run_killed_at(Trainer(load_run_config(tiny_run(tiny_data["shards"])), tmp_path), 25)
    assert (tmp_path / "attempts.jsonl").exists()
    summary = Trainer(load_run_config(tiny_run(tiny_data["shards"], train={"steps": 15})), tmp_path).run()
    assert summary["resumes"] == [] and not (tmp_path / "attempts.jsonl").exists()


def test_a_ctrl_c_delivered_twice_at_once_is_one_and_a_later_second_stops_at_once(monkeypatch):
    """A wrapper (timeout, a job runner) may relay the terminal's SIGINT beside it: the copy is the
    same Ctrl-C; a second Ctrl-C a moment later stops without waiting for the next log step."""
    import signal

    from stabilab.train import trainer

    clock = iter([100.0, 100.2, 102.0])
    monkeypatch.setattr(trainer.time, "monotonic", lambda: next(clock))
    t = Trainer.__new__(Trainer)
    t.stop_requested, t.stop_signal, t.stop_time = False, None, 0.0
    t.procs = type("P", (), {"is_main": False})()
    t._on_stop_signal(signal.SIGINT, None)  # at 100.0
    t._on_stop_signal(signal.SIGINT, None)  # at 100.2: the same Ctrl-C
    assert t.stop_requested and t.stop_signal == signal.SIGINT
    with pytest.raises(KeyboardInterrupt):
        t._on_stop_signal(signal.SIGINT, None)  # at 102.0: a second Ctrl-C


def test_a_run_started_ignoring_sigint_keeps_ignoring_it(tiny_data, tmp_path):
    """A background job of a shell starts with SIGINT ignored: the terminal's Ctrl-C is not for it."""
    import signal

    trainer = Trainer(load_run_config(tiny_run(tiny_data["shards"], train={"steps": 10})), tmp_path)
    _signal_at(trainer, 3, signal.SIGINT)
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        summary = trainer.run()
    finally:
        signal.signal(signal.SIGINT, before)
    assert summary["steps"] == 10 and summary["resumes"] == []
