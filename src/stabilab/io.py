"""Atomic file output: a file is either absent, the previous version, or complete.

Everything the pipeline writes goes through `atomic_path` (or `atomic_write`), so a run killed
mid-write never leaves a half-written file that looks finished.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path` in one rename, on
    error it is removed and `path` is untouched."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write(path: str | Path, data: str | bytes) -> None:
    with atomic_path(path) as tmp:
        if isinstance(data, bytes):
            tmp.write_bytes(data)
        else:
            tmp.write_text(data)


def write_json(path: str | Path, obj, indent: int | None = 2) -> None:
    atomic_write(path, json.dumps(obj, indent=indent) + "\n")


def read_json_arg(text: str, what: str = "argument") -> dict:
    """A command-line JSON argument: inline JSON, a JSON file, or @FILE."""
    from .errors import UserError

    if text.startswith("@"):
        text = text[1:]
    path = Path(text)
    if not text.lstrip().startswith("{"):
        try:
            text = path.read_text()
        except OSError as e:
            raise UserError(f"{what}: cannot read {path}: {e.strerror}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{what} is not valid JSON: {e.msg} at position {e.pos}") from None
    if not isinstance(data, dict):
        raise UserError(f"{what} must be a JSON object")
    return data
