"""Token shards: one flat numpy memmap per split plus meta.json, and batch sampling from them.

Documents are concatenated, each followed by the end-of-text token. Batches are sampled from
an RNG keyed by (seed, step, micro-step), so the data position of a run is its step: a resumed
run sees exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from .corpus import read_split
from .errors import UserError
from .io import atomic_path, write_json
from .tokenizer import Tokenizer

SPLITS = ("train", "val")


def write_shards(tokenizer: Tokenizer, split_files: dict[str, Path], out_dir: str | Path,
                 batch_docs: int = 64) -> dict:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32
    meta = {"tokenizer": {"kind": tokenizer.kind, "sha256": tokenizer.sha256, "vocab_size": tokenizer.vocab_size},
            "eot_id": tokenizer.eot_id, "dtype": np.dtype(dtype).name, "tokens": {}, "documents": {}}
    for split in SPLITS:
        n_tokens = n_docs = 0
        with atomic_path(out / f"{split}.bin") as tmp, open(tmp, "wb") as f:
            texts = list(read_split(split_files[split]))
            for i in range(0, len(texts), batch_docs):
                for ids in tokenizer.encode_batch(texts[i:i + batch_docs]):
                    arr = np.asarray(ids + [tokenizer.eot_id], dtype=dtype)
                    arr.tofile(f)
                    n_tokens += arr.size
                    n_docs += 1
        meta["tokens"][split], meta["documents"][split] = n_tokens, n_docs
    write_json(out / "meta.json", meta)  # last: shards without meta are unfinished
    return meta


def read_meta(shard_dir: str | Path) -> dict:
    path = Path(shard_dir) / "meta.json"
    if not path.exists():
        raise UserError(f"token shards not found: {path} is missing (run the tokenize rule first)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        raise UserError(f"token shard meta {path} is corrupt (not valid JSON)") from None


def open_shards(shard_dir: str | Path, tokenizer_kind: str, vocab_size: int) -> tuple[dict, dict[str, np.memmap]]:
    """Open both splits, refusing shards that do not match the run's tokenizer or their own meta."""
    shard_dir = Path(shard_dir)
    meta = read_meta(shard_dir)
    tok = meta.get("tokenizer", {})
    if tok.get("kind") != tokenizer_kind:
        raise UserError(f"tokenizer mismatch: shards in {shard_dir} were made with '{tok.get('kind')}', "
                        f"the run config asks for '{tokenizer_kind}'")
    if vocab_size and tok.get("vocab_size") != vocab_size:
        raise UserError(f"tokenizer mismatch: shards in {shard_dir} have vocab size {tok.get('vocab_size')}, "
                        f"the run config asks for {vocab_size}")
    dtype = np.dtype(meta["dtype"])
    data = {}
    for split in SPLITS:
        path = shard_dir / f"{split}.bin"
        expected = meta["tokens"][split]
        if not path.exists():
            raise UserError(f"token shard missing: {path}")
        if path.stat().st_size != expected * dtype.itemsize:
            raise UserError(f"token shard {path} is corrupt: {path.stat().st_size} bytes, "
                            f"meta says {expected} tokens of {dtype.name}")
        data[split] = np.memmap(path, dtype=dtype, mode="r")
    return meta, data


def _windows(tokens: np.ndarray, starts: np.ndarray, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    idx = starts[:, None] + np.arange(block_size + 1)[None, :]
    chunk = torch.from_numpy(tokens[idx].astype(np.int64))
    return chunk[:, :-1], chunk[:, 1:]


def train_batch(tokens: np.ndarray, seed: int, step: int, micro: int, batch_size: int,
                block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng([seed, step, micro])
    starts = rng.integers(0, len(tokens) - block_size - 1, size=batch_size)
    return _windows(tokens, starts, block_size)


def eval_batches(tokens: np.ndarray, n_batches: int, batch_size: int,
                 block_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A fixed validation set: windows evenly spaced over the split."""
    if len(tokens) < block_size + 2:
        raise UserError(f"the validation split has {len(tokens)} tokens, fewer than block_size + 2 = {block_size + 2}")
    starts = np.linspace(0, len(tokens) - block_size - 1, n_batches * batch_size).astype(np.int64)
    return [_windows(tokens, starts[i * batch_size:(i + 1) * batch_size], block_size) for i in range(n_batches)]
