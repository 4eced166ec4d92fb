"""Deterministic document-level train/validation split (pure; no Ray).

A document's split depends only on its stable id and the validation fraction, so adding new
documents later never moves an old one between splits.
"""

from __future__ import annotations

import hashlib
from typing import Literal

Split = Literal["train", "val"]


def hash_unit(key: str) -> float:
    """Map a string to a uniform float in [0, 1) by SHA-256 (stable across runs and machines)."""
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_of(doc_id: str, val_fraction: float) -> Split:
    """``"val"`` for about ``val_fraction`` of all ids, ``"train"`` for the rest."""
    return "val" if hash_unit(doc_id) < val_fraction else "train"
