"""Document cleaning: text transforms, quality filters and the batch adapter (pure; no Ray, no I/O).

Owns everything between "raw document text" and "cleaned text + drop reason". Each transform is a
small function of a string; :func:`clean_text` chains them in this fixed order (each one only when
its :class:`~lm.config.CleanConfig` flag is on):

1. ``normalize_unicode``     NFC / NFKC (``cfg.normalize``)
2. ``unify_newlines``        \\r\\n, \\r, \\v, \\f, NEL, U+2028/U+2029 → \\n (runs whenever step 3 or 4 is on,
                             so a Windows/Mac line end becomes a newline instead of vanishing in step 3)
3. ``remove_control_chars``  drop category C* (Cc, Cf, Cs, Co, Cn) except \\n and \\t
4. ``normalize_whitespace``  Zs spaces → ' ', collapse space runs, strip line ends, ≤ 1 blank line, strip
5. lowercase
6. ``remove_special_chars``  keep letters, marks, digits, whitespace and .,;:!?'"-() (then step 4 again)

then the filters, first failure wins: ``too_short``, ``too_long``, ``repetitive_lines``,
``repetitive_ngrams``. :func:`clean_batch` applies it to a Ray-Data-style column batch and adds the
``n_bytes`` and ``hash`` (exact-dedup key) columns; given the data section, it also runs the quality stack
(lm.data.quality: language, heuristic filters, PII redaction) on each kept document, before the hash.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Sequence
from typing import Any

from lm.config import CleanConfig, DataConfig
from lm.data.quality import COUNT_COLUMNS, apply_stack

DROP_REASONS = ("too_short", "too_long", "repetitive_lines", "repetitive_ngrams", "invalid_utf8")

MIN_LINES_FOR_LINE_FILTER = 3
"""The duplicate-line filter only looks at documents with at least this many non-empty lines."""
MIN_NGRAMS_FOR_NGRAM_FILTER = 10
"""The duplicate-n-gram filter only looks at documents with at least this many word n-grams."""

_NEWLINES = re.compile("\r\n|[\r\v\f\x85\u2028\u2029]")
_SPACE_RUN = re.compile(" {2,}")
_TRAILING = re.compile("[ \t]+$", re.MULTILINE)
_MANY_NEWLINES = re.compile("\n{3,}")
_ODD_SPACES = re.compile("[\u00a0\u1680\u2000-\u200a\u202f\u205f\u3000]")  # category Zs but ' '
_BASIC_PUNCT = frozenset(".,;:!?'\"-()")


# --------------------------------------------------------------------------------------- transforms


def normalize_unicode(text: str, form: str) -> str:
    """Unicode normalisation: ``"none"`` leaves the text alone, ``"NFC"`` / ``"NFKC"`` normalise."""
    if form == "none":
        return text
    if form not in ("NFC", "NFKC"):
        raise ValueError(f"unknown unicode normalisation {form!r}; expected none, NFC or NFKC")
    return unicodedata.normalize(form, text)


def unify_newlines(text: str) -> str:
    """Every line break (\\r\\n, \\r, \\v, \\f, U+0085, U+2028, U+2029) becomes a single ``\\n``."""
    if text.isascii() and "\r" not in text and "\v" not in text and "\f" not in text:
        return text  # fast path: nothing to replace
    return _NEWLINES.sub("\n", text)


def remove_control_chars(text: str) -> str:
    """Drop characters of Unicode category C* (control, format, surrogate, private use, unassigned).

    Newline and tab are kept. Call :func:`unify_newlines` first, or a lone ``\\r`` line end vanishes.
    """
    if text.replace("\n", "").replace("\t", "").isprintable():
        return text  # fast path: no character of category C* (nor Z* other than ' ')
    return "".join(c for c in text if c in "\n\t" or not unicodedata.category(c).startswith("C"))


def normalize_whitespace(text: str) -> str:
    """Unify line ends, turn odd spaces (category Zs) into ' ', collapse runs of spaces, strip each
    line's trailing spaces/tabs, keep at most one blank line in a row, strip the whole document.

    Tabs inside a line are kept; leading spaces of a line are collapsed to one, not removed.
    """
    text = unify_newlines(text)
    if not text.isascii():
        text = _ODD_SPACES.sub(" ", text)
    if "  " in text:  # each substitution only where it can match: the `in` tests are much cheaper
        text = _SPACE_RUN.sub(" ", text)
    if " \n" in text or "\t\n" in text:
        text = _TRAILING.sub("", text)
    if "\n\n\n" in text:
        text = _MANY_NEWLINES.sub("\n\n", text)
    return text.strip()


def remove_special_chars(text: str) -> str:
    """Keep letters and combining marks (L*, M*), digits/numbers (N*), whitespace and ``.,;:!?'"-()``."""
    return "".join(
        c for c in text if c.isspace() or c in _BASIC_PUNCT or unicodedata.category(c)[0] in "LMN"
    )


# ------------------------------------------------------------------------------------------ filters


def duplicate_line_fraction(text: str) -> tuple[float, int]:
    """(share of non-empty lines that repeat an earlier line, number of non-empty lines).

    Lines are compared after stripping surrounding whitespace.
    """
    lines = [line.strip() for line in text.split("\n")]
    lines = [line for line in lines if line]
    if not lines:
        return 0.0, 0
    return 1 - len(set(lines)) / len(lines), len(lines)


def duplicate_ngram_fraction(text: str, n: int) -> tuple[float, int]:
    """(share of word n-grams that repeat an earlier identical n-gram, number of n-grams).

    Words are the whitespace-separated pieces of the text.
    """
    if n < 1:
        raise ValueError(f"n-gram size must be >= 1, got {n}")
    words = text.split()
    count = len(words) - n + 1
    if count <= 0:
        return 0.0, 0
    grams = set(zip(*(words[i : i + count] for i in range(n)), strict=True))
    return 1 - len(grams) / count, count


def drop_reason(text: str, cfg: CleanConfig) -> str:
    """Why a cleaned text would be dropped ("" = keep); the filters run in the documented order."""
    if len(text) < cfg.min_chars:
        return "too_short"
    if len(text) > cfg.max_chars:
        return "too_long"
    if cfg.max_duplicate_line_fraction < 1:
        frac, n_lines = duplicate_line_fraction(text)
        if n_lines >= MIN_LINES_FOR_LINE_FILTER and frac > cfg.max_duplicate_line_fraction:
            return "repetitive_lines"
    if cfg.max_duplicate_ngram_fraction < 1:
        frac, n_grams = duplicate_ngram_fraction(text, cfg.repetition_ngram)
        if n_grams >= MIN_NGRAMS_FOR_NGRAM_FILTER and frac > cfg.max_duplicate_ngram_fraction:
            return "repetitive_ngrams"
    return ""


# ------------------------------------------------------------------------------------------ documents


def clean_text(text: str, cfg: CleanConfig) -> tuple[str, str]:
    """Clean one document: ``(cleaned_text, drop_reason)``, reason ``""`` when the document is kept.

    The cleaned text is returned for dropped documents too (for reports); callers filter on the reason.
    """
    text = normalize_unicode(text, cfg.normalize)
    if cfg.remove_control_chars or cfg.normalize_whitespace:
        text = unify_newlines(text)
    if cfg.remove_control_chars:
        text = remove_control_chars(text)
    if cfg.normalize_whitespace:
        text = normalize_whitespace(text)
    if cfg.lowercase:
        text = text.lower()
    if cfg.remove_special_chars:
        text = remove_special_chars(text)
        if cfg.normalize_whitespace:  # removed symbols leave double spaces and trailing blanks
            text = normalize_whitespace(text)
    return text, drop_reason(text, cfg)


def decode_utf8(data: bytes | bytearray | memoryview, policy: str) -> str | None:
    """Strict UTF-8 decode (a leading BOM is stripped). Invalid bytes: ``"replace"`` → U+FFFD for
    each bad sequence, ``"drop"`` → ``None`` (the caller drops the document as ``invalid_utf8``)."""
    if policy not in ("replace", "drop"):
        raise ValueError(f"unknown invalid-UTF-8 policy {policy!r}; expected replace or drop")
    raw = bytes(data)
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        if policy == "drop":
            return None
        return raw.decode("utf-8-sig", errors="replace")


def text_hash(text: str) -> str:
    """Hex BLAKE2b-128 of the UTF-8 text: the exact-dedup key."""
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).hexdigest()


def _as_list(column: Any) -> list[Any]:
    return column.tolist() if hasattr(column, "tolist") else list(column)


def clean_batch(batch: dict[str, Sequence[Any]], cfg: CleanConfig, data: DataConfig | None = None) -> dict[str, Any]:
    """Clean a column batch (``map_batches`` style; columns are lists or numpy arrays).

    Needs ``"text"`` and ``"reason"`` ("" / None = not dropped yet). Rows that already carry a reason
    pass through untouched. ``"text"`` may hold bytes, decoded by ``cfg.invalid_utf8``. Returns the
    same columns (``text`` cleaned, ``reason`` set for newly dropped rows) plus ``n_bytes`` (UTF-8
    size of the cleaned text, 0 when dropped) and ``hash`` (:func:`text_hash`, "" when dropped);
    every other column is returned unchanged. With ``data`` (the data section), kept documents go through
    the quality stack (:func:`lm.data.quality.apply_stack`) and the columns of
    :data:`~lm.data.quality.COUNT_COLUMNS` (lines removed, redactions per kind) are added.
    """
    missing = {"text", "reason"} - set(batch)
    if missing:
        raise KeyError(f"clean_batch needs columns {sorted(missing)}; got {sorted(batch)}")
    texts, reasons = _as_list(batch["text"]), _as_list(batch["reason"])
    if len(texts) != len(reasons):
        raise ValueError(f"column lengths differ: text {len(texts)}, reason {len(reasons)}")
    out_text: list[Any] = []
    out_reason: list[str] = []
    n_bytes: list[int] = []
    hashes: list[str] = []
    counts: dict[str, list[int]] = {c: [] for c in COUNT_COLUMNS} if data is not None else {}
    for text, reason in zip(texts, reasons, strict=True):
        reason, found = reason or "", None
        if not reason:
            if isinstance(text, bytes | bytearray | memoryview):
                decoded = decode_utf8(text, cfg.invalid_utf8)
                text, reason = (text, "invalid_utf8") if decoded is None else (decoded, "")
            if not reason:
                text, reason = clean_text(text or "", cfg)
            if not reason and data is not None:
                text, reason, found = apply_stack(text, data)
        for c, values in counts.items():  # what was done to the documents kept
            values.append(found[c] if found and not reason else 0)
        out_text.append(text)
        out_reason.append(reason)
        if reason:
            n_bytes.append(0)
            hashes.append("")
        else:
            encoded = text.encode("utf-8")
            n_bytes.append(len(encoded))
            hashes.append(hashlib.blake2b(encoded, digest_size=16).hexdigest())
    out: dict[str, Any] = dict(batch)
    out.update(text=out_text, reason=out_reason, n_bytes=n_bytes, hash=hashes, **counts)
    return out
