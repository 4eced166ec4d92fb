"""The quality stack of a cleaned document (pure; no Ray): language identification, boilerplate lines, the
heuristic filters of Gopher, C4 and FineWeb, and PII redaction. lm.data.clean.clean_batch runs
:func:`apply_stack` on every document that its own filters kept.

Order (the first drop wins; its reason is counted in the manifest's ``dropped``):

1. language (``data.languages``, lm.data.language)                      language
2. boilerplate lines removed (C4; counted as ``lines_removed``)          boilerplate when they held most text
3. Gopher quality (:func:`gopher_quality`)                               few_words, many_words, short_words,
                                                                         long_words, symbols, bullet_lines,
                                                                         ellipsis_lines, non_alpha_words, no_stop_words
4. Gopher repetition (:func:`gopher_repetition`)                          duplicate_lines, duplicate_paragraphs,
                                                                         top_ngram, duplicate_ngrams
5. FineWeb lines (:func:`fineweb_lines`)                                  no_terminal_punct, short_lines
6. PII redaction (lm.data.pii; counted per kind as ``redacted``)

The thresholds are datatrove's defaults for these filters (GopherQualityFilter, GopherRepetitionFilter,
FineWebQualityFilter, C4QualityFilter); datatrove itself is not used: its English word tokenizer needs
spaCy, and its filters take datatrove Documents one at a time. Words here are whitespace-separated pieces
stripped of surrounding punctuation.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from itertools import accumulate

from lm.config.quality import QualityConfig
from lm.data.language import language_reason
from lm.data.pii import PII_KINDS, redact

QUALITY_REASONS = ("language", "boilerplate", "few_words", "many_words", "short_words", "long_words", "symbols",
                   "bullet_lines", "ellipsis_lines", "non_alpha_words", "no_stop_words", "duplicate_lines",
                   "duplicate_paragraphs", "top_ngram", "duplicate_ngrams", "no_terminal_punct", "short_lines")
COUNT_COLUMNS = ("lines_removed", *(f"redacted_{k}" for k in PII_KINDS))  # per-document counts (int columns)

_PUNCT = string.punctuation + "«»“”‘’…–—•·¿¡"
_BULLETS = ("•", "-", "*", "‣", "◦", "▪", "●", "–", "·")
_TERMINAL = frozenset(".!?…\"'”’»)]。！？")
_PARAGRAPHS = re.compile(r"\n\s*\n")


def words_of(text: str) -> list[str]:
    """The words of ``text``: whitespace-separated pieces stripped of surrounding punctuation, non-empty."""
    return [w for w in (p.strip(_PUNCT) for p in text.split()) if w]


def _share(part: int, whole: int) -> float:
    return part / whole if whole else 0.0


def remove_boilerplate(text: str, phrases: list[str]) -> tuple[str, int, float]:
    """(``text`` without the lines that contain one of ``phrases`` (case ignored), lines removed, the share
    of the text's characters they held)."""
    if not phrases:
        return text, 0, 0.0
    lowered = [p.lower() for p in phrases]
    lines = text.split("\n")
    kept = [line for line in lines if not any(p in line.lower() for p in lowered)]
    if len(kept) == len(lines):
        return text, 0, 0.0
    return "\n".join(kept).strip(), len(lines) - len(kept), 1 - _share(sum(map(len, kept)), sum(map(len, lines)))


def gopher_quality(text: str, words: list[str], cfg: QualityConfig) -> str:
    """Gopher's quality rules (word count, mean word length, symbols, bullet / ellipsis lines, alphabetic
    words, stop words): the first that fails, or ``""``."""
    n = len(words)
    if cfg.min_words is not None and n < cfg.min_words:
        return "few_words"
    if cfg.max_words is not None and n > cfg.max_words:
        return "many_words"
    mean = _share(sum(map(len, words)), n)
    if cfg.min_mean_word_length is not None and n and mean < cfg.min_mean_word_length:
        return "short_words"
    if cfg.max_mean_word_length is not None and mean > cfg.max_mean_word_length:
        return "long_words"
    pieces = max(len(text.split()), 1)
    if cfg.max_symbol_word_ratio is not None and max(
            text.count("#"), text.count("...") + text.count("…")) / pieces > cfg.max_symbol_word_ratio:
        return "symbols"
    lines = [line.strip() for line in text.split("\n") if line.strip()]
    if cfg.max_bullet_lines is not None and _share(
            sum(line.startswith(_BULLETS) for line in lines), len(lines)) > cfg.max_bullet_lines:
        return "bullet_lines"
    if cfg.max_ellipsis_lines is not None and _share(
            sum(line.endswith(("...", "…")) for line in lines), len(lines)) > cfg.max_ellipsis_lines:
        return "ellipsis_lines"
    if cfg.min_alpha_words is not None and n and _share(
            sum(any(c.isalpha() for c in w) for w in words), n) < cfg.min_alpha_words:
        return "non_alpha_words"
    if cfg.min_stop_words is not None and len(set(cfg.stop_words) & {w.lower() for w in words}) < cfg.min_stop_words:
        return "no_stop_words"
    return ""


def duplicates(items: list[str]) -> tuple[int, int]:
    """(items that repeat an earlier one, their characters)."""
    seen: set[str] = set()
    count = chars = 0
    for item in items:
        if item in seen:
            count, chars = count + 1, chars + len(item)
        else:
            seen.add(item)
    return count, chars


def _grams(words: list[str], n: int) -> list[tuple[str, ...]]:
    return list(zip(*(words[j:] for j in range(n)), strict=False))


def top_ngram_chars(words: list[str], n: int) -> int:
    """Characters (words joined without spaces) of the most frequent word n-gram times its count (0 if none
    repeats)."""
    grams = Counter(_grams(words, n))
    if not grams:
        return 0
    gram, count = grams.most_common(1)[0]
    return sum(map(len, gram)) * count if count > 1 else 0


def duplicate_ngram_chars(words: list[str], n: int) -> int:
    """Characters of the word n-grams that repeat an earlier one, each word counted once (Gopher: a repeat
    skips its n words)."""
    grams = _grams(words, n)
    if len(set(grams)) == len(grams):
        return 0  # no repeat at all (most documents): no walk
    ends = list(accumulate(map(len, words), initial=0))
    seen: set[tuple[str, ...]] = set()
    chars, i = 0, 0
    while i < len(grams):
        gram = grams[i]
        if gram in seen:
            chars += ends[i + n] - ends[i]
            i += n
        else:
            seen.add(gram)
            i += 1
    return chars


def gopher_repetition(text: str, words: list[str], cfg: QualityConfig) -> str:
    """Gopher's repetition rules (duplicate lines, paragraphs, top n-grams, duplicate n-grams): the first
    that fails, or ``""``. Shares of characters are of the text's (n-grams: of its words')."""
    for name, parts, max_items, max_chars in (
            ("duplicate_lines", [p for p in text.split("\n") if p.strip()], cfg.max_duplicate_lines,
             cfg.max_duplicate_line_chars),
            ("duplicate_paragraphs", [p for p in _PARAGRAPHS.split(text) if p.strip()], cfg.max_duplicate_paragraphs,
             cfg.max_duplicate_paragraph_chars)):
        count, chars = duplicates(parts)
        if (max_items is not None and _share(count, len(parts)) > max_items) or (
                max_chars is not None and _share(chars, len(text)) > max_chars):
            return name
    word_chars = sum(map(len, words))
    for n, limit in sorted(cfg.max_top_ngram_chars.items()):
        if _share(top_ngram_chars(words, n), word_chars) > limit:
            return "top_ngram"
    for n, limit in sorted(cfg.max_duplicate_ngram_chars.items()):
        chars = duplicate_ngram_chars(words, n)
        if _share(chars, word_chars) > limit:
            return "duplicate_ngrams"
        if not chars:
            break  # no n-gram repeats, so no longer one does
    return ""


def fineweb_lines(text: str, cfg: QualityConfig) -> str:
    """FineWeb's line rules: too few lines end in terminal punctuation, too many lines are short; or ``""``."""
    lines = [line.strip() for line in text.split("\n") if line.strip()]
    if not lines:
        return ""
    if cfg.min_terminal_punct_lines is not None and _share(
            sum(line[-1] in _TERMINAL for line in lines), len(lines)) < cfg.min_terminal_punct_lines:
        return "no_terminal_punct"
    if cfg.max_short_lines is not None and _share(
            sum(len(line) <= cfg.short_line_chars for line in lines), len(lines)) > cfg.max_short_lines:
        return "short_lines"
    return ""


def quality_reason(text: str, cfg: QualityConfig) -> str:
    """Why the heuristic filters drop ``text`` (steps 3-5 of the module docstring), ``""`` to keep it."""
    if not cfg.enabled:
        return ""
    words = words_of(text)
    return gopher_quality(text, words, cfg) or gopher_repetition(text, words, cfg) or fineweb_lines(text, cfg)


def apply_stack(text: str, data) -> tuple[str, str, dict[str, int]]:
    """The whole stack on one cleaned document under ``data`` (a lm.config.DataConfig): ``(text, reason,
    counts)``, reason ``""`` when kept; counts by :data:`COUNT_COLUMNS` (lines removed, redactions per kind)."""
    counts = dict.fromkeys(COUNT_COLUMNS, 0)
    reason = language_reason(text, data.languages, data.language_min_score)
    if reason:
        return text, reason, counts
    if data.quality.enabled and data.quality.boilerplate:
        text, removed, share = remove_boilerplate(text, data.quality.boilerplate)
        counts["lines_removed"] = removed
        limit = data.quality.max_boilerplate_chars
        if not text or (limit is not None and share > limit):
            return text, "boilerplate", counts
    reason = quality_reason(text, data.quality)
    if reason or not data.pii.enabled:
        return text, reason, counts
    text, found = redact(text, data.pii.kinds)
    for kind, n in found.items():
        counts[f"redacted_{kind}"] = n
    return text, "", counts
