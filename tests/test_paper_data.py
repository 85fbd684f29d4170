"""The paper-scale data paths, offline on small files in the same formats: modded-nanogpt .bin token
shards (OEC's FineWeb) imported into checksummed shards, and a C4-like dataset read through
`datasets` from local jsonl / parquet files with its own validation split, tokenized by a T5-like
tokenizer from a local tokenizer.json (tokenizer.kind hf)."""

from __future__ import annotations

import gzip
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import make_documents, tiny_run
from stabilab.corpus import write_split
from stabilab.errors import UserError
from stabilab.experiment import load_experiment, source_files, tokenizer_files
from stabilab.shards import open_shards, write_shards
from stabilab.token_import import HEADER_BYTES, import_shards, read_header, write_modded_nanogpt
from stabilab.tokenizer import gpt2, hf, load

ROOT = Path(__file__).resolve().parents[1]
EOT = 50256


def fineweb_like(folder: Path, seed: int = 0) -> dict[str, list[np.ndarray]]:
    """Two training shards and one validation shard as kjj0/fineweb100B-gpt2 names them: documents of
    random GPT-2 ids, each preceded by <|endoftext|> (modded-nanogpt's layout)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    shards = {}
    for name in ("fineweb_val_000000", "fineweb_train_000001", "fineweb_train_000002"):
        docs = [np.concatenate([[EOT], rng.integers(0, EOT, rng.integers(5, 40))]) for _ in range(20)]
        tokens = np.concatenate(docs).astype(np.uint16)
        write_modded_nanogpt(folder / f"{name}.bin", tokens)
        shards[name] = tokens
    return shards


def spec(folder: Path, **caps) -> dict:
    return {"format": "modded_nanogpt", "train": [str(folder / "fineweb_train_*.bin")],
            "val": [str(folder / "fineweb_val_000000.bin")], "fetch": "fetch-them-like-this", **caps}


def test_modded_nanogpt_shards_import_into_checksummed_shards(tmp_path):
    raw = fineweb_like(tmp_path / "fineweb")
    first = raw["fineweb_train_000001"]
    path = tmp_path / "fineweb" / "fineweb_train_000001.bin"
    # the format as OEC's own loader sees it: the file as uint16, the tokens after the 1024-byte header
    assert read_header(path) == len(first)
    assert (np.memmap(path, dtype=np.uint16, mode="r")[HEADER_BYTES // 2:] == first).all()
    header = np.fromfile(path, dtype="<i4", count=3)
    assert header.tolist() == [20240520, 1, len(first)]

    cap = len(first) + 7  # all of the first file, 7 tokens of the second
    meta = import_shards(spec(tmp_path / "fineweb", max_tokens=cap), gpt2(), tmp_path / "shards")
    meta2, data = open_shards(tmp_path / "shards", "gpt2", 0)  # sha256 of every byte checked
    assert meta2 == meta and meta["dtype"] == "uint16" and meta["eot_id"] == EOT
    expected = np.concatenate([first, raw["fineweb_train_000002"][:7]])
    assert meta["tokens"]["train"] == cap and (np.asarray(data["train"]) == expected).all()
    assert (np.asarray(data["val"]) == raw["fineweb_val_000000"]).all()
    assert meta["documents"]["train"] == int((expected == EOT).sum())
    assert [f["tokens"] for f in meta["imported"]["files"]["train"]] == [len(first), 7]
    assert gpt2().decode(np.asarray(data["val"][:1]).tolist()) == "<|endoftext|>"


@pytest.mark.parametrize("damage, message", [
    (lambda b: b[:HEADER_BYTES] + b[HEADER_BYTES + 2:], "is truncated or corrupt: its header says"),
    (lambda b: np.int32(20240519).tobytes() + b[4:], "is not a modded-nanogpt shard: magic 20240519"),
    (lambda b: b[:4] + np.int32(2).tobytes() + b[8:], "version 2 of the modded-nanogpt format"),
    (lambda b: b[:100], "shorter than the 1024-byte header"),
])
def test_a_damaged_shard_is_one_line_before_any_file_is_written(tmp_path, damage, message):
    fineweb_like(tmp_path / "fineweb")
    path = tmp_path / "fineweb" / "fineweb_train_000002.bin"
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(UserError, match=message):
        import_shards(spec(tmp_path / "fineweb"), gpt2(), tmp_path / "shards")
    assert not (tmp_path / "shards").exists()


def test_ids_outside_the_vocabulary_and_missing_shards_are_refused(tmp_path):
    fineweb_like(tmp_path / "fineweb")
    write_modded_nanogpt(tmp_path / "fineweb" / "fineweb_train_000003.bin", [EOT, 50300, 7])
    with pytest.raises(UserError, match="holds id 50300, outside the 50257-token vocabulary"):
        import_shards(spec(tmp_path / "fineweb"), gpt2(), tmp_path / "shards")
    assert not (tmp_path / "shards" / "meta.json").exists() and not list((tmp_path / "shards").glob("*.bin"))
    with pytest.raises(UserError, match=r"not found: .*nowhere/fineweb_train_\*\.bin; fetch them with: fetch-them"):
        import_shards(spec(tmp_path / "nowhere"), gpt2(), tmp_path / "shards")


# ----------------------------------------------------------------------------- C4-like data, T5-like tokenizer


def t5_like_tokenizer(path: Path, size: int = 300) -> None:
    """A small tokenizer.json with t5-base's structure: a Unigram model under Metaspace ("▁")
    pre-tokenization, <pad> </s> <unk> as ids 0 1 2, and a post-processor that appends </s> (T5's
    own); its pieces: the test corpus's words, single characters, fillers up to `size`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    from conftest import WORDS

    pieces = ["<pad>", "</s>", "<unk>"] + [f"\u2581{w}" for w in WORDS] + list("\u2581abcdefghijklmnopqrstuvwxyz.,")
    pieces += [f"\u2581filler{i}" for i in range(size - len(pieces))]
    vocab = [(p, 0.0) if i < 3 else (p, -float(len(p) < 3) - 1.0) for i, p in enumerate(pieces)]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tok.save(str(path))


def c4_like(folder: Path) -> dict[str, list[str]]:
    """allenai/c4's own layout: gzipped JSON lines (text, timestamp, url) named c4-<split>.NNNNN-of-NNNNN.json.gz."""
    folder.mkdir(parents=True, exist_ok=True)
    docs = {"train": make_documents(30, 60, seed=1), "validation": make_documents(6, 60, seed=2)}
    for split, texts in docs.items():
        with gzip.open(folder / f"c4-{split}.00000-of-00002.json.gz", "wt") as f:
            for i, text in enumerate(texts):
                f.write(json.dumps({"text": text, "timestamp": "2019-04-25T12:57:54Z", "url": f"https://x/{i}"}) + "\n")
    return docs


def c4_data(folder: Path, max_documents: int | None = None) -> dict:
    """The hf source over the local files, as configs/paper_scale/spam.yaml reads allenai/c4 from the hub."""
    files = {split: str(folder / f"c4-{split}.*.json.gz") for split in ("train", "validation")}
    return {"source": "hf", "hf": {"path": "json", "data_files": files, "split": "train", "streaming": True,
                                   "max_documents": max_documents, "val_split": "validation",
                                   "max_val_documents": 4}}


def test_c4_like_data_through_datasets_with_its_own_validation_split(tmp_path):
    docs = c4_like(tmp_path / "c4")
    counts = write_split(c4_data(tmp_path / "c4", max_documents=25), tmp_path / "corpus")
    assert counts == {"train": 25, "val": 4}  # max_documents, max_val_documents

    def texts(folder, split):
        with gzip.open(folder / f"{split}.jsonl.gz", "rt") as f:
            return [json.loads(line)["text"] for line in f]

    # in stream order; validation from the validation split, not a hash share of train
    assert texts(tmp_path / "corpus", "train") == docs["train"][:25]
    assert texts(tmp_path / "corpus", "val") == docs["validation"][:4]


def test_parquet_files_through_datasets_split_by_hash(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = make_documents(40, 20, seed=3)
    pq.write_table(pa.table({"text": docs}), tmp_path / "part-0.parquet")
    data = {"source": "hf", "val_fraction": 0.25,
            "hf": {"path": "parquet", "data_files": str(tmp_path / "*.parquet"), "split": "train", "streaming": True}}
    counts = write_split(data, tmp_path / "corpus")
    assert counts["train"] + counts["val"] == 40 and 0 < counts["val"] < 20


def test_t5_like_tokenizer_from_a_local_file_ends_each_document_once(tmp_path):
    docs = c4_like(tmp_path / "c4")
    t5_like_tokenizer(tmp_path / "tokenizer.json")
    tok = hf(name="t5-base", file=str(tmp_path / "tokenizer.json"), vocab_size=300)
    assert (tok.kind, tok.vocab_size, tok.eot, tok.eot_id) == ("hf", 300, "</s>", 1)
    ids = tok.encode(docs["train"][0])
    assert 1 not in ids and tok.decode(ids).strip().split() == docs["train"][0].split()  # no </s> of its own
    tok.save(tmp_path / "saved.json")
    again = load(tmp_path / "saved.json")
    assert (again.kind, again.sha256, again.eot_id, again.encode("the king")) == ("hf", tok.sha256, 1,
                                                                                   tok.encode("the king"))
    # the shards: every document followed by exactly one </s>
    write_split(c4_data(tmp_path / "c4"), tmp_path / "corpus")
    split_files = {s: tmp_path / "corpus" / f"{s}.jsonl.gz" for s in ("train", "val")}
    meta = write_shards(tok, split_files, tmp_path / "shards")
    _, data = open_shards(tmp_path / "shards", "hf", 300, tmp_path / "saved.json")
    assert meta["documents"] == {"train": 30, "val": 4} and int((np.asarray(data["train"]) == 1).sum()) == 30
    assert meta["tokenizer"]["kind"] == "hf" and data["train"][-1] == 1
    # a run trains on them, its tokenizer checked against the shards' (kind, vocabulary, sha256)
    from stabilab.config import load_run_config
    from stabilab.train import Trainer

    run = tiny_run(str(tmp_path / "shards"), train={"steps": 2, "eval_every": 2, "metrics_every": 2},
                   model={"n_layer": 1, "n_head": 2, "n_embd": 16, "block_size": 16},
                   data={"tokenizer": "hf", "vocab_size": 300, "tokenizer_file": str(tmp_path / "saved.json")})
    summary = Trainer(load_run_config(run), tmp_path / "run").run()
    assert summary["steps"] == 2 and math.isfinite(summary["final_val_loss"])


def test_hf_tokenizer_errors_are_one_line(tmp_path, monkeypatch):
    from tokenizers import Tokenizer

    t5_like_tokenizer(tmp_path / "tokenizer.json")
    with pytest.raises(UserError, match=r"'tokenizer.vocab_size': 32100: tokenizer file .* has 300 tokens"):
        hf(name="t5-base", file=str(tmp_path / "tokenizer.json"), vocab_size=32100)
    with pytest.raises(UserError, match=r"'tokenizer.eos_token': '<eos>' is not a token of"):
        hf(file=str(tmp_path / "tokenizer.json"), eos="<eos>")
    with pytest.raises(UserError, match=r"tokenizer file not found: .*missing/tokenizer.json \(fetch it with: "
                                        r"python -c \"from huggingface_hub import hf_hub_download; "
                                        r"hf_hub_download\('t5-base'"):
        hf(name="t5-base", file=str(tmp_path / "missing" / "tokenizer.json"))

    def offline(name):
        raise OSError("We couldn't connect to 'https://huggingface.co'\nmore lines")

    monkeypatch.setattr(Tokenizer, "from_pretrained", staticmethod(offline))
    with pytest.raises(UserError) as e:
        hf(name="t5-base")
    assert str(e.value).startswith("cannot fetch tokenizer 't5-base' from the Hugging Face hub (We couldn't "
                                   "connect to 'https://huggingface.co'); offline, set tokenizer.file to its "
                                   "tokenizer.json, fetched with: python -c")
    assert "\n" not in str(e.value)
    # by name, when the hub answers: the same tokenizer as from its file
    monkeypatch.setattr(Tokenizer, "from_pretrained", staticmethod(
        lambda name: Tokenizer.from_file(str(tmp_path / "tokenizer.json"))))
    assert hf(name="t5-base").sha256 != hf(file=str(tmp_path / "tokenizer.json")).sha256  # the source is named
    assert hf(name="t5-base").encode("the king") == hf(file=str(tmp_path / "tokenizer.json")).encode("the king")


def paper_data_config(tmp_path: Path, data: dict, tokenizer: dict) -> Path:
    """A tiny experiment on the given data and tokenizer: one 3-step run of a 1-layer model."""
    cfg = {"name": "tiny", "data": data, "tokenizer": tokenizer,
           "model": {"block_size": 16, "n_head": 2, "n_embd": 16},
           "train": {"steps": 3, "batch_size": 2, "eval_every": 3, "eval_batches": 1, "log_every": 1,
                     "metrics_every": 3, "metrics_batch": 2},
           "studies": {"s": {"kind": "compare", "variants": ["baseline"], "depths": [1], "lrs": [1e-3]}}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    return tmp_path / "config.yaml"


def snakemake(tmp_path: Path, config: Path, *targets: str, options: tuple = ()) -> subprocess.CompletedProcess:
    """The project's Snakefile on `config` (targets after `--`: --configfile takes several values)."""
    return subprocess.run([sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "--directory",
                           str(tmp_path), "--cores", "1", "--configfile", str(config), *options, "--", *targets],
                          capture_output=True, text=True, cwd=tmp_path)


@pytest.mark.slow
def test_snakemake_imports_modded_nanogpt_shards(tmp_path):
    """data.source token_shards: one import_shards job writes the shards and GPT-2's tokenizer file,
    no corpus or tokenizer job; a missing shard stops planning with one line naming the fetch."""
    fineweb_like(tmp_path / "fineweb")
    data = {"source": "token_shards", "token_shards": spec(tmp_path / "fineweb", max_tokens=500)}
    config = paper_data_config(tmp_path, data, {"kind": "gpt2"})
    shards = tmp_path / "results" / "tiny" / "data" / "shards"
    proc = snakemake(tmp_path, config, str(shards.relative_to(tmp_path) / "meta.json"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    meta, _ = open_shards(shards, "gpt2", 0, shards.parent / "tokenizer.json")
    assert meta["tokens"]["train"] == 500 and not (shards.parent / "corpus").exists()
    assert load(shards.parent / "tokenizer.json").kind == "gpt2"
    assert source_files(load_experiment(config)) == [str(p) for p in sorted((tmp_path / "fineweb").glob(
        "fineweb_train_*.bin"))] + [str(tmp_path / "fineweb" / "fineweb_val_000000.bin")]

    (tmp_path / "fineweb" / "fineweb_val_000000.bin").unlink()
    again = snakemake(tmp_path, config, options=("-n",))
    assert again.returncode != 0
    assert (f"error: token shards of data.token_shards.val not found: {tmp_path}/fineweb/fineweb_val_000000.bin; "
            "fetch them with: fetch-them-like-this") in again.stderr.splitlines()


@pytest.mark.slow
def test_snakemake_reads_c4_like_data_and_a_local_t5_like_tokenizer(tmp_path):
    """The C4 path of configs/paper_scale/spam.yaml, offline: the hf source over local files with its
    validation split, an hf tokenizer from its tokenizer.json (an input of the tokenizer job), shards."""
    c4_like(tmp_path / "c4")
    (tmp_path / "t5").mkdir()
    t5_like_tokenizer(tmp_path / "t5" / "tokenizer.json")
    data = c4_data(tmp_path / "c4")
    tokenizer = {"kind": "hf", "name": "t5-base", "file": str(tmp_path / "t5"), "vocab_size": 300}
    config = paper_data_config(tmp_path, data, tokenizer)
    assert tokenizer_files(load_experiment(config)) == [str(tmp_path / "t5" / "tokenizer.json")]
    res = tmp_path / "results" / "tiny"
    proc = snakemake(tmp_path, config, "results/tiny/data/shards/meta.json")  # a run on them: the test above
    assert proc.returncode == 0, proc.stderr[-3000:]
    meta, _ = open_shards(res / "data" / "shards", "hf", 300, res / "data" / "tokenizer.json")
    assert meta["documents"] == {"train": 30, "val": 4}
    assert load(res / "data" / "tokenizer.json").eot == "</s>"
