"""Where a run's log records go: metrics.jsonl (always), TensorBoard (optional), the console."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from ..errors import UserError


def _json_value(x):
    return None if isinstance(x, float) and not math.isfinite(x) else x


class JSONLSink:
    """metrics.jsonl: one record per line, flushed at once (the tables read it)."""

    def __init__(self, folder: Path):
        self.file = open(folder / "metrics.jsonl", "a")

    def write(self, rec: dict, note: str = "") -> None:
        self.file.write(json.dumps({k: _json_value(v) for k, v in rec.items()}) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


class TensorBoardSink:
    def __init__(self, folder: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise UserError("runtime.tensorboard is true but the 'tensorboard' package is not installed "
                            "(pip install 'stabilab[tensorboard]')") from None
        self.writer = SummaryWriter(str(folder / "tensorboard"))

    def write(self, rec: dict, note: str = "") -> None:
        for k, v in rec.items():
            if k != "step" and isinstance(v, float) and math.isfinite(v):
                self.writer.add_scalar(k, v, rec["step"])

    def close(self) -> None:
        self.writer.close()


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

    def close(self) -> None:
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

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()
