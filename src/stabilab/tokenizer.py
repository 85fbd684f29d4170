"""Tokenizers: a byte-level BPE trained on the corpus (Hugging Face `tokenizers`) or GPT-2's (tiktoken).

Both are saved as one JSON file; its sha256 identifies the tokenizer in the shards' meta.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from importlib import resources
from pathlib import Path

from .errors import UserError

EOT = "<|endoftext|>"
# sha256 of r50k_base.tiktoken, the ranks of tiktoken's "gpt2" encoding (tiktoken_ext/openai_public.py)
GPT2_TIKTOKEN_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
GPT2_VOCAB = 50257  # tiktoken's gpt2 encoding: 50256 ranks and <|endoftext|>
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""


def _gpt2_encoding():
    """tiktoken's gpt2 encoding from the hub, else from the shipped, hash-verified ranks file."""
    import tiktoken

    try:
        return tiktoken.get_encoding("gpt2")
    except Exception:  # offline: hub unreachable
        from tiktoken.load import load_tiktoken_bpe

        path = resources.files("stabilab") / "assets" / "gpt2.tiktoken"
        try:
            ranks = load_tiktoken_bpe(str(path), expected_hash=GPT2_TIKTOKEN_SHA256)
        except ValueError as e:
            raise UserError(f"shipped GPT-2 ranks file {path} is corrupt: {e}") from None
        return tiktoken.Encoding(name="gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                                 special_tokens={EOT: GPT2_VOCAB - 1}, explicit_n_vocab=GPT2_VOCAB)


class Tokenizer:
    """Common interface: encode a batch of documents, decode ids, know the vocabulary and EOT id."""

    def __init__(self, kind: str, impl, spec: str):
        self.kind, self.impl, self.spec = kind, impl, spec
        self.sha256 = hashlib.sha256(spec.encode()).hexdigest()
        if kind == "bpe":
            self.vocab_size = impl.get_vocab_size()
            self.eot_id = impl.token_to_id(EOT)
        else:
            self.vocab_size = impl.n_vocab
            self.eot_id = impl.eot_token

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        if self.kind == "bpe":
            return [e.ids for e in self.impl.encode_batch(texts, add_special_tokens=False)]
        return self.impl.encode_ordinary_batch(texts)

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def decode(self, ids: list[int]) -> str:
        if self.kind == "bpe":
            return self.impl.decode(list(ids), skip_special_tokens=False)
        return self.impl.decode(list(ids))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.spec)


def train_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    if vocab_size < 257:
        raise UserError(f"bad value for config key 'tokenizer.vocab_size': {vocab_size} "
                        "(expected >= 257: 256 bytes + EOT)")
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    if tok.get_vocab_size() < vocab_size:  # the corpus ran out of pairs to merge
        raise UserError(f"bad value for config key 'tokenizer.vocab_size': {vocab_size}: the training split yields "
                        f"only {tok.get_vocab_size()} BPE tokens (use a smaller vocabulary or more text)")
    return Tokenizer("bpe", tok, tok.to_str())


def gpt2() -> Tokenizer:
    spec = json.dumps({"kind": "gpt2", "encoding": "gpt2", "ranks_sha256": GPT2_TIKTOKEN_SHA256})
    return Tokenizer("gpt2", _gpt2_encoding(), spec)


def load(path: str | Path) -> Tokenizer:
    path = Path(path)
    if not path.exists():
        raise UserError(f"tokenizer file not found: {path}")
    spec = path.read_text()
    try:
        data = json.loads(spec)
    except json.JSONDecodeError:
        raise UserError(f"tokenizer file {path} is not valid JSON") from None
    if data.get("kind") == "gpt2":
        return gpt2()
    from tokenizers import Tokenizer as HFTokenizer

    try:
        return Tokenizer("bpe", HFTokenizer.from_str(spec), spec)
    except Exception as e:
        raise UserError(f"tokenizer file {path} is not a valid tokenizer: {e}") from None


def build(kind: str, vocab_size: int, texts: Iterable[str]) -> Tokenizer:
    if kind == "bpe":
        return train_bpe(texts, vocab_size)
    if kind == "gpt2":
        return gpt2()
    raise UserError(f"bad value for config key 'tokenizer.kind': {kind!r} (allowed: 'bpe', 'gpt2')")
