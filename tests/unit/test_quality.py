"""The quality stack (lm.data.quality, lm.data.language): each heuristic filter, boilerplate lines, language
identification, the stack's order and counts, and its batch adapter (lm.data.clean.clean_batch)."""

import gzip
from pathlib import Path

import pytest

from lm.config import CleanConfig, DataConfig, load_config
from lm.config.quality import QualityConfig
from lm.data.clean import clean_batch
from lm.data.language import language_of, language_reason
from lm.data.quality import (
    COUNT_COLUMNS,
    apply_stack,
    duplicate_ngram_chars,
    duplicates,
    fineweb_lines,
    gopher_quality,
    gopher_repetition,
    quality_reason,
    remove_boilerplate,
    top_ngram_chars,
    words_of,
)

ROOT = Path(__file__).resolve().parents[2]
# a web-like paragraph that passes every default filter (57 words, English, punctuated, no repeats)
GOOD = ("The city council met on Tuesday evening to discuss the new budget for public libraries. Several "
        "members argued that the proposed cuts would reduce opening hours in the poorest districts, where "
        "residents depend on free internet access. After a long debate, the council agreed to delay the vote "
        "until next month and to publish a detailed report on usage figures for each branch.")
OFF = QualityConfig(**{name: None for name, f in QualityConfig.model_fields.items()
                       if f.annotation in (int | None, float | None)}, max_top_ngram_chars={},
                    max_duplicate_ngram_chars={}, boilerplate=[])


def reason(text: str, **changes) -> str:
    """The heuristic filters' reason with every check off but ``changes``."""
    return quality_reason(text, OFF.model_copy(update=changes))


def test_good_web_text_passes_every_default_filter():
    assert quality_reason(GOOD, QualityConfig()) == ""
    assert apply_stack(GOOD, DataConfig())[1] == ""


def test_words_strip_punctuation():
    assert words_of("Hello, world! -- (yes) ...") == ["Hello", "world", "yes"]


def test_word_count_and_mean_word_length():
    assert reason("one two three", min_words=4) == "few_words"
    assert reason("one two three", min_words=3) == ""
    assert reason("one two three four", max_words=3) == "many_words"
    assert reason("a b c is to", min_mean_word_length=3) == "short_words"
    assert reason("internationalization considerations", max_mean_word_length=10) == "long_words"
    assert reason("reasonable words here", min_mean_word_length=3, max_mean_word_length=10) == ""


def test_symbol_to_word_ratio():
    assert reason("#one #two three four", max_symbol_word_ratio=0.1) == "symbols"
    assert reason("wait... what... no", max_symbol_word_ratio=0.5) == "symbols"
    assert reason("one # two three four five six seven eight nine ten eleven", max_symbol_word_ratio=0.1) == ""


def test_bullet_and_ellipsis_lines():
    bullets = "- one thing\n- another thing\n• a third thing\nA closing sentence."
    assert reason(bullets, max_bullet_lines=0.5) == "bullet_lines"
    assert reason(bullets, max_bullet_lines=0.8) == ""
    trailing = "and then...\nso it goes…\nThe end."
    assert reason(trailing, max_ellipsis_lines=0.3) == "ellipsis_lines"
    assert reason(trailing, max_ellipsis_lines=0.7) == ""


def test_alphabetic_words_and_stop_words():
    assert reason("12 34 56 seven", min_alpha_words=0.8) == "non_alpha_words"
    assert reason("cats chase mice daily", min_stop_words=2) == "no_stop_words"
    assert reason("The cats chase mice and dogs", min_stop_words=2) == ""  # case ignored
    assert reason("Die Katze jagt die Maus", min_stop_words=2, stop_words=["die", "der"]) == "no_stop_words"
    assert reason("Die Katze jagt der Maus", min_stop_words=2, stop_words=["die", "der"]) == ""


def test_duplicate_lines_and_paragraphs():
    assert duplicates(["a", "bb", "a", "bb", "c"]) == (2, 3)
    lines = "buy now\nbuy now\nbuy now\nThe rest of the page is fine."
    assert reason(lines, max_duplicate_lines=0.3) == "duplicate_lines"
    assert reason(lines, max_duplicate_line_chars=0.2) == "duplicate_lines"
    assert reason(lines, max_duplicate_lines=0.6, max_duplicate_line_chars=0.6) == ""
    paragraphs = "Same paragraph here.\n\nSame paragraph here.\n\nAnother one, different.\n\nAnd a fourth."
    assert reason(paragraphs, max_duplicate_paragraphs=0.2) == "duplicate_paragraphs"
    assert reason(paragraphs, max_duplicate_paragraphs=0.3) == ""


def test_top_and_duplicate_ngrams():
    words = ["click", "here", "now", "click", "here", "now", "click", "here", "now", "and", "read"]
    assert top_ngram_chars(words, 2) == len("clickhere") * 3
    assert top_ngram_chars(["no", "pair", "repeats", "at", "all"], 2) == 0
    assert duplicate_ngram_chars(words, 3) == 2 * len("clickherenow")
    assert reason(" ".join(words), max_top_ngram_chars={2: 0.2}) == "top_ngram"
    assert reason(" ".join(words), max_duplicate_ngram_chars={3: 0.15}) == "duplicate_ngrams"
    assert reason(GOOD, max_top_ngram_chars={2: 0.2}, max_duplicate_ngram_chars={5: 0.15}) == ""


def test_fineweb_line_rules():
    cfg = OFF.model_copy(update={"min_terminal_punct_lines": 0.5})
    assert fineweb_lines("Home\nProducts\nContact us\nAbout.", cfg) == "no_terminal_punct"
    assert fineweb_lines("One sentence.\nAnother one!\nA list", cfg) == ""
    cfg = OFF.model_copy(update={"max_short_lines": 0.5})
    assert fineweb_lines("Home\nProducts\nA much longer line that says something about it.", cfg) == "short_lines"
    assert fineweb_lines(GOOD, cfg) == ""


def test_first_failure_wins_in_the_documented_order():
    words = QualityConfig().model_copy(update={"min_words": 100})
    assert gopher_quality(GOOD, words_of(GOOD), words) == "few_words"
    assert gopher_repetition(GOOD, words_of(GOOD), QualityConfig()) == ""
    assert quality_reason("- x\n- x\n- x", QualityConfig()) == "few_words"  # before bullets and duplicates
    assert quality_reason("- x\n- x\n- x", QualityConfig(enabled=False)) == ""


def test_boilerplate_lines_are_removed_and_mostly_boilerplate_dropped():
    page = f"{GOOD}\nThis site uses cookies to improve your experience.\nCopyright 2024. All Rights Reserved."
    text, removed, share = remove_boilerplate(page, QualityConfig().boilerplate)
    assert (text, removed) == (GOOD, 2) and 0.1 < share < 0.3
    assert remove_boilerplate(page, []) == (page, 0, 0.0)
    kept, why, counts = apply_stack(page, DataConfig())
    assert (kept, why, counts["lines_removed"]) == (GOOD, "", 2)
    notice = ("This website uses cookies. By continuing to browse you agree to our cookie policy, our privacy policy "
              "and our terms of use, which you can read in full on the legal page of this website at any time.\n")
    assert apply_stack(notice * 3 + GOOD, DataConfig())[1] == "boilerplate"
    assert apply_stack(notice * 3 + GOOD, DataConfig(quality={"max_boilerplate_chars": None}))[:2] == (GOOD, "")


def test_language_identification_ships_its_model():
    assert language_of(GOOD)[0] == "en"
    german = "Der Stadtrat hat am Dienstagabend über den neuen Haushalt für die öffentlichen Bibliotheken beraten."
    assert language_of(german)[0] == "de"
    assert language_reason(german, ["en"]) == "language"
    assert language_reason(german, ["en", "de"]) == ""
    assert language_reason(german, []) == ""  # no filter
    assert language_reason(GOOD, ["en"], min_score=1.01) == "language"


def test_the_stack_redacts_after_filtering_and_counts():
    text = GOOD + " Write to clerk@city.example.org or call +1 415 555 0132 from 10.1.2.3."
    out, why, counts = apply_stack(text, DataConfig())
    assert why == ""
    assert "<EMAIL>" in out and "<PHONE_NUMBER>" in out and "<IP_ADDRESS>" in out and "clerk@" not in out
    assert counts == {**dict.fromkeys(COUNT_COLUMNS, 0), "redacted_email": 1, "redacted_phone": 1, "redacted_ip": 1}
    off = DataConfig(pii={"enabled": False})
    assert apply_stack(text, off)[0] == text
    assert apply_stack(text, DataConfig(pii={"kinds": ["email"]}))[2]["redacted_ip"] == 0
    assert apply_stack("Das ist ein kurzer deutscher Satz ohne Inhalt.", DataConfig())[1] == "language"


def test_clean_batch_runs_the_stack_with_the_data_section():
    batch = {"text": [GOOD + " Mail a@b.example.com.", "too short to keep", "x"], "reason": ["", "", "too_large"],
             "id": ["a", "b", "c"]}
    out = clean_batch(batch, CleanConfig(), DataConfig())
    assert out["reason"] == ["", "few_words", "too_large"]
    assert "<EMAIL>" in out["text"][0] and out["redacted_email"] == [1, 0, 0]
    assert set(COUNT_COLUMNS) <= set(out)
    assert "redacted_email" not in clean_batch(batch, CleanConfig())  # without the section: cleaning only


@pytest.mark.parametrize("preset", ["tiny", "shakespeare-cpu", "sft-shakespeare"])
def test_the_shakespeare_presets_keep_their_verse(preset):
    cfg = load_config(ROOT / f"configs/{preset}.yaml")
    with gzip.open(ROOT / "lm/corpora/tinyshakespeare.txt.gz", "rt") as f:
        speeches = f.read().split("\n\n")[:300]
    assert [apply_stack(s, cfg.data)[1] for s in speeches] == [""] * len(speeches)
    assert sum(quality_reason(s, QualityConfig()) != "" for s in speeches) > 200  # web defaults would drop them
