"""Global deduplication: exact (hash of the cleaned text) and near (MinHash + LSH banding).

Pure part (numpy, no Ray): word-shingle hashes, MinHash signatures, LSH band keys, estimated
Jaccard, union-find clusters. Ray part (``exact_dedup``, ``near_dedup``) runs them over a Ray
Dataset with columns ``id``, ``text``, ``hash`` (+ any others, kept as they are):

  exact: a distributed ``groupby("hash")`` count; only duplicated hashes (with the smallest id,
         the one kept) come back to the driver, never the set of all hashes.
  near:  signatures in ``map_batches`` → one row per (band key, id) → ``groupby(band key)``
         count → rows of shared buckets (few) become candidate pairs → the driver verifies them
         against their signatures (estimated Jaccard ≥ threshold), clusters them with union-find
         and keeps the smallest id of each cluster.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import Any

import numpy as np

from lm.config import DedupConfig

MERSENNE = np.uint64((1 << 61) - 1)
MASK32 = np.uint64(0xFFFFFFFF)
_CHUNK = 4096  # shingles per vectorised step (bounds memory for very long documents)
_MAX_ALL_PAIRS = 32  # buckets up to this size emit every pair; larger ones a star around the min id


def _word_hashes(words: list[str]) -> np.ndarray:
    cache: dict[str, int] = {}
    out = np.empty(len(words), dtype=np.uint64)
    for i, word in enumerate(words):
        h = cache.get(word)
        if h is None:
            h = cache[word] = int.from_bytes(hashlib.blake2b(word.encode(), digest_size=8).digest(), "little")
        out[i] = h
    return out


def shingles(text: str, n: int) -> np.ndarray:
    """Unique 64-bit hashes of the lower-cased word n-grams (a short text is one shingle)."""
    words = text.lower().split()
    if not words:
        return np.zeros(1, dtype=np.uint64)
    w = _word_hashes(words)
    n = min(n, len(w))
    count = len(w) - n + 1
    h = np.zeros(count, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j in range(n):  # polynomial combination, wrapping mod 2^64 (order-sensitive)
            h = h * np.uint64(1_000_003) + w[j : j + count]
    return np.unique(h)


def permutations(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The (a, b) of the universal hashes (a·x + b) mod (2^61 − 1); a, b < 2^31 so nothing overflows."""
    rng = np.random.default_rng(seed)
    a = rng.integers(1, 1 << 31, size=num_perm, dtype=np.uint64)
    b = rng.integers(0, 1 << 31, size=num_perm, dtype=np.uint64)
    return a, b


def minhash_signature(text: str, num_perm: int, shingle: int, seed: int, perms=None) -> np.ndarray:
    """MinHash signature (uint32[num_perm]) of the text's word shingles."""
    a, b = perms if perms is not None else permutations(num_perm, seed)
    x = shingles(text, shingle) & MASK32
    sig = np.full(num_perm, MASK32, dtype=np.uint64)
    for i in range(0, len(x), _CHUNK):
        hashed = ((x[i : i + _CHUNK, None] * a[None, :] + b[None, :]) % MERSENNE) & MASK32
        np.minimum(sig, hashed.min(axis=0), out=sig)
    return sig.astype(np.uint32)


def minhash_batch(texts: Iterable[str], cfg: DedupConfig) -> np.ndarray:
    perms = permutations(cfg.num_perm, cfg.seed)
    rows = [minhash_signature(str(t), cfg.num_perm, cfg.shingle, cfg.seed, perms) for t in texts]
    return np.stack(rows) if rows else np.zeros((0, cfg.num_perm), dtype=np.uint32)


def band_keys(signature: np.ndarray, bands: int) -> list[str]:
    """One bucket key per band: documents sharing any key are near-duplicate candidates."""
    rows = len(signature) // bands
    return [f"{i}:{hashlib.blake2b(signature[i * rows:(i + 1) * rows].tobytes(), digest_size=12).hexdigest()}"
            for i in range(bands)]


def estimated_jaccard(sig_a: np.ndarray, sig_b: np.ndarray) -> float:
    return float(np.mean(sig_a == sig_b))


def connected_components(pairs: Iterable[tuple[str, str]]) -> dict[str, str]:
    """id → representative (the smallest id of its cluster), for every id that appears in a pair."""
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in pairs:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    return {x: find(x) for x in list(parent)}


# -------------------------------------------------------------------------------------- Ray side


def exact_dedup(ds, num_partitions: int | None = None):
    """Keep one document per ``hash`` (the smallest id); returns (dataset, number dropped).

    A distributed ``groupby("hash")`` counts every hash; only the duplicated hashes (with the id
    to keep) come back to the driver, and a filter drops the other copies.
    """
    from ray.data.aggregate import Count, Min

    counts = ds.select_columns(["hash", "id"]).groupby("hash", num_partitions=num_partitions)
    dups = counts.aggregate(Count(), Min("id")).filter(lambda r: r["count()"] > 1).take_all()
    if not dups:
        return ds, 0
    keep = {r["hash"]: r["min(id)"] for r in dups}
    dropped = sum(r["count()"] - 1 for r in dups)
    return ds.filter(lambda r: r["hash"] not in keep or r["id"] == keep[r["hash"]]).materialize(), dropped


def _signature_rows(batch: dict[str, np.ndarray], cfg: DedupConfig) -> dict[str, Any]:
    sigs = minhash_batch(batch["text"], cfg)
    return {"id": np.asarray(batch["id"]), "sig": sigs}


def _band_rows(batch: dict[str, np.ndarray], bands: int) -> dict[str, Any]:
    keys, ids = [], []
    for doc_id, sig in zip(batch["id"], batch["sig"], strict=True):
        for key in band_keys(np.asarray(sig, dtype=np.uint32), bands):
            keys.append(key)
            ids.append(str(doc_id))
    return {"band_key": keys, "id": ids}


def bucket_pairs(ids: list[str]) -> list[tuple[str, str]]:
    """Candidate pairs of one LSH bucket: every pair when small, else a star around the smallest id."""
    ids = sorted(set(ids))
    if len(ids) <= _MAX_ALL_PAIRS:
        return [(x, y) for i, x in enumerate(ids) for y in ids[i + 1 :]]
    return [(ids[0], y) for y in ids[1:]]


def near_dedup(ds, cfg: DedupConfig, num_partitions: int | None = None):
    """Drop near-duplicates (estimated Jaccard ≥ cfg.threshold), keeping the smallest id per cluster.

    Returns ``(deduplicated dataset, number of documents dropped)``.
    """
    from ray.data.aggregate import Count

    sigs = ds.select_columns(["id", "text"]).map_batches(
        _signature_rows, fn_kwargs={"cfg": cfg}, batch_format="numpy", batch_size=256
    ).materialize()
    bands = sigs.map_batches(_band_rows, fn_kwargs={"bands": cfg.bands}, batch_format="numpy").materialize()
    shared = bands.groupby("band_key", num_partitions=num_partitions).aggregate(Count())
    shared_keys = {r["band_key"] for r in shared.filter(lambda r: r["count()"] > 1).take_all()}
    if not shared_keys:
        return ds, 0
    buckets: dict[str, list[str]] = {}
    for r in bands.filter(lambda r: r["band_key"] in shared_keys).take_all():
        buckets.setdefault(r["band_key"], []).append(str(r["id"]))
    pairs = {p for ids in buckets.values() for p in bucket_pairs(ids)}
    wanted = {x for p in pairs for x in p}
    signature = {str(r["id"]): np.asarray(r["sig"]) for r in sigs.filter(lambda r: r["id"] in wanted).take_all()}
    verified = [(a, b) for a, b in sorted(pairs) if estimated_jaccard(signature[a], signature[b]) >= cfg.threshold]
    drop = {doc for doc, rep in connected_components(verified).items() if doc != rep}
    if not drop:
        return ds, 0
    return ds.filter(lambda r: r["id"] not in drop).materialize(), len(drop)
