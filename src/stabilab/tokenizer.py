"""Tokenizers: a byte-level BPE trained on the corpus (Hugging Face `tokenizers`), GPT-2's (tiktoken),
or a given Hugging Face tokenizer (`hf`: a `tokenizer.json` file, or a hub name such as `t5-base`).

Each is saved as one JSON file; its sha256 identifies the tokenizer in the shards' meta.
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


# an `hf` tokenizer's end-of-document token when none is named: the first of these it has
EOS_CANDIDATES = ("</s>", EOT, "<eos>", "<|end_of_text|>")
HF_FETCH = ("python -c \"from huggingface_hub import hf_hub_download; "
            "hf_hub_download('{name}', 'tokenizer.json', local_dir='{folder}')\"")


class Tokenizer:
    """Common interface: encode a batch of documents, decode ids, know the vocabulary and EOT id
    (the token that ends each document in the shards: `<|endoftext|>`, or an `hf` tokenizer's EOS)."""

    def __init__(self, kind: str, impl, spec: str, eot: str = EOT):
        self.kind, self.impl, self.spec = kind, impl, spec
        self.sha256 = hashlib.sha256(spec.encode()).hexdigest()
        if kind in ("bpe", "hf"):  # Hugging Face `tokenizers`
            self.vocab_size = impl.get_vocab_size()
            self.eot_id = impl.token_to_id(eot)
            self.eot = eot
        else:
            self.vocab_size = impl.n_vocab
            self.eot_id = impl.eot_token
            self.eot = EOT

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        if self.kind in ("bpe", "hf"):
            return [e.ids for e in self.impl.encode_batch(texts, add_special_tokens=False)]
        return self.impl.encode_ordinary_batch(texts)

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def decode(self, ids: list[int]) -> str:
        if self.kind in ("bpe", "hf"):
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


def _hf_spec(impl, source: str, eos: str) -> str:
    """What an `hf` tokenizer is saved as: its own tokenizer.json inside a small wrapper."""
    return json.dumps({"kind": "hf", "source": source, "eos_token": eos, "tokenizer": json.loads(impl.to_str())},
                      sort_keys=True)


def _hf_eot(impl, where: str, eos: str | None) -> str:
    if eos is not None:
        if impl.token_to_id(eos) is None:
            raise UserError(f"bad value for config key 'tokenizer.eos_token': {eos!r} is not a token of {where}")
        return eos
    found = next((t for t in EOS_CANDIDATES if impl.token_to_id(t) is not None), None)
    if found is None:
        raise UserError(f"{where} has none of the end-of-document tokens {', '.join(EOS_CANDIDATES)}: "
                        "name one with tokenizer.eos_token")
    return found


def hf_tokenizer_file(file: str | Path) -> Path:
    """The tokenizer.json a `tokenizer.file` names (the file, or the one in a folder)."""
    path = Path(file)
    return path / "tokenizer.json" if path.is_dir() else path


def hf(name: str | None = None, file: str | None = None, eos: str | None = None,
       vocab_size: int | None = None) -> Tokenizer:
    """A given Hugging Face tokenizer: from a local `tokenizer.json` (`file`, or a folder holding
    one: works offline), else from the hub by `name` (e.g. `t5-base`, the SPAM code's). Each document
    ends with `eos` (default: the first of EOS_CANDIDATES the tokenizer has, `</s>` for T5), as T5's
    own post-processor appends it. `vocab_size`, when given, must be the tokenizer's (the config's
    cost estimate used it)."""
    from tokenizers import Tokenizer as HFTokenizer

    if file:
        path = hf_tokenizer_file(file)
        if not path.exists():
            fetch = HF_FETCH.format(name=name, folder=path.parent) if name else "a tokenizer.json"
            raise UserError(f"tokenizer file not found: {path} (fetch it with: {fetch})")
        where = f"tokenizer file {path}"
        try:
            impl = HFTokenizer.from_file(str(path))
        except Exception as e:
            raise UserError(f"{where} is not a valid tokenizer: {str(e).splitlines()[0] if str(e) else e}") from None
        source = name or path.name
    elif name:
        where = f"tokenizer '{name}'"
        try:
            impl = HFTokenizer.from_pretrained(name)
        except Exception as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"cannot fetch tokenizer '{name}' from the Hugging Face hub ({first}); offline, set "
                            f"tokenizer.file to its tokenizer.json, fetched with: "
                            f"{HF_FETCH.format(name=name, folder='data/' + name.split('/')[-1])}") from None
        source = name
    else:
        raise UserError("tokenizer.kind 'hf' needs tokenizer.name (a hub name) or tokenizer.file (a tokenizer.json)")
    eot = _hf_eot(impl, where, eos)
    if vocab_size and impl.get_vocab_size() != vocab_size:
        raise UserError(f"bad value for config key 'tokenizer.vocab_size': {vocab_size}: {where} has "
                        f"{impl.get_vocab_size()} tokens")
    return Tokenizer("hf", impl, _hf_spec(impl, source, eot), eot)


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
    if data.get("kind") == "hf":
        from tokenizers import Tokenizer as HFTokenizer

        try:
            impl = HFTokenizer.from_str(json.dumps(data["tokenizer"]))
            return Tokenizer("hf", impl, spec, data["eos_token"])
        except Exception as e:
            raise UserError(f"tokenizer file {path} is not a valid tokenizer: {e}") from None
    from tokenizers import Tokenizer as HFTokenizer

    try:
        return Tokenizer("bpe", HFTokenizer.from_str(spec), spec)
    except Exception as e:
        raise UserError(f"tokenizer file {path} is not a valid tokenizer: {e}") from None


def build(kind: str, vocab_size: int, texts: Iterable[str], name: str | None = None, file: str | None = None,
          eos: str | None = None) -> Tokenizer:
    if kind == "bpe":
        return train_bpe(texts, vocab_size)
    if kind == "gpt2":
        return gpt2()
    if kind == "hf":
        return hf(name, file, eos, vocab_size)
    raise UserError(f"bad value for config key 'tokenizer.kind': {kind!r} (allowed: 'bpe', 'gpt2', 'hf')")
