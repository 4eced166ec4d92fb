"""Document cleaning (lm.data.clean): each transform, each filter, UTF-8 decoding, the batch adapter."""

import gzip
from pathlib import Path

import numpy as np
import pytest

from lm.config import CleanConfig
from lm.data.clean import (
    clean_batch,
    clean_text,
    decode_utf8,
    duplicate_line_fraction,
    duplicate_ngram_fraction,
    normalize_unicode,
    normalize_whitespace,
    remove_control_chars,
    remove_special_chars,
    text_hash,
    unify_newlines,
)

CORPUS = Path(__file__).resolve().parents[2] / "lm" / "corpora" / "tinyshakespeare.txt.gz"
PROSE = (
    "It was the best of times, it was the worst of times, it was the age of wisdom, "
    "it was the age of foolishness, it was the epoch of belief, it was the epoch of incredulity."
)


def shakespeare_docs(n: int = 50) -> list[str]:
    with gzip.open(CORPUS, "rt", encoding="utf-8") as f:
        return f.read().split("\n\n")[:n]


# ------------------------------------------------------------------------------------ transforms


def test_normalize_unicode_forms():
    assert normalize_unicode("ﬁne", "NFKC") == "fine"
    assert normalize_unicode("ﬁne", "NFC") == "ﬁne"
    assert normalize_unicode("e\u0301", "NFC") == "é"  # composed
    assert normalize_unicode("e\u0301", "none") == "e\u0301"
    with pytest.raises(ValueError, match="NFD"):
        normalize_unicode("x", "NFD")


def test_unify_newlines():
    assert unify_newlines("a\r\nb\rc\nd\u2028e\u2029f\x0cg") == "a\nb\nc\nd\ne\nf\ng"
    assert unify_newlines("a\r\n\r\nb") == "a\n\nb"


def test_remove_control_chars_keeps_newline_and_tab():
    assert remove_control_chars("a\x00b\x07c\x1bd\x7fe\u200bf\ufeffg\n\th") == "abcdefg\n\th"
    assert remove_control_chars("priv\ue000ate\U0010fffd") == "private"  # Co
    assert remove_control_chars("plain text, é ü 漢字") == "plain text, é ü 漢字"


def test_normalize_whitespace():
    assert normalize_whitespace("  a \u00a0\u3000 b  \n") == "a b"
    assert normalize_whitespace("a   \nb\t \n") == "a\nb"  # trailing spaces/tabs go
    assert normalize_whitespace("a\tb") == "a\tb"  # inner tabs stay
    assert normalize_whitespace("a\n\n\n\n\nb\n \n \nc") == "a\n\nb\n\nc"  # at most one blank line
    assert normalize_whitespace("a\r\nb\rc") == "a\nb\nc"
    assert normalize_whitespace("a\u2028b") == "a\nb"


def test_remove_special_chars():
    assert remove_special_chars("Hi* there# (ok)! -- 'q' \"r\" 1;2:3? é漢ñ́ $%^&") == (
        "Hi there (ok)! -- 'q' \"r\" 1;2:3? é漢ñ́ "
    )


def test_clean_text_order_makes_crlf_a_newline():
    cfg = CleanConfig(normalize_whitespace=False)
    assert clean_text("a\r\nb\rc\x00d", cfg) == ("a\nb\ncd", "")
    assert clean_text("  x \r\n\r\n\r\n\r\ny\x07  ", CleanConfig()) == ("x\n\ny", "")


def test_clean_text_optional_steps():
    assert clean_text("ﬁ Big", CleanConfig(normalize="NFKC", lowercase=True))[0] == "fi big"
    assert clean_text("ﬁ Big", CleanConfig())[0] == "ﬁ Big"
    # special-character removal, then whitespace is collapsed again
    assert clean_text("a * b @ c", CleanConfig(remove_special_chars=True))[0] == "a b c"
    raw = " a\x00  b\r\n"
    assert clean_text(raw, CleanConfig(remove_control_chars=False, normalize_whitespace=False)) == (raw, "")


# --------------------------------------------------------------------------------------- filters


def test_length_filters():
    assert clean_text("   \n\t ", CleanConfig()) == ("", "too_short")
    assert clean_text("abcd", CleanConfig(min_chars=5))[1] == "too_short"
    assert clean_text("abcde", CleanConfig(min_chars=5))[1] == ""
    assert clean_text("abcdef", CleanConfig(max_chars=5))[1] == "too_long"
    assert clean_text("abcde", CleanConfig(max_chars=5))[1] == ""


def test_repetitive_lines_dropped():
    text = "\n".join(["Buy now!", "Buy now!", "Buy now!", "Click here", "Buy now!"])
    assert duplicate_line_fraction(text) == (pytest.approx(3 / 5), 5)
    assert clean_text(text, CleanConfig()) == (text, "repetitive_lines")
    assert clean_text(text, CleanConfig(max_duplicate_line_fraction=0.7))[1] == ""
    assert clean_text(text, CleanConfig(max_duplicate_line_fraction=1))[1] == ""
    # too few lines to judge: kept
    assert clean_text("same\nsame", CleanConfig())[1] == ""


def test_repetitive_ngrams_dropped():
    spam = " ".join(["the cat sat"] * 10)  # 28 trigrams, 3 distinct
    frac, count = duplicate_ngram_fraction(spam, 3)
    assert count == 28 and frac == pytest.approx(25 / 28)
    assert clean_text(spam, CleanConfig()) == (spam, "repetitive_ngrams")
    assert clean_text(spam, CleanConfig(max_duplicate_ngram_fraction=1))[1] == ""
    assert clean_text(PROSE, CleanConfig())[1] == ""
    assert clean_text(PROSE, CleanConfig(max_duplicate_ngram_fraction=0.1))[1] == "repetitive_ngrams"
    # short texts are never judged
    assert clean_text("ha ha ha ha ha ha ha ha ha ha", CleanConfig())[1] == ""
    assert duplicate_ngram_fraction("a b", 3) == (0.0, 0)


def test_filter_order():
    spam_lines = "\n".join(["spam spam spam spam"] * 20)
    assert clean_text(spam_lines, CleanConfig(max_chars=10))[1] == "too_long"
    assert clean_text(spam_lines, CleanConfig())[1] == "repetitive_lines"


def test_shakespeare_is_kept():
    docs = shakespeare_docs(50)
    assert len(docs) == 50
    for doc in docs:
        cleaned, reason = clean_text(doc, CleanConfig())
        assert reason == "", (reason, doc)
        assert cleaned == doc.strip()  # plain ASCII prose: nothing to change


# -------------------------------------------------------------------------------------- decoding


def test_decode_utf8():
    assert decode_utf8("héllo".encode(), "drop") == "héllo"
    assert decode_utf8(b"\xef\xbb\xbfBOM", "drop") == "BOM"
    bad = b"ok \xff\xfe bytes \xc3"
    assert decode_utf8(bad, "drop") is None
    assert decode_utf8(bad, "replace") == "ok \ufffd\ufffd bytes \ufffd"
    assert decode_utf8(b"\xef\xbb\xbfa\xff", "replace") == "a\ufffd"
    with pytest.raises(ValueError, match="policy"):
        decode_utf8(b"x", "ignore")


# ----------------------------------------------------------------------------------------- batch


def test_clean_batch_numpy_and_lists():
    batch = {
        "id": np.array(["s/a#0", "s/a#1", "s/a#2", "s/a#3"], dtype=object),
        "text": np.array(["  Hello\r\nworld  ", "   ", "kept as is  ", "ok"], dtype=object),
        "reason": np.array(["", "", "too_large", None], dtype=object),
        "source": ["s", "s", "s", "s"],
    }
    out = clean_batch(batch, CleanConfig())
    assert out["text"] == ["Hello\nworld", "", "kept as is  ", "ok"]
    assert out["reason"] == ["", "too_short", "too_large", ""]
    assert out["n_bytes"] == [11, 0, 0, 2]
    assert out["hash"][0] == text_hash("Hello\nworld") and len(out["hash"][0]) == 32
    assert out["hash"][1:3] == ["", ""] and out["hash"][3] == text_hash("ok")
    assert out["id"] is batch["id"] and out["source"] is batch["source"]
    assert set(out) == {"id", "text", "reason", "source", "n_bytes", "hash"}
    assert all(isinstance(out[c], list) for c in ("text", "reason", "n_bytes", "hash"))


def test_clean_batch_bytes_and_hash_dedup():
    out = clean_batch({"text": [b"caf\xc3\xa9", b"bad\xff", "café "], "reason": ["", "", ""]},
                      CleanConfig(invalid_utf8="drop"))
    assert out["reason"] == ["", "invalid_utf8", ""]
    assert out["n_bytes"] == [5, 0, 5]
    assert out["hash"][0] == out["hash"][2] != ""
    replaced = clean_batch({"text": [b"bad\xff"], "reason": [""]}, CleanConfig())
    assert replaced["text"] == ["bad\ufffd"] and replaced["reason"] == [""]
    with pytest.raises(KeyError, match="reason"):
        clean_batch({"text": ["x"]}, CleanConfig())
