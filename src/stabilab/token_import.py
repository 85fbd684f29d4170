"""Pre-tokenized token shards of other code bases, imported into the pipeline's own checksummed shards.

One format so far, `modded_nanogpt`: the .bin shards of Keller Jordan's modded-nanogpt, which the
OEC code reads (its `data/prepare_fineweb.py` downloads `kjj0/fineweb100B-gpt2`: one validation
shard and 1030 training shards of 100M GPT-2 tokens each). A shard is a header of 256 little-endian
int32 (magic 20240520, version 1, the token count), then that many uint16 token ids; each document
is preceded by GPT-2's `<|endoftext|>` (50256). The OEC code's loader does not parse the header: it
memory-maps the whole file as uint16 and draws windows from position 1024 on, past the 1024-byte
header and 512 tokens more.

The import reads the header of every file (magic, version, a size that matches the count), copies
the tokens of the files in name order into `train.bin` / `val.bin` up to a cap, checks every id
against the vocabulary, and writes `meta.json` as `shards.write_shards` does (sha256 of each split,
the tokenizer's identity, tokens and documents), plus the files it read. Training then cannot tell
imported shards from its own.
"""

from __future__ import annotations

import glob
import hashlib
from pathlib import Path

import numpy as np

from .errors import UserError
from .io import atomic_path, write_json
from .shards import SPLITS, _meta_digest
from .tokenizer import Tokenizer

MAGIC = 20240520
VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
FORMATS = ("modded_nanogpt",)
CHUNK = 1 << 24  # tokens copied at a time (32 MiB)


def read_header(path: Path) -> int:
    """The token count of one modded-nanogpt shard, after checking its header against its size."""
    try:
        with open(path, "rb") as f:
            raw = f.read(HEADER_BYTES)
        size = path.stat().st_size
    except OSError as e:
        raise UserError(f"cannot read token shard {path}: {e.strerror}") from None
    if len(raw) < HEADER_BYTES:
        raise UserError(f"token shard {path} is not a modded-nanogpt shard: {len(raw)} bytes, shorter than the "
                        f"{HEADER_BYTES}-byte header")
    header = np.frombuffer(raw, dtype="<i4")
    if header[0] != MAGIC:
        raise UserError(f"token shard {path} is not a modded-nanogpt shard: magic {int(header[0])}, "
                        f"expected {MAGIC}")
    if header[1] != VERSION:
        raise UserError(f"token shard {path}: version {int(header[1])} of the modded-nanogpt format, "
                        f"only {VERSION} is known")
    n = int(header[2])
    if n < 0 or size != HEADER_BYTES + 2 * n:
        raise UserError(f"token shard {path} is truncated or corrupt: its header says {n} tokens "
                        f"({HEADER_BYTES + 2 * n} bytes), the file has {size} bytes")
    return n


def shard_files(patterns: list[str], split: str, fetch: str = "") -> list[Path]:
    """The files of one split (files or globs, each sorted by name); none found is one line naming
    the command that fetches them."""
    files: list[Path] = []
    for pattern in patterns:
        found = sorted(Path(f) for f in glob.glob(pattern)) if glob.has_magic(pattern) else [Path(pattern)]
        found = [f for f in found if f.is_file()]
        if not found:
            how = f"; fetch them with: {fetch}" if fetch else ""
            raise UserError(f"token shards of data.token_shards.{split} not found: {pattern}{how}")
        files += found
    return files


def import_shards(spec: dict, tokenizer: Tokenizer, out_dir: str | Path) -> dict:
    """Import the `token_shards` source `spec` (format, train, val, max_tokens, max_val_tokens,
    fetch) made with `tokenizer` into train.bin / val.bin / meta.json in `out_dir`."""
    if spec.get("format", "modded_nanogpt") not in FORMATS:
        raise UserError(f"bad value for config key 'data.token_shards.format': {spec.get('format')!r} "
                        f"(allowed: {', '.join(map(repr, FORMATS))})")
    if tokenizer.kind != "gpt2":
        raise UserError(f"modded-nanogpt shards hold GPT-2 tokens: tokenizer.kind must be 'gpt2', not "
                        f"'{tokenizer.kind}'")
    caps = {"train": spec.get("max_tokens"), "val": spec.get("max_val_tokens")}
    files = {split: shard_files(list(spec.get(split) or []), split, spec.get("fetch", "")) for split in SPLITS}
    counts = {split: [(f, read_header(f)) for f in files[split]] for split in SPLITS}  # all checked first
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"tokenizer": {"kind": tokenizer.kind, "sha256": tokenizer.sha256, "vocab_size": tokenizer.vocab_size},
            "eot_id": tokenizer.eot_id, "dtype": "uint16", "tokens": {}, "documents": {}, "sha256": {},
            "imported": {"format": "modded_nanogpt", "files": {}, "max_tokens": caps}}
    for split in SPLITS:
        cap = caps[split]
        n_tokens = n_docs = 0
        read: list[dict] = []
        digest = hashlib.sha256()
        with atomic_path(out / f"{split}.bin") as tmp, open(tmp, "wb") as f:
            for path, n in counts[split]:
                if cap is not None and n_tokens >= cap:
                    break
                take = n if cap is None else min(n, cap - n_tokens)
                if take == 0:
                    continue
                tokens = np.memmap(path, dtype="<u2", mode="r", offset=HEADER_BYTES, shape=(n,))
                for start in range(0, take, CHUNK):
                    block = np.asarray(tokens[start:min(take, start + CHUNK)])
                    if block.size and int(block.max()) >= tokenizer.vocab_size:
                        raise UserError(f"token shard {path} holds id {int(block.max())}, outside the "
                                        f"{tokenizer.vocab_size}-token vocabulary of '{tokenizer.kind}'")
                    data = block.astype(np.uint16).tobytes()
                    f.write(data)
                    digest.update(data)
                    n_docs += int((block == tokenizer.eot_id).sum())
                del tokens
                n_tokens += take
                read.append({"file": path.name, "tokens": take, "of": n})
        if n_tokens == 0:
            raise UserError(f"the token shards of data.token_shards.{split} hold no tokens")
        meta["tokens"][split], meta["documents"][split] = n_tokens, n_docs
        meta["sha256"][split] = digest.hexdigest()
        meta["imported"]["files"][split] = read
    meta["meta_sha256"] = _meta_digest(meta)
    write_json(out / "meta.json", meta)  # last: shards without meta are unfinished
    return meta


def write_modded_nanogpt(path: str | Path, tokens) -> None:
    """A shard in the modded-nanogpt format (header, then uint16 ids): for tests and small slices."""
    tokens = np.asarray(tokens)
    if tokens.size and (tokens.min() < 0 or tokens.max() >= 2**16):
        raise ValueError("modded-nanogpt shards hold uint16 ids")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = (MAGIC, VERSION, tokens.size)
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(tokens.astype("<u2").tobytes())
