"""Corpus sources, split, tokenizers and token shards."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest

from conftest import make_documents, write_text_files
from stabilab.corpus import read_source, write_split
from stabilab.errors import UserError
from stabilab.shards import eval_batches, open_shards, train_batch
from stabilab.tokenizer import gpt2, load


def test_bpe_round_trip(tiny_data):
    tok = tiny_data["tokenizer"]
    text = "The king and the queen, at night: 'speak, fair lord!'\n\tÜmlaut ✓"
    assert tok.decode(tok.encode(text)) == text  # byte-level: lossless even for unseen characters
    assert tok.vocab_size == 300 and tok.decode([tok.eot_id]) == "<|endoftext|>"
    reloaded = load(tiny_data["root"] / "tokenizer.json")
    assert reloaded.sha256 == tok.sha256 and reloaded.encode(text) == tok.encode(text)


def test_gpt2_offline_uses_shipped_ranks(monkeypatch):
    import tiktoken

    def offline(name):
        raise ConnectionError("no network")

    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    tok = gpt2()
    assert tok.vocab_size == 50257 and tok.eot_id == 50256
    assert tok.encode("Hello world") == [15496, 995]  # GPT-2's well-known ids
    assert tok.decode(tok.encode("naïve café\n")) == "naïve café\n"


def test_shards_hold_every_document_with_eot(tiny_data):
    meta, data = open_shards(tiny_data["shards"], "bpe", 300)
    tok = tiny_data["tokenizer"]
    assert meta["dtype"] == "uint16" and meta["tokenizer"]["sha256"] == tok.sha256
    train, val = data["train"], data["val"]
    assert len(train) == meta["tokens"]["train"] and len(val) == meta["tokens"]["val"]
    assert int((train == tok.eot_id).sum()) == meta["documents"]["train"]
    assert meta["documents"]["train"] + meta["documents"]["val"] == len(tiny_data["docs"])
    decoded = tok.decode(np.asarray(val).tolist()).split("<|endoftext|>")[:-1]
    assert set(decoded) <= set(tiny_data["docs"]) and len(decoded) == meta["documents"]["val"]


def test_batches_are_shifted_windows_and_deterministic(tiny_data):
    _, data = open_shards(tiny_data["shards"], "bpe", 300)
    x, y = train_batch(data["train"], seed=3, step=7, micro=0, batch_size=4, block_size=16)
    x2, _ = train_batch(data["train"], seed=3, step=7, micro=0, batch_size=4, block_size=16)
    x3, _ = train_batch(data["train"], seed=3, step=8, micro=0, batch_size=4, block_size=16)
    assert x.shape == (4, 16) and (x[:, 1:] == y[:, :-1]).all()
    assert (x == x2).all() and not (x == x3).all()
    (vx, vy), = eval_batches(data["val"], 1, 4, 16)
    assert (vx[:, 1:] == vy[:, :-1]).all()


@pytest.mark.parametrize("kind, vocab, message", [("gpt2", 0, "made with 'bpe'"), ("bpe", 512, "vocab size 300")])
def test_shards_refuse_a_mismatched_tokenizer(tiny_data, kind, vocab, message):
    with pytest.raises(UserError, match=message):
        open_shards(tiny_data["shards"], kind, vocab)


def test_corrupt_and_missing_shards(tiny_data, tmp_path):
    import shutil

    copy = tmp_path / "shards"
    shutil.copytree(tiny_data["shards"], copy)
    with open(copy / "train.bin", "ab") as f:
        f.write(b"\x00")
    with pytest.raises(UserError, match="corrupt"):
        open_shards(copy, "bpe", 300)
    (copy / "meta.json").unlink()
    with pytest.raises(UserError, match="meta.json is missing"):
        open_shards(copy, "bpe", 300)


def test_split_is_by_document_and_deterministic(tmp_path):
    docs = make_documents(40, 20)
    paths = write_text_files(tmp_path / "text", docs)
    spec = {"source": "text", "paths": paths, "val_fraction": 0.25, "split_seed": 1}
    write_split(spec, tmp_path / "a")
    write_split(dict(spec, paths=list(reversed(paths))), tmp_path / "b")

    def ids(folder, split):
        with gzip.open(folder / f"{split}.jsonl.gz", "rt") as f:
            return sorted(json.loads(line)["id"] for line in f)

    assert ids(tmp_path / "a", "val") == ids(tmp_path / "b", "val")  # order-independent
    assert not set(ids(tmp_path / "a", "val")) & set(ids(tmp_path / "a", "train"))
    assert len(ids(tmp_path / "a", "val")) + len(ids(tmp_path / "a", "train")) == 40
    assert 0 < len(ids(tmp_path / "a", "val")) < 20


def test_embedded_corpus_is_shakespeare():
    docs = dict(read_source({"source": "embedded"}))
    assert len(docs) == 42 and "hamlet" in docs
    assert "To be, or not to be" in docs["hamlet"]


def test_text_sources_jsonl_and_parquet(tmp_path):
    import pandas as pd

    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "one"}) + "\n\n" + json.dumps({"text": "two"}) + "\n")
    pd.DataFrame({"body": ["three", "four"]}).to_parquet(tmp_path / "b.parquet")
    assert [t for _, t in read_source({"source": "text", "paths": [str(tmp_path / "a.jsonl")]})] == ["one", "two"]
    got = [t for _, t in read_source({"source": "text", "paths": [str(tmp_path / "b.parquet")], "text_field": "body"})]
    assert got == ["three", "four"]


def test_hf_source_through_datasets_on_local_files(tmp_path):
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": f"doc {i}", "id": i}) + "\n" for i in range(5)))
    spec = {"source": "hf", "hf": {"path": "json", "data_files": str(tmp_path / "d.jsonl"), "split": "train",
                                   "streaming": True, "max_documents": 3}}
    assert [t for _, t in read_source(spec)] == ["doc 0", "doc 1", "doc 2"]
    with pytest.raises(UserError, match="no field 'body'"):
        list(read_source({"source": "hf", "hf": dict(spec["hf"], text_field="body")}))


@pytest.mark.parametrize("content, message", [
    (None, "data file not found"),
    (b"   \n", "contains no text"),
    (b"caf\xe9 au lait", "not valid UTF-8"),
])
def test_bad_text_input_names_the_file(tmp_path, content, message):
    path = tmp_path / "bad.txt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(UserError, match=message) as err:
        list(read_source({"source": "text", "paths": [str(path)]}))
    assert "bad.txt" in str(err.value) and "\n" not in str(err.value)


def test_bad_jsonl_line_is_reported(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"text": "ok"}\n{"text": broken}\n')
    with pytest.raises(UserError, match="x.jsonl line 2 is not valid JSON"):
        list(read_source({"source": "text", "paths": [str(path)]}))
