"""Language identification (``data.languages``): py3langid, whose model ships inside its wheel (nothing is
downloaded at run time). Pure: no Ray; the model loads once per process (~0.5 s), on first use.

    language_of("Der schnelle braune Fuchs.")       # ("de", 0.99): ISO 639-1 code, normalised probability
    language_reason(text, ["en"], min_score=0.5)    # "" (keep) or "language"
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

_identifier: Any = None
_lock = threading.Lock()
MAX_CHARS = 2048  # the identifier reads at most this much of a document: its start decides (and bounds the cost)


def _get() -> Any:
    global _identifier
    if _identifier is None:
        with _lock:
            if _identifier is None:
                from py3langid.langid import MODEL_FILE, LanguageIdentifier

                _identifier = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
    return _identifier


def language_of(text: str) -> tuple[str, float]:
    """The most likely language of ``text`` (ISO 639-1, one of py3langid's 97) and its probability."""
    lang, prob = _get().classify(text[:MAX_CHARS])
    return str(lang), float(prob)


def language_reason(text: str, languages: Sequence[str], min_score: float = 0.0) -> str:
    """``"language"`` when ``text``'s language is not in ``languages`` or identified with less than
    ``min_score`` probability; ``""`` (keep) otherwise, and always when ``languages`` is empty."""
    if not languages:
        return ""
    lang, prob = language_of(text)
    return "" if lang in languages and prob >= min_score else "language"
