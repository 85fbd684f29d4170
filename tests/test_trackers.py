"""Experiment trackers (runtime.trackers, STABILAB_TRACKERS): what a run logs to MLflow and to
W&B (offline), read back from their files; a diverged run closes them marked as such; a resumed
run continues its tracker run. Each test needs its tracker's package (`stabilab[mlflow]`,
`stabilab[wandb]`) and skips without it."""

from __future__ import annotations

import json
import struct
import sys

import pytest

from conftest import run_killed_at, tiny_run
from stabilab.config import RuntimeConfig, load_run_config
from stabilab.errors import UserError
from stabilab.train import Trainer
from stabilab.train.sinks import MLflowSink, WandbSink, tracker_names

pytestmark = pytest.mark.usefixtures("one_torch_thread")

NAME = "test/baseline/L2_lr0.01_s0"  # tiny_run's study/variant/depth/lr/seed, as its folder is named
DIVERGING = {"optim": {"lr": 1e3, "warmup_steps": 1, "grad_clip": None},
             "train": {"steps": 200, "divergence": {"margin": 1.0, "patience": 10}}}


@pytest.fixture(autouse=True)
def tracker_env(monkeypatch, tmp_path):
    """The trackers' defaults (no WANDB_*/MLFLOW_* of the caller's), their caches in tmp_path."""
    for var in ("STABILAB_TRACKERS", "WANDB_MODE", "WANDB_DIR", "WANDB_PROJECT", "MLFLOW_TRACKING_URI",
                "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(var, raising=False)
    for var in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home"))
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # the sink sets it too; here it is undone afterwards


def train(tiny_data, folder, trackers=(), **sections) -> dict:
    runtime = RuntimeConfig(trackers=list(trackers))
    return Trainer(load_run_config(tiny_run(tiny_data["shards"], **sections)), folder, runtime).run()


def jsonl(folder) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------- choosing trackers


def test_the_environment_variable_replaces_the_configured_trackers(monkeypatch):
    assert tracker_names(["tensorboard"]) == ["tensorboard"]
    monkeypatch.setenv("STABILAB_TRACKERS", "wandb, mlflow,wandb")
    assert tracker_names(["tensorboard"]) == ["wandb", "mlflow"]
    monkeypatch.setenv("STABILAB_TRACKERS", "")
    assert tracker_names(["tensorboard"]) == []
    monkeypatch.setenv("STABILAB_TRACKERS", "wandb,neptune")
    with pytest.raises(UserError, match=r"STABILAB_TRACKERS: unknown tracker 'neptune' \(allowed: tensorboard, "):
        tracker_names([])


@pytest.mark.parametrize("sink, package", [(WandbSink, "wandb"), (MLflowSink, "mlflow")])
def test_a_missing_tracker_package_is_one_line_naming_the_extra(tiny_data, tmp_path, monkeypatch, sink, package):
    monkeypatch.setitem(sys.modules, package, None)  # import fails as if not installed
    cfg = load_run_config(tiny_run(tiny_data["shards"]))
    with pytest.raises(UserError) as e:
        sink(tmp_path, cfg)
    assert str(e.value) == (f"the {package} tracker is on but its package is not installed "
                            f"(pip install 'stabilab[{package}]')")


# ----------------------------------------------------------------------------- TensorBoard


def test_tensorboard_writes_each_record_s_finite_floats(tiny_data, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train(tiny_data, tmp_path, ["tensorboard"])
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    recs = jsonl(tmp_path)
    assert [(e.step, e.value) for e in events.Scalars("train_loss")] == [
        (r["step"], pytest.approx(r["train_loss"], rel=1e-6)) for r in recs]
    assert "tokens" not in events.Tags()["scalars"] and "val_loss" in events.Tags()["scalars"]


# ----------------------------------------------------------------------------- MLflow


def mlflow_runs(folder) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=(folder / "mlruns").resolve().as_uri())
    experiment = client.get_experiment_by_name("stabilab")
    return client, client.search_runs([experiment.experiment_id])


def test_mlflow_logs_params_metrics_and_the_summary(tiny_data, tmp_path):
    pytest.importorskip("mlflow")
    summary = train(tiny_data, tmp_path, ["mlflow"])
    client, runs = mlflow_runs(tmp_path)
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED" and run.info.run_name == NAME
    params, tags, metrics = run.data.params, run.data.tags, run.data.metrics
    assert params["model.n_layer"] == "2" and params["optim.lr"] == "0.01" and params["study"] == "test"
    assert params["optim.grad_clip"] == "1.0" and params["model.mlra.targets"] == '["q", "k", "v"]'
    assert {k: tags[k] for k in ("study", "variant", "depth", "lr", "seed", "diverged", "status")} == {
        "study": "test", "variant": "baseline", "depth": "2", "lr": "0.01", "seed": "0", "diverged": "false",
        "status": "finished"}
    recs = jsonl(tmp_path)
    history = client.get_metric_history(run.info.run_id, "train_loss")
    assert [(m.step, m.value) for m in history] == [(r["step"], r["train_loss"]) for r in recs]
    val = client.get_metric_history(run.info.run_id, "val_loss")
    assert [m.step for m in val] == [20, 40]
    assert "tokens" not in metrics  # counts are not plotted, as in TensorBoard: finite floats only
    assert metrics["summary/final_val_loss"] == summary["final_val_loss"] == recs[-1]["val_loss"]
    assert metrics["summary/params"] == summary["params"] and metrics["summary/diverged"] == 0.0
    assert tags["summary/provenance.torch"] == summary["provenance"]["torch"]


def test_mlflow_param_values_are_cut_to_its_length_limit(tiny_data, tmp_path):
    pytest.importorskip("mlflow")
    from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

    long = "/x" * MAX_PARAM_VAL_LENGTH  # a path longer than MLflow takes
    sink = MLflowSink(tmp_path, load_run_config(tiny_run(tiny_data["shards"], train={"init_from": long})))
    sink.close("failed")
    client, (run,) = mlflow_runs(tmp_path)
    assert run.data.params["train.init_from"] == long[:MAX_PARAM_VAL_LENGTH] and run.info.status == "FAILED"


def test_a_diverged_run_closes_both_trackers_marked_diverged(tiny_data, tmp_path):
    pytest.importorskip("mlflow")
    pytest.importorskip("wandb")
    summary = train(tiny_data, tmp_path, ["mlflow", "wandb"], **DIVERGING)
    assert summary["diverged"]
    _, (run,) = mlflow_runs(tmp_path)
    assert run.info.status == "FINISHED" and run.data.tags["diverged"] == "true"
    assert run.data.metrics["summary/diverged_step"] == summary["diverged_step"]
    assert run.data.tags["summary/divergence_reason"] == summary["divergence_reason"]
    logged = read_wandb(tmp_path)
    assert "diverged" in logged["tags"] and logged["exit_code"] == 0
    assert logged["summary"]["diverged"] is True and logged["summary"]["status"] == "diverged"
    assert logged["summary"]["diverged_step"] == summary["diverged_step"]


def test_a_resumed_run_continues_its_mlflow_run(tiny_data, tmp_path):
    """A run killed after its checkpoint at step 20 is FAILED in MLflow; resumed, the same run
    goes on and ends FINISHED, with the steps after the checkpoint logged again."""
    pytest.importorskip("mlflow")

    cfg = load_run_config(tiny_run(tiny_data["shards"]))
    first = Trainer(cfg, tmp_path, RuntimeConfig(trackers=["mlflow"]))
    run_killed_at(first, 25)
    client, (killed,) = mlflow_runs(tmp_path)
    assert killed.info.status == "FAILED" and killed.data.tags["status"] == "failed"
    Trainer(cfg, tmp_path, RuntimeConfig(trackers=["mlflow"])).run()
    client, (resumed,) = mlflow_runs(tmp_path)
    assert resumed.info.run_id == killed.info.run_id and resumed.info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(resumed.info.run_id, "train_loss")]
    assert steps == [1, 5, 10, 15, 20, 25, 25, 30, 35, 40]  # 25: once by the lost attempt, once resumed


# ----------------------------------------------------------------------------- W&B (offline)


def wandb_records(path) -> list:
    """The records of a W&B transaction log (run-<id>.wandb): LevelDB's log format (32 KiB
    blocks of chunks, each behind crc32, length, type), after a 7-byte ':W&B' header; each
    whole chunk sequence is one protobuf Record."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B transaction log"
    block, pos, chunk, records = 32768, 7, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7]) if left >= 7 else (0, 0, 0)
        if kind == 0:  # a block's zero padding
            pos += left
            continue
        chunk += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunk)
            records.append(record)
            chunk = b""
    return records


def read_wandb(folder) -> dict:
    """What the one offline run under `folder`/wandb logged: run fields, config, history by step,
    summary, exit code."""
    (path,) = (folder / "wandb").glob("offline-run-*/run-*.wandb")
    out = {"history": {}, "summary": {}, "config": {}, "exit_code": None}
    key = lambda item: item.key or ".".join(item.nested_key)
    for record in wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = record.run
            out.update(name=run.display_name, group=run.run_group, job_type=run.job_type, tags=list(run.tags),
                       project=run.project)
            out["config"].update({key(i): json.loads(i.value_json) for i in run.config.update})
        elif kind == "history":
            items = {key(i): json.loads(i.value_json) for i in record.history.item}
            out["history"][items["_step"]] = items
        elif kind == "summary":
            out["summary"].update({key(i): json.loads(i.value_json) for i in record.summary.update})
        elif kind == "exit":
            out["exit_code"] = record.exit.exit_code
    return out


def test_wandb_offline_logs_config_history_and_summary(tiny_data, tmp_path, monkeypatch):
    """Switched on by STABILAB_TRACKERS; offline by default, into the run folder."""
    pytest.importorskip("wandb")
    monkeypatch.setenv("STABILAB_TRACKERS", "wandb")
    summary = train(tiny_data, tmp_path)
    logged = read_wandb(tmp_path)
    assert logged["name"] == NAME and logged["group"] == "test" and logged["job_type"] == "baseline"
    assert logged["tags"] == ["test", "baseline"] and logged["project"] == "stabilab"
    assert logged["config"]["model"]["n_layer"] == 2 and logged["config"]["optim"]["lr"] == 0.01
    recs = jsonl(tmp_path)
    assert sorted(logged["history"]) == [r["step"] for r in recs]
    assert [logged["history"][r["step"]]["train_loss"] for r in recs] == [r["train_loss"] for r in recs]
    assert "tokens" not in logged["history"][40] and logged["history"][40]["val_loss"] == recs[-1]["val_loss"]
    assert logged["summary"]["final_val_loss"] == summary["final_val_loss"]
    assert logged["summary"]["provenance.torch"] == summary["provenance"]["torch"]
    assert logged["summary"]["status"] == "finished" and logged["summary"]["diverged"] is False
    assert logged["exit_code"] == 0


@pytest.fixture(scope="module", autouse=True)
def stop_wandb_service():
    """W&B runs a service process for the runs of this process: stop it after these tests."""
    yield
    if "wandb" in sys.modules and sys.modules["wandb"] is not None:
        sys.modules["wandb"].teardown()
