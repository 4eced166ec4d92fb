"""The data section's quality stack (lm.data.quality, lm.data.pii, lm.data.decontam): heuristic quality
filters of the Gopher / C4 / FineWeb kind, PII redaction and decontamination. The defaults suit web text;
every threshold can be set to null to turn that one check off.

    data:
      languages: [en]
      quality: {min_words: 50, max_bullet_lines: 0.9}
      pii: {kinds: [secret, email, card, ip, phone]}
      decontaminate: {ngram: 13}
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from lm.config.base import Section
from lm.config.sources import SourceConfig

GOPHER_STOP_WORDS = ["the", "be", "to", "of", "and", "that", "have", "with"]
C4_BOILERPLATE = ["javascript", "cookie policy", "privacy policy", "terms of use", "terms of service",
                  "uses cookies", "use of cookies", "all rights reserved", "lorem ipsum"]
PIIKind = Literal["secret", "email", "card", "ip", "phone"]


class QualityConfig(Section):
    """Heuristic document filters (lm.data.quality), first failure wins, each counted by reason in the
    manifest (``dropped``). Words are the whitespace-separated pieces without surrounding punctuation."""

    enabled: bool = Field(True, description="Run the heuristic quality filters at all.")
    # Gopher quality (Rae et al. 2021)
    min_words: int | None = Field(50, ge=0, description="Drop documents with fewer words (reason few_words).")
    max_words: int | None = Field(100_000, ge=1, description="Drop documents with more words (reason many_words).")
    min_mean_word_length: float | None = Field(
        3.0, ge=0, description="Drop when the mean word length (characters) is below (reason short_words).")
    max_mean_word_length: float | None = Field(
        10.0, gt=0, description="Drop when the mean word length is above (reason long_words).")
    max_symbol_word_ratio: float | None = Field(
        0.1, ge=0, description="Drop when '#' or ellipses ('...', '…') per word exceed this (reason symbols).")
    max_bullet_lines: float | None = Field(
        0.9, ge=0, le=1, description="Drop when more than this share of lines start with a bullet (reason "
        "bullet_lines).")
    max_ellipsis_lines: float | None = Field(
        0.3, ge=0, le=1, description="Drop when more than this share of lines end in an ellipsis (reason "
        "ellipsis_lines).")
    min_alpha_words: float | None = Field(
        0.8, ge=0, le=1, description="Drop when fewer than this share of words hold a letter (reason non_alpha_words).")
    min_stop_words: int | None = Field(
        2, ge=0, description="Drop when fewer of the stop_words occur (reason no_stop_words; English: use "
        "null for other languages or give their stop words).")
    stop_words: list[str] = Field(
        default_factory=lambda: list(GOPHER_STOP_WORDS), description="Stop words for min_stop_words (lower case).")
    # Gopher repetition
    max_duplicate_lines: float | None = Field(
        0.3, ge=0, le=1, description="Drop when more than this share of lines repeat an earlier line (reason "
        "duplicate_lines).")
    max_duplicate_line_chars: float | None = Field(
        0.2, ge=0, le=1, description="... or such lines hold more than this share of characters (duplicate_lines).")
    max_duplicate_paragraphs: float | None = Field(
        0.3, ge=0, le=1, description="Drop when more than this share of paragraphs (split on blank lines) repeat "
        "an earlier one (reason duplicate_paragraphs).")
    max_duplicate_paragraph_chars: float | None = Field(
        0.2, ge=0, le=1, description="... or such paragraphs hold more than this share of characters.")
    max_top_ngram_chars: dict[int, float] = Field(
        default_factory=lambda: {2: 0.2, 3: 0.18, 4: 0.16}, description="n -> the most frequent word n-gram's "
        "characters may cover at most this share of the words' characters (reason top_ngram); {} = off.")
    max_duplicate_ngram_chars: dict[int, float] = Field(
        default_factory=lambda: {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10},
        description="n -> characters of word n-grams that occur more than once may cover at most this share "
        "(reason duplicate_ngrams); {} = off.")
    # FineWeb
    min_terminal_punct_lines: float | None = Field(
        0.12, ge=0, le=1, description="Drop when fewer than this share of lines end in terminal punctuation "
        "(. ! ? \" and the like; reason no_terminal_punct).")
    max_short_lines: float | None = Field(
        0.67, ge=0, le=1, description="Drop when more than this share of lines have at most short_line_chars "
        "characters (reason short_lines).")
    short_line_chars: int = Field(30, ge=1, description="A line this long or shorter is short (max_short_lines).")
    # C4
    boilerplate: list[str] = Field(
        default_factory=lambda: list(C4_BOILERPLATE), description="Lines containing one of these phrases (case "
        "ignored) are removed (counted in the manifest's lines_removed); [] = off.")
    max_boilerplate_chars: float | None = Field(
        0.5, ge=0, le=1, description="Drop the document when its boilerplate lines held more than this share of its "
        "characters (reason boilerplate).")


class PIIConfig(Section):
    """Redaction of personal data and secrets (lm.data.pii): each match becomes a typed placeholder (<EMAIL>,
    <IP_ADDRESS>, <PHONE_NUMBER>, <CARD_NUMBER>, <API_KEY>, <SECRET>, <PASSWORD>, <PRIVATE_KEY>), counted
    per kind in the manifest (``redacted``). Runs on every kept document after the quality filters."""

    enabled: bool = Field(True, description="Redact at all.")
    kinds: list[PIIKind] = Field(
        default_factory=lambda: ["secret", "email", "card", "ip", "phone"],
        description="What to redact: secret (API keys, bearer tokens, private-key blocks, passwords in URLs and "
        "assignments), email, card (Luhn-valid 13-19 digits), ip (v4 and v6), phone.")


class DecontamConfig(Section):
    """Decontamination after the split (lm.data.decontam): train documents sharing a word n-gram with a held-out
    or evaluation text are dropped (reason contaminated). The held-out sets are the run's val and test splits
    (what the continual gate's fixed and new sets and the harness tasks are made from), the text sources of
    eval.sets, and ``sources``; a continual iteration's new documents also against these splits of the corpus
    they are added to (its shards, decoded)."""

    enabled: bool = Field(True, description="Drop contaminated train documents.")
    ngram: int = Field(13, ge=3, description="Words per n-gram (lower-cased, punctuation ignored).")
    splits: list[Literal["val", "test"]] = Field(
        default_factory=lambda: ["val", "test"], description="Held-out splits of this run to decontaminate against.")
    eval_sets: bool = Field(True, description="Also against the text sources (uri) of eval.sets.")
    sources: list[SourceConfig] = Field(
        default_factory=list, description="Further texts to decontaminate against (benchmarks), read like "
        "data.sources and cleaned with data.clean.")
