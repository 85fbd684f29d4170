"""Where a run's log records go: metrics.jsonl (always), the console, and the experiment
trackers chosen by runtime.trackers or STABILAB_TRACKERS: TensorBoard, Weights & Biases, MLflow.

A sink has write(rec, note) and close(status, summary). status is how the run ended: finished,
diverged (both with the run's summary), preempted (SIGTERM: it resumes later) or failed. A
tracker also has `run_id`; the trainer keeps it in the checkpoint, so that a resumed run logs
into the same tracker run. Tracker packages are imported here, only when chosen.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import sys
import time
import typing
from pathlib import Path

from ..config import RunConfig, Tracker, leaves
from ..errors import UserError
from ..layout import run_name

TRACKERS_ENV = "STABILAB_TRACKERS"  # comma-separated tracker names; when set, replaces runtime.trackers


def _json_value(x):
    return None if isinstance(x, float) and not math.isfinite(x) else x


def _scalars(rec: dict) -> dict[str, float]:
    """A record's values that trackers plot: the finite floats (not the step, not counts)."""
    return {k: v for k, v in rec.items() if k != "step" and isinstance(v, float) and math.isfinite(v)}


def _summary_values(summary: dict) -> dict:
    """The summary's scalars, flattened (provenance.torch, ...): numbers, bools and strings; no
    None, no non-finite floats."""
    return {k: v for k, v in leaves(summary).items()
            if isinstance(v, (bool, int, str)) or (isinstance(v, float) and math.isfinite(v))}


def _import(module: str, tracker: str):
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(f"the {tracker} tracker is on but its package is not installed "
                        f"(pip install 'stabilab[{tracker}]')") from None


def _one_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def tracker_names(configured: list[str]) -> list[str]:
    """runtime.trackers, or the names in STABILAB_TRACKERS when that is set ('' for none)."""
    if TRACKERS_ENV not in os.environ:
        return list(configured)
    names = [n.strip() for n in os.environ[TRACKERS_ENV].split(",") if n.strip()]
    allowed = typing.get_args(Tracker)
    for name in names:
        if name not in allowed:
            raise UserError(f"{TRACKERS_ENV}: unknown tracker '{name}' (allowed: {', '.join(allowed)})")
    return list(dict.fromkeys(names))


class JSONLSink:
    """metrics.jsonl: one record per line, flushed at once (the tables read it)."""

    def __init__(self, folder: Path):
        self.file = open(folder / "metrics.jsonl", "a")

    def write(self, rec: dict, note: str = "") -> None:
        self.file.write(json.dumps({k: _json_value(v) for k, v in rec.items()}) + "\n")
        self.file.flush()

    def close(self, status: str = "finished", summary: dict | None = None) -> None:
        self.file.close()


class TensorBoardSink:
    """run folder/tensorboard: `tensorboard --logdir results/<name>/runs` shows every run."""

    def __init__(self, folder: Path):
        tensorboard = _import("torch.utils.tensorboard", "tensorboard")
        self.writer = tensorboard.SummaryWriter(str(folder / "tensorboard"))

    def write(self, rec: dict, note: str = "") -> None:
        for k, v in _scalars(rec).items():
            self.writer.add_scalar(k, v, rec["step"])

    def close(self, status: str = "finished", summary: dict | None = None) -> None:
        self.writer.close()


class WandbSink:
    """Weights & Biases: offline unless WANDB_MODE says otherwise (`wandb sync` uploads later),
    files in WANDB_DIR, else the run folder (wandb/offline-run-*), project WANDB_PROJECT, else
    'stabilab'; the run is named after its folder, grouped by study, tagged study and variant."""

    name = "wandb"

    def __init__(self, folder: Path, cfg: RunConfig, run_id: str | None = None):
        wandb = _import("wandb", "wandb")
        try:
            self.run = wandb.init(
                mode=os.environ.get("WANDB_MODE", "offline"), dir=os.environ.get("WANDB_DIR", str(folder)),
                project=os.environ.get("WANDB_PROJECT", "stabilab"), name=_name(cfg), group=cfg.study,
                job_type=cfg.variant, tags=[cfg.study, cfg.variant], config=cfg.to_dict(),
                id=run_id, resume="allow" if run_id else None, settings=wandb.Settings(console="off"))
        except (wandb.errors.Error, ValueError) as e:  # online without an API key, a bad WANDB_MODE, ...
            raise UserError(f"wandb: {_one_line(e)}") from None
        self.run_id = self.run.id

    def write(self, rec: dict, note: str = "") -> None:
        self.run.log(_scalars(rec), step=rec["step"])

    def close(self, status: str = "finished", summary: dict | None = None) -> None:
        if summary is not None:
            self.run.summary.update(_summary_values(summary))
        self.run.summary["status"] = status
        if status == "diverged":
            self.run.tags = (*self.run.tags, "diverged")
        if status == "preempted":
            self.run.mark_preempting()
        self.run.finish(exit_code=0 if status in ("finished", "diverged") else 1)


class MLflowSink:
    """MLflow: the store MLFLOW_TRACKING_URI names, else a file store in the run folder (mlruns);
    experiment MLFLOW_EXPERIMENT_NAME, else 'stabilab'. The run config is its params (flattened,
    values cut to MLflow's length limit), study/variant/depth/lr/seed its tags, the summary's
    numbers metrics 'summary/<key>' and its strings tags; a diverged run is tagged diverged=true."""

    name = "mlflow"
    STATUS = {"finished": "FINISHED", "diverged": "FINISHED", "preempted": "KILLED", "failed": "FAILED"}

    def __init__(self, folder: Path, cfg: RunConfig, run_id: str | None = None):
        _import("mlflow", "mlflow")
        from mlflow.entities import Param
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

        # MLflow 3 keeps its file store behind this opt-in (a database needs SQLAlchemy; a file store does not)
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        uri = os.environ.get("MLFLOW_TRACKING_URI") or (folder / "mlruns").resolve().as_uri()
        try:
            self.client = MlflowClient(tracking_uri=uri)
            if run_id is not None and self._resume(run_id):
                return
            experiment = self._experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME", "stabilab"))
            m = cfg.model
            tags = {"study": cfg.study, "variant": cfg.variant, "depth": str(m.n_layer), "lr": f"{cfg.optim.lr:g}",
                    "seed": str(cfg.seed), "run_folder": str(folder.resolve())}
            self.run_id = self.client.create_run(experiment, run_name=_name(cfg), tags=tags).info.run_id
            params = [Param(k, (v if isinstance(v, str) else json.dumps(v))[:MAX_PARAM_VAL_LENGTH])
                      for k, v in leaves(cfg.to_dict()).items()]
            self.client.log_batch(self.run_id, params=params)
        except MlflowException as e:
            raise UserError(f"mlflow ({uri}): {_one_line(e)}") from None

    def _resume(self, run_id: str) -> bool:
        """Continue the run of a resumed checkpoint, if the store still has it."""
        from mlflow.exceptions import MlflowException

        try:
            self.client.update_run(run_id, status="RUNNING")
        except MlflowException:
            return False
        self.run_id = run_id
        return True

    def _experiment(self, name: str) -> str:
        from mlflow.exceptions import MlflowException

        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        try:
            return self.client.create_experiment(name)
        except MlflowException:  # another run created it meanwhile
            return self.client.get_experiment_by_name(name).experiment_id

    def write(self, rec: dict, note: str = "") -> None:
        from mlflow.entities import Metric

        now = _millis()
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, rec["step"]) for k, v in _scalars(rec).items()])

    def close(self, status: str = "finished", summary: dict | None = None) -> None:
        from mlflow.entities import Metric, RunTag

        metrics, tags, now = [], {"status": status}, _millis()
        if summary is not None:
            for k, v in _summary_values(summary).items():
                if isinstance(v, str):
                    tags[f"summary/{k}"] = v
                else:
                    metrics.append(Metric(f"summary/{k}", float(v), now, summary["steps"]))
            tags["diverged"] = str(summary["diverged"]).lower()
        self.client.log_batch(self.run_id, metrics=metrics, tags=[RunTag(k, v) for k, v in tags.items()])
        self.client.set_terminated(self.run_id, status=self.STATUS[status])


def _name(cfg: RunConfig) -> str:
    """The run's name in a tracker: its folder below runs/ (study/variant/L<depth>_lr<lr>_s<seed>)."""
    return run_name(cfg.study, cfg.variant, cfg.model.n_layer, cfg.optim.lr, cfg.seed)


def _millis() -> int:
    return int(time.time() * 1000)


TRACKER_SINKS = {"wandb": WandbSink, "mlflow": MLflowSink}


def tracker_sinks(names: list[str], folder: Path, cfg: RunConfig, run_ids: dict[str, str]) -> list:
    """The sinks of the chosen trackers; wandb and mlflow continue the runs of `run_ids` (a resume)."""
    return [TensorBoardSink(folder) if name == "tensorboard" else TRACKER_SINKS[name](folder, cfg, run_ids.get(name))
            for name in names]


class ConsoleSink:
    """A progress bar on a terminal; one line per record otherwise (the job's log file)."""

    def __init__(self, total_steps: int, start: int, desc: str):
        self.total = total_steps
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start, desc=desc)

    def tick(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def write(self, rec: dict, note: str = "") -> None:
        if self.bar is not None:
            self.bar.update(rec["step"] - self.bar.n)
            self.bar.set_postfix(loss=f"{rec['train_loss']:.3f}", tok_s=f"{rec['tokens_per_s']:.0f}")
            return
        line = (f"step {rec['step']}/{self.total} loss {rec['train_loss']:.4f} "
                f"lr {rec['lr']:.2e} gnorm {rec['grad_norm']:.3f} tok/s {rec['tokens_per_s']:.0f}")
        if "val_loss" in rec:
            line += f" val {rec['val_loss']:.4f}"
        print(line + note, flush=True)

    def close(self, status: str = "finished", summary: dict | None = None) -> None:
        if self.bar is not None:
            self.bar.close()


class RunLog:
    """All sinks of a run as one: write a record to each, close them together."""

    def __init__(self, sinks: list):
        self.sinks = sinks

    def write(self, rec: dict, note: str = "") -> None:
        for sink in self.sinks:
            sink.write(rec, note)

    def tick(self) -> None:
        for sink in self.sinks:
            getattr(sink, "tick", lambda: None)()

    def run_ids(self) -> dict[str, str]:
        """{tracker name: its run id} of the trackers that have runs (wandb, mlflow)."""
        return {s.name: s.run_id for s in self.sinks if hasattr(s, "run_id")}

    def close(self, status: str = "finished", summary: dict | None = None) -> None:
        """Close every sink, also when one fails to (the first error is raised afterwards)."""
        error = None
        for sink in self.sinks:
            try:
                sink.close(status, summary)
            except Exception as e:
                error = error or e
        if error is not None:
            raise error
