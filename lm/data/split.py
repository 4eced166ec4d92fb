"""Deterministic document-level train/validation/test split (pure; no Ray).

Owns which split a document belongs to. The split depends only on the document's stable id and
the fractions, so adding new documents later never moves an old one between splits.

Stratified by source: ids embed the source name (``<source>/<file>#<index>``) and the hash of an id
is uniform whatever the source, so every source contributes about ``val_fraction`` /
``test_fraction`` of *its own* documents to val / test, with no per-source bookkeeping.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Any, Literal

Split = Literal["train", "val"]
SplitName = Literal["train", "val", "test"]


def hash_unit(key: str) -> float:
    """Map a string to a uniform float in [0, 1) by SHA-256 (stable across runs and machines)."""
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_of(doc_id: str, val_fraction: float) -> Split:
    """``"val"`` for about ``val_fraction`` of all ids, ``"train"`` for the rest."""
    return "val" if hash_unit(doc_id) < val_fraction else "train"


def _check_fractions(val_fraction: float, test_fraction: float) -> None:
    if val_fraction < 0 or test_fraction < 0 or val_fraction + test_fraction > 1:
        raise ValueError(
            f"need 0 <= val_fraction, test_fraction and val + test <= 1; got {val_fraction}, {test_fraction}"
        )


def assign_split(doc_id: str, val_fraction: float, test_fraction: float = 0.0) -> SplitName:
    """``"val"`` if ``u < val``, ``"test"`` if ``u < val + test``, else ``"train"`` (``u = hash_unit(id)``).

    With ``test_fraction=0`` this agrees with :func:`split_of`. Val is the lowest band of ``u``, so
    raising ``test_fraction`` later only moves train documents into test, never val ones.
    """
    _check_fractions(val_fraction, test_fraction)
    u = hash_unit(doc_id)
    if u < val_fraction:
        return "val"
    if u < val_fraction + test_fraction:
        return "test"
    return "train"


def split_batch(
    batch: Mapping[str, Sequence[Any]], val_fraction: float, test_fraction: float = 0.0,
    fixed: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Add a ``"split"`` column (list of "train"/"val"/"test") computed from the ``"id"`` column;
    documents of a source named in ``fixed`` (needs a ``"source"`` column) all go to its split.

    ``map_batches`` style: columns may be lists or numpy arrays; the others are returned unchanged.
    """
    if "id" not in batch:
        raise KeyError(f"split_batch needs an 'id' column; got {sorted(batch)}")
    _check_fractions(val_fraction, test_fraction)
    ids = batch["id"]
    ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
    out = dict(batch)
    out["split"] = [assign_split(i, val_fraction, test_fraction) for i in ids]
    if fixed:
        sources = batch["source"]
        out["split"] = [fixed.get(str(src), split) for src, split in zip(sources, out["split"], strict=True)]
    return out


def mixing_copies(doc_id: str, split: str, weight: float) -> int:
    """How many times a document goes into the shards under its source's mixing ``weight``.

    Only the train split is re-weighted (val and test stay one copy each, so evaluation is unbiased):
    ``floor(weight)`` copies, plus one more for a hash-chosen ``weight - floor(weight)`` share of the
    documents. So weight 2 doubles a source, 0.25 keeps a stable quarter of it, and a document's count
    never changes when other documents are added. The hash is independent of the split's.
    """
    if weight <= 0:
        raise ValueError(f"mixing weight must be > 0, got {weight}")
    if split != "train":
        return 1
    whole = int(weight)
    return whole + (hash_unit(f"mix:{doc_id}") < weight - whole)
