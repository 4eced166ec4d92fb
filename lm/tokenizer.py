"""Byte-level BPE tokenizer: train from a stream of documents, save/load HF ``tokenizer.json``.

Built on the Hugging Face ``tokenizers`` library. Byte-level means every string round-trips:
``tok.decode(tok.encode(s)) == s`` for any unicode text, including the empty string.

    tok = train_tokenizer(iter_of_texts, cfg.tokenizer)   # streams; never holds the corpus
    ids = tok.encode("ROMEO:") ; text = tok.decode(ids)
    tok.save(path) ; tok = BPETokenizer.load(path)       # the file transformers reads
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from lm.config import TokenizerConfig


def _unicode_bytes() -> dict[str, int]:
    """GPT-2's byte-level alphabet (the ByteLevel pre-tokenizer's): the character that stands for each byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{chr(b): b for b in printable}, **{chr(256 + n): b for n, b in enumerate(others)}}


_UNICODE_BYTES = _unicode_bytes()


class BPETokenizer:
    """A thin wrapper over ``tokenizers.Tokenizer`` that knows lmforge's special tokens."""

    def __init__(self, tokenizer: Tokenizer, eos_token: str = "<|endoftext|>", pad_token: str = "<|pad|>"):
        self.tokenizer = tokenizer
        self.eos_token = eos_token
        self.pad_token = pad_token
        self.eos_id = self._require_id(eos_token)
        self.pad_id = self._require_id(pad_token)

    def _require_id(self, token: str) -> int:
        token_id = self.tokenizer.token_to_id(token)
        if token_id is None:
            raise ValueError(f"tokenizer has no special token {token!r}")
        return token_id

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch_fast(texts, add_special_tokens=False)]  # no offsets

    def decode(self, ids: Iterable[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes a token stands for (a byte-level piece may be part of a UTF-8 character)."""
        piece = self.tokenizer.id_to_token(token_id) or ""
        if all(ch in _UNICODE_BYTES for ch in piece):
            return bytes(_UNICODE_BYTES[ch] for ch in piece)
        return piece.encode()

    def to_json(self) -> str:
        return self.tokenizer.to_str()

    def fingerprint(self) -> str:
        """A short hash of the tokenizer definition (recorded in manifests and lineage)."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:16]

    def save(self, path: str | Path) -> None:
        self.tokenizer.save(str(path))

    def special_tokens_map(self) -> dict[str, str]:
        return {"eos_token": self.eos_token, "pad_token": self.pad_token, "bos_token": self.eos_token}

    @classmethod
    def from_json(cls, text: str, eos_token: str = "<|endoftext|>", pad_token: str = "<|pad|>") -> BPETokenizer:
        return cls(Tokenizer.from_str(text), eos_token, pad_token)

    @classmethod
    def load(cls, path: str | Path, eos_token: str = "<|endoftext|>", pad_token: str = "<|pad|>") -> BPETokenizer:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no tokenizer.json there")
        return cls(Tokenizer.from_file(str(path)), eos_token, pad_token)


def _capped(texts: Iterable[str], max_bytes: int) -> Iterator[str]:
    seen = 0
    for text in texts:
        if seen >= max_bytes:
            return
        size = len(text.encode("utf-8"))
        if seen + size > max_bytes:
            text = text.encode("utf-8")[: max_bytes - seen].decode("utf-8", errors="ignore")
        seen += size
        yield text


def train_tokenizer(texts: Iterable[str], cfg: TokenizerConfig) -> BPETokenizer:
    """Train a byte-level BPE on a stream of documents (at most ``cfg.max_train_bytes`` of them)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        min_frequency=cfg.min_frequency,
        special_tokens=cfg.special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_capped(texts, cfg.max_train_bytes), trainer=trainer)
    return BPETokenizer(tokenizer, cfg.eos_token, cfg.pad_token)


def bytes_per_token(tok: BPETokenizer, texts: Iterable[str], batch_size: int = 256) -> float:
    """UTF-8 bytes per token over ``texts`` (higher = better compression)."""
    n_bytes = n_tokens = 0
    batch: list[str] = []

    def flush() -> None:
        nonlocal n_bytes, n_tokens
        n_bytes += sum(len(t.encode("utf-8")) for t in batch)
        n_tokens += sum(len(ids) for ids in tok.encode_batch(batch))
        batch.clear()

    for text in texts:
        batch.append(text)
        if len(batch) >= batch_size:
            flush()
    flush()
    return n_bytes / max(n_tokens, 1)


def tokenizer_config_json(tok: BPETokenizer, model_max_length: int) -> str:
    """``tokenizer_config.json`` so ``transformers.AutoTokenizer`` picks the right special tokens."""
    return json.dumps(
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "model_max_length": model_max_length,
            "clean_up_tokenization_spaces": False,
            **tok.special_tokens_map(),
        },
        indent=2,
    )
