"""Token shards: one flat numpy memmap per split plus meta.json, and batch sampling from them.

Documents are concatenated, each followed by the end-of-text token. Batches are sampled from
an RNG keyed by (seed, step, micro-step), so the data position of a run is its step: a resumed
run sees exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from pathlib import Path

import numpy as np

from .corpus import read_split
from .errors import UserError
from .io import atomic_path, write_json
from .tokenizer import Tokenizer

SPLITS = ("train", "val")


def write_shards(tokenizer: Tokenizer, split_files: dict[str, Path], out_dir: str | Path,
                 batch_docs: int = 1024) -> dict:
    """Write train.bin and val.bin (each followed by its sha256 into meta.json), meta.json last."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32
    meta = {"tokenizer": {"kind": tokenizer.kind, "sha256": tokenizer.sha256, "vocab_size": tokenizer.vocab_size},
            "eot_id": tokenizer.eot_id, "dtype": np.dtype(dtype).name, "tokens": {}, "documents": {},
            "sha256": {}}
    for split in SPLITS:
        n_tokens = n_docs = 0
        digest = hashlib.sha256()
        with atomic_path(out / f"{split}.bin") as tmp, open(tmp, "wb") as f:
            texts = read_split(split_files[split])  # streamed: a paper-scale corpus never sits in memory
            while batch := list(itertools.islice(texts, batch_docs)):
                for ids in tokenizer.encode_batch(batch):
                    data = np.asarray(ids + [tokenizer.eot_id], dtype=dtype).tobytes()
                    f.write(data)
                    digest.update(data)
                    n_tokens += len(ids) + 1
                    n_docs += 1
        meta["tokens"][split], meta["documents"][split] = n_tokens, n_docs
        meta["sha256"][split] = digest.hexdigest()
    meta["meta_sha256"] = _meta_digest(meta)  # an edited meta.json is refused, not trusted
    write_json(out / "meta.json", meta)  # last: shards without meta are unfinished
    return meta


def _meta_digest(meta: dict) -> str:
    return hashlib.sha256(json.dumps({k: v for k, v in meta.items() if k != "meta_sha256"},
                                     sort_keys=True).encode()).hexdigest()


def read_meta(shard_dir: str | Path) -> dict:
    path = Path(shard_dir) / "meta.json"
    if not path.exists():
        raise UserError(f"token shards not found: {path} is missing (run the tokenize rule first)")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"token shard meta {path} is corrupt (not valid JSON): delete the folder and re-tokenize") \
            from None
    try:
        np.dtype(meta["dtype"])
        assert all(isinstance(meta["tokens"][s], int) and isinstance(meta["sha256"][s], str) for s in SPLITS)
        assert {"kind", "sha256", "vocab_size"} <= set(meta["tokenizer"])
    except (KeyError, TypeError, AssertionError):
        raise UserError(f"token shard meta {path} is incomplete (made by an older stabilab, or edited): "
                        "delete the folder and re-tokenize") from None
    if meta.get("meta_sha256") != _meta_digest(meta):
        raise UserError(f"token shard meta {path} was changed after the shards were written: "
                        "delete the folder and re-tokenize")
    return meta


def file_sha256(path: Path, chunk: int = 1 << 23) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def check_shards(shard_dir: str | Path, tokenizer_kind: str | None, vocab_size: int,
                 tokenizer_file: str | Path | None = None, verify: bool = True) -> dict:
    """The shards' meta, after checking it against the run's tokenizer (kind unless None,
    vocabulary unless 0 and, given the tokenizer file, its sha256) and the files against it (sizes;
    with `verify`, the sha256 of every byte). Any mismatch is a one-line UserError naming the file
    and what to do. Snakemake's planning calls it without `verify` and without the config's
    tokenizer (a changed config re-tokenizes), so that an edited or damaged meta.json stops the
    workflow before any finished run is re-planned."""
    shard_dir = Path(shard_dir)
    meta = read_meta(shard_dir)
    tok = meta["tokenizer"]
    fix = f"re-tokenize (delete {shard_dir} and run the tokenize rule)"
    if tokenizer_kind is not None and tok["kind"] != tokenizer_kind:
        raise UserError(f"tokenizer mismatch: shards in {shard_dir} were made with '{tok['kind']}', "
                        f"the run config asks for '{tokenizer_kind}': {fix}")
    if vocab_size and tok["vocab_size"] != vocab_size:
        raise UserError(f"tokenizer mismatch: shards in {shard_dir} have vocab size {tok['vocab_size']}, "
                        f"the run config asks for {vocab_size}: {fix}")
    if tokenizer_file and Path(tokenizer_file).exists():
        if hashlib.sha256(Path(tokenizer_file).read_bytes()).hexdigest() != tok["sha256"]:
            raise UserError(f"tokenizer mismatch: shards in {shard_dir} were made with another tokenizer than "
                            f"{tokenizer_file} (sha256 differs): {fix}")
    dtype = np.dtype(meta["dtype"])
    for split in SPLITS:
        path = shard_dir / f"{split}.bin"
        if not path.exists():
            raise UserError(f"token shard missing: {path}: {fix}")
        if path.stat().st_size != meta["tokens"][split] * dtype.itemsize:
            raise UserError(f"token shard {path} is corrupt: {path.stat().st_size} bytes, "
                            f"meta says {meta['tokens'][split]} tokens of {dtype.name}: {fix}")
        if verify and file_sha256(path) != meta["sha256"][split]:
            raise UserError(f"token shard {path} is corrupt: its sha256 differs from meta.json's: {fix}")
    return meta


def open_shards(shard_dir: str | Path, tokenizer_kind: str, vocab_size: int,
                tokenizer_file: str | Path | None = None) -> tuple[dict, dict[str, np.memmap]]:
    """Open both splits after `check_shards` (content hashes verified)."""
    meta = check_shards(shard_dir, tokenizer_kind, vocab_size, tokenizer_file)
    dtype = np.dtype(meta["dtype"])
    return meta, {split: np.memmap(Path(shard_dir) / f"{split}.bin", dtype=dtype, mode="r") for split in SPLITS}


def token_counts(tokens: np.ndarray, vocab_size: int, chunk: int = 1 << 24) -> np.ndarray:
    """How often each id occurs in a split (vocab_size,) int64, in chunks (a 34M-token split: ~2 s)."""
    counts = np.zeros(vocab_size, dtype=np.int64)
    for i in range(0, len(tokens), chunk):
        counts += np.bincount(np.asarray(tokens[i:i + chunk]), minlength=vocab_size)[:vocab_size]
    return counts


def _windows(tokens: np.ndarray, starts: np.ndarray, block_size: int):
    import torch

    idx = starts[:, None] + np.arange(block_size + 1)[None, :]
    chunk = torch.from_numpy(tokens[idx].astype(np.int64))
    return chunk[:, :-1], chunk[:, 1:]


def train_batch(tokens: np.ndarray, seed: int, step: int, micro: int, batch_size: int, block_size: int):
    rng = np.random.default_rng([seed, step, micro])
    starts = rng.integers(0, len(tokens) - block_size - 1, size=batch_size)
    return _windows(tokens, starts, block_size)


def eval_batches(tokens: np.ndarray, n_batches: int, batch_size: int, block_size: int) -> list:
    """A fixed validation set: windows evenly spaced over the split."""
    if len(tokens) < block_size + 2:
        raise UserError(f"the validation split has {len(tokens)} tokens, fewer than block_size + 2 = {block_size + 2}")
    starts = np.linspace(0, len(tokens) - block_size - 1, n_batches * batch_size).astype(np.int64)
    return [_windows(tokens, starts[i * batch_size:(i + 1) * batch_size], block_size) for i in range(n_batches)]
