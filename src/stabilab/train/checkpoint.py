"""Checkpointing of one run folder: save, load, and preparing the folder to start or resume.

A checkpoint holds the model, the optimizer, the loop's counters and running statistics, and the
RNG states, so that a resumed run continues exactly where the checkpoint was taken; metrics
records after it belong to the lost attempt and are dropped from metrics.jsonl on resume. The
file carries the sha256 of its payload, checked before anything is loaded: a corrupt checkpoint
stops the run with one line instead of resuming from garbage. Its header also holds the step, so
that a grid launcher can group and order resuming runs without reading whole checkpoints.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import torch

from ..errors import UserError
from ..io import atomic_path, atomic_write

WEIGHTS = "model.pt"  # the final weights and the run's config (runtime.keep_weights)
ATTEMPTS = "attempts.jsonl"  # how each unfinished attempt ended and where the next resumed (Checkpointer.note)
OUTPUTS = ("ckpt.pt", "metrics.jsonl", "grad_norm.csv", ATTEMPTS, WEIGHTS, "summary.json")  # a fresh start removes


# then the sha256 of the rest (64 hex digits and a newline); the rest: one JSON line of metadata
# ({"step": n}, so that the step is read without loading the payload), then torch.save bytes
MAGIC = b"stabilab-checkpoint-v2\n"
MAGIC_V1 = b"stabilab-checkpoint-v1\n"  # as v2 without the metadata line (still read)
DIGEST = 65  # hex digits and newline
HEADER_MAX = 4096  # bytes read for the metadata line


class Checkpointer:
    def __init__(self, folder: Path, device: torch.device):
        self.folder, self.device = folder, device
        self.path = folder / "ckpt.pt"

    def save(self, state: dict) -> None:
        """One file, written atomically, that carries the sha256 of its own payload."""
        state = {**state, "rng_cpu": torch.get_rng_state(),
                 "rng_cuda": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None}
        save_checked(state, self.path)

    def load(self) -> dict | None:
        """The checkpoint's state (RNG states restored), or None when there is none; a checkpoint
        whose bytes do not match its sha256 (truncated, empty, flipped) is a UserError."""
        if not self.path.exists():
            return None
        state = load_checked(self.path, self.device, restart_hint(self.path))
        torch.set_rng_state(state["rng_cpu"].cpu())
        if state["rng_cuda"] is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["rng_cuda"].cpu(), self.device)
        return state

    def truncate_log(self, step: int) -> None:
        """Drop the records written after `step` (they belong to the lost attempt)."""
        log = self.folder / "metrics.jsonl"
        if log.exists():
            kept = [line for line in log.read_text().splitlines() if line and json.loads(line)["step"] <= step]
            atomic_write(log, "".join(line + "\n" for line in kept))
        norms = self.folder / "grad_norm.csv"
        if norms.exists():
            kept = [line for line in norms.read_text().splitlines() if line and int(line.split(",")[0]) <= step]
            atomic_write(norms, "".join(line + "\n" for line in kept))

    def same_config(self, config_text: str) -> bool:
        path = self.folder / "config.json"
        return path.exists() and path.read_text() == config_text

    def start_afresh(self, config_text: str) -> None:
        """Remove a previous attempt's outputs and write the run's config."""
        for name in OUTPUTS:
            (self.folder / name).unlink(missing_ok=True)
        atomic_write(self.folder / "config.json", config_text)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)

    def note(self, **event) -> None:
        """Append one event to attempts.jsonl: {"stopped": step, "reason": ...} when an attempt ends
        unfinished, {"resumed": step} when the next one continues from a checkpoint."""
        with open(self.folder / ATTEMPTS, "a") as f:
            f.write(json.dumps(event) + "\n")

    def resumes(self) -> list[dict]:
        """Every resume of the run, in order: {"from_step": n, "reason": why the attempt before it ended
        (and at which step), or "unknown" when it left no record (killed, e.g. SIGKILL or a node lost)}."""
        path = self.folder / ATTEMPTS
        if not path.exists():
            return []
        out, stopped = [], None
        for line in path.read_text().splitlines():
            event = json.loads(line)
            if "stopped" in event:
                stopped = event
            elif "resumed" in event:
                reason = f"{stopped['reason']} at step {stopped['stopped']}" if stopped else \
                    "unknown (the attempt before left no record: killed)"
                out.append({"from_step": event["resumed"], "reason": reason})
                stopped = None
        return out


def save_checked(state: dict, path: Path) -> None:
    """torch.save `state` into `path` atomically, behind MAGIC, the sha256 of what follows it, and a
    metadata line holding the state's step."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    meta = json.dumps({"step": state.get("step")}).encode() + b"\n"
    digest = hashlib.sha256(meta)
    digest.update(buffer.getbuffer())
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(MAGIC + digest.hexdigest().encode() + b"\n" + meta)
        f.write(buffer.getbuffer())


def load_checked(path: Path, device, fix: str) -> dict:
    """The state in a file written by `save_checked` (or by its v1 format, without the metadata
    line), after checking its sha256 (a UserError naming the file and `fix` otherwise); torch.load
    with weights_only=True (no arbitrary unpickling)."""
    blob = _read(path, None, fix)
    magic = MAGIC if blob.startswith(MAGIC) else MAGIC_V1
    head = len(magic) + DIGEST
    if not blob.startswith(magic) or len(blob) < head:
        raise UserError(f"checkpoint {path} is corrupt or not a stabilab checkpoint: {fix}")
    digest, rest = blob[len(magic):head - 1].decode("ascii", "replace"), memoryview(blob)[head:]
    if hashlib.sha256(rest).hexdigest() != digest:
        raise UserError(f"checkpoint {path} is corrupt (its sha256 does not match): {fix}")
    end = blob.find(b"\n", head) if magic == MAGIC else head - 1
    if end < 0:
        raise UserError(f"checkpoint {path} is corrupt (no end to its header): {fix}")
    payload = memoryview(blob)[end + 1:]
    return torch.load(io.BytesIO(payload), map_location=device, weights_only=True)


def checked_step(path: Path, fix: str) -> int:
    """The step in a checkpoint's metadata line, read without loading (or checking) its payload,
    which the run's own load checks; a v1 file has no such line and is loaded whole."""
    head = _read(path, HEADER_MAX, fix)
    if not head.startswith(MAGIC):
        return load_checked(path, "cpu", fix)["step"]
    end = head.find(b"\n", len(MAGIC) + DIGEST)
    try:
        step = json.loads(head[len(MAGIC) + DIGEST:end])["step"] if end > 0 else None
    except (ValueError, KeyError, TypeError):
        step = None
    if not isinstance(step, int):
        raise UserError(f"checkpoint {path} is corrupt (no step in its header): {fix}")
    return step


def _read(path: Path, size: int | None, fix: str) -> bytes:
    """The file's bytes (its first `size`, or all): an unreadable file is one line naming it."""
    try:
        with open(path, "rb") as f:
            return f.read() if size is None else f.read(size)
    except OSError as e:
        raise UserError(f"checkpoint {path} cannot be read ({e.strerror or e}): {fix}") from None


def restart_hint(path: Path) -> str:
    return f"delete {path} to restart the run from step 0"


def checkpoint_step(folder: str | Path) -> int | None:
    """The step a run folder's checkpoint resumes from (its header's; `checked_step`), None without
    one; a checkpoint whose header is unreadable is a UserError, as when the run itself loads it."""
    path = Path(folder) / "ckpt.pt"
    return int(checked_step(path, restart_hint(path))) if path.exists() else None


def load_weights(path: str | Path, device) -> dict:
    """{"model": state_dict, "config": run config dict, "step": n} of a finished run's model.pt (or
    of its folder)."""
    path = Path(path)
    path = path / WEIGHTS if path.is_dir() else path
    if not path.exists():
        folder = path.parent
        if not folder.is_dir():
            raise UserError(f"no run folder at {folder} (no final weights at {path})")
        if not (folder / "summary.json").exists():
            ckpt = folder / "ckpt.pt"
            where = f" (its checkpoint is at step {checked_step(ckpt, restart_hint(ckpt))})" if ckpt.exists() else ""
            raise UserError(f"{folder} is not a finished run{where}: no summary.json and no final weights; "
                            "finish it by running its train command again (it resumes), then retry")
        raise UserError(f"no final weights at {path}: the run finished with runtime.keep_weights: false; "
                        "train it again with keep_weights true (the default) to keep them")
    return load_checked(path, device, "re-train the run (its model.pt is damaged)")
