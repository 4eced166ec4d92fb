"""The byte-level BPE tokenizer: lossless round trip, special tokens, save/load, streaming training."""

import gzip
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lm.config import TokenizerConfig
from lm.tokenizer import BPETokenizer, bytes_per_token, train_tokenizer

CORPUS = Path(__file__).parents[2] / "lm" / "corpora" / "tinyshakespeare.txt.gz"


@pytest.fixture(scope="module")
def shakespeare_docs():
    return gzip.open(CORPUS, "rt").read().split("\n\n")


@pytest.fixture(scope="module")
def tok(shakespeare_docs):
    return train_tokenizer(iter(shakespeare_docs), TokenizerConfig(vocab_size=1024, max_train_bytes=400_000))


def test_vocab_and_special_tokens(tok):
    cfg = TokenizerConfig()
    assert tok.vocab_size == 1024
    for special in cfg.special_tokens:
        assert tok.encode(special) == [tok.tokenizer.token_to_id(special)]
    assert tok.encode("a<|endoftext|>b")[1] == tok.eos_id


def test_learns_merges(tok, shakespeare_docs):
    bpt = bytes_per_token(tok, shakespeare_docs[-200:])
    assert 2.0 < bpt < 6, bpt  # bytes alone would be 1.0
    assert len(tok.encode("KING RICHARD III:")) < len("KING RICHARD III:") / 2


text_strategy = st.one_of(
    st.text(),
    st.text(alphabet=st.characters(codec="utf-8")),
    st.text(alphabet="日本語中文한국어🎉👩‍👩‍👧\u200d\x00\x01\x7f\r\n\t <|>endoftext"),
    st.just(""),
)


@settings(max_examples=300, deadline=None)
@given(text_strategy)
def test_round_trip_any_string(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_token_bytes_are_what_each_token_stands_for(tok):
    ids = tok.encode("naïve café ✓ — ROMEO")
    assert b"".join(tok.token_bytes(i) for i in ids) == "naïve café ✓ — ROMEO".encode()
    assert sorted(tok.token_bytes(i) for i in range(tok.vocab_size) if len(tok.token_bytes(i)) == 1) == [
        bytes([b]) for b in range(256)]  # the byte alphabet: every byte once
    assert tok.token_bytes(tok.eos_id) == b"<|endoftext|>"


def test_stream_is_consumed_lazily_and_capped():
    pulled = []

    def docs():
        for i in range(100_000):
            pulled.append(i)
            yield f"document number {i} with some words in it"

    train_tokenizer(docs(), TokenizerConfig(vocab_size=300, max_train_bytes=5_000))
    assert len(pulled) < 200  # ~40 bytes each: stops pulling soon after the cap


def test_save_load_identical(tok, tmp_path):
    path = tmp_path / "tokenizer.json"
    tok.save(path)
    again = BPETokenizer.load(path)
    text = "To be, or not to be: that is the question. 🎭"
    assert again.encode(text) == tok.encode(text) and again.fingerprint() == tok.fingerprint()
    with pytest.raises(FileNotFoundError, match=r"no tokenizer\.json"):
        BPETokenizer.load(tmp_path / "missing.json")


def test_transformers_reads_it(tok, tmp_path):
    transformers = pytest.importorskip("transformers")
    tok.save(tmp_path / "tokenizer.json")
    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    text = "Hark! who goes there?"
    assert hf.encode(text, add_special_tokens=False) == tok.encode(text)
    assert hf.decode(tok.encode(text)) == text
