"""Global deduplication of documents: exact (same hash of the cleaned text) and near (MinHash + LSH).

Owns all dedup logic: the pure numpy maths (word-shingle hashes, MinHash signatures, LSH band keys,
estimated Jaccard, verification of one LSH bucket, union-find clusters) and the two Ray Data steps
over rows with ``id`` (str, unique, stable), ``text`` and ``hash``; every other column is carried
through untouched. Ray is imported inside functions only.

  exact_dedup(ds)       groupby(hash prefix).map_groups: one row per hash, the one with the smallest id.
  near_dedup(ds, cfg)   map_batches: (id, signature) rows → one (band_key, id) row per doc and band;
                        groupby(band-key prefix).map_groups: the buckets of 2+ equal band_keys; driver:
                        gets the signatures of those (few) candidates (recomputed by a filtered pass
                        over ``ds``: no signature of the whole corpus is kept), verifies each bucket
                        (estimated Jaccard ≥ cfg.threshold) → edges, union-find, and every cluster
                        member but the smallest id is dropped.

Memory: the groupbys' partitions are the only global state; Ray Data keeps their shuffle blocks in the
object store (spilled to disk when it is full). What reaches the driver is bounded by duplicates (the
candidate buckets, the ids dropped), never by the corpus.

Callers count exact drops themselves (``ds.count()`` before and after); ``near_dedup`` returns its
count. Ids compare as Python strings (lexicographic), so the representative is deterministic.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from functools import lru_cache
from itertools import chain
from typing import Any

import numpy as np

from lm.config import DedupConfig
from lm.data.tables import filter_in

MASK32 = np.uint64(0xFFFFFFFF)
_CHUNK = 2048  # shingles per vectorised step: (num_perm x 2048) uint64 = 2 MiB at num_perm=128 (cache-sized)
_RUN_CHARS = 4_000_000  # text per vectorised shingling run (≈ 60 MiB of word arrays at most)
_ALL_PAIRS = 256  # buckets up to this size are verified all-pairs; larger ones greedily (see bucket_edges)


def _fmix64(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 64-bit finaliser (a bijection that spreads every input bit), wrapping mod 2^64."""
    for mult in (0xFF51AFD7ED558CCD, 0xC4CEB9FE1A85EC53):
        h = (h ^ (h >> np.uint64(33))) * np.uint64(mult)
    return h ^ (h >> np.uint64(33))


def _shingle_hashes(texts: Iterable[str], n: int) -> tuple[np.ndarray, np.ndarray]:
    """Shingle sets of many texts, vectorised over the batch: (x, offsets), doc i's sorted unique hashes
    being x[offsets[i]:offsets[i+1]]. Each word starts a window of min(n, words in its doc) words."""
    docs = [str(t).lower().split() or [""] for t in texts]
    if not docs:
        return np.zeros(0, dtype=np.uint64), np.zeros(1, dtype=np.int64)
    vocab = {word: i for i, word in enumerate({w for d in docs for w in d})}
    digests = b"".join(hashlib.blake2b(w.encode("utf-8", "surrogatepass"), digest_size=8).digest() for w in vocab)
    table = np.frombuffer(digests, dtype="<u8").astype(np.uint64)
    lens = np.fromiter(map(len, docs), dtype=np.int64, count=len(docs))
    total = int(lens.sum())
    w = table[np.fromiter(map(vocab.__getitem__, chain.from_iterable(docs)), dtype=np.int64, count=total)]
    pos_doc = np.repeat(np.arange(len(docs)), lens)
    width = np.minimum(max(n, 1), lens)[pos_doc]  # words per window at each position
    valid = np.arange(total) - (np.cumsum(lens) - lens)[pos_doc] <= (lens[pos_doc] - width)
    wpad = np.concatenate([w, np.zeros(max(n, 1), dtype=np.uint64)])
    h = np.zeros(total, dtype=np.uint64)
    for j in range(max(n, 1)):  # order-sensitive combination of the window's word hashes
        step = _fmix64(h * np.uint64(0x100000001B3) + wpad[j : j + total])
        h = step if j < width.min() else np.where(j < width, step, h)
    keys = np.sort((pos_doc[valid].astype(np.uint64) << np.uint64(32)) | (h[valid] >> np.uint64(32)))
    keys = keys[np.concatenate([[True], keys[1:] != keys[:-1]])]  # unique (np.unique hashes: slower)
    offsets = np.searchsorted(keys >> np.uint64(32), np.arange(len(docs) + 1, dtype=np.uint64))
    return keys & MASK32, offsets


def shingles(text: str, n: int) -> np.ndarray:
    """Sorted unique 32-bit hashes (as uint64) of the word n-grams of ``text`` (words: ``text.lower().split()``);
    fewer than ``n`` words (the empty text too) make one shingle of all of them. Stable across processes
    and platforms: BLAKE2b per word, then a fixed mixing (never Python's salted ``hash``)."""
    return _shingle_hashes([text], n)[0]


@lru_cache(maxsize=16)
def permutations(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(a, b) of the multiply-add-shift hashes h_i(x) = ((a_i·x + b_i) mod 2^64) >> 32 (Dietzfelbinger:
    strongly universal for 32-bit x), derived from the seed by BLAKE2b; a is odd, both are 64-bit."""
    raw = [hashlib.blake2b(f"lmforge-minhash:{seed}:{i}".encode(), digest_size=16).digest() for i in range(num_perm)]
    ab = np.frombuffer(b"".join(raw), dtype="<u8").astype(np.uint64).reshape(num_perm, 2)
    a, b = ab[:, 0] | np.uint64(1), ab[:, 1].copy()
    a.flags.writeable = b.flags.writeable = False
    return a, b


def _signatures(x: np.ndarray, offsets: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """MinHash of many shingle sets: docs are packed into chunks of ≤ _CHUNK shingles, each chunk hashed
    into (num_perm, chunk) buffers allocated once, then min-reduced per document with reduceat."""
    n, num_perm = len(offsets) - 1, len(a)
    out = np.empty((n, num_perm), dtype=np.uint32)
    buf = np.empty((num_perm, _CHUNK), dtype=np.uint64)

    def hashed(xs: np.ndarray) -> np.ndarray:  # ((a·x + b) mod 2^64) >> 32: three vector passes
        h = buf[:, : len(xs)]
        np.multiply(a[:, None], xs[None, :], out=h)  # uint64 arithmetic wraps mod 2^64
        h += b[:, None]
        h >>= np.uint64(32)
        return h

    i = 0
    while i < n:
        j = max(i + 1, int(np.searchsorted(offsets, offsets[i] + _CHUNK, side="right")) - 1)
        lo, hi = int(offsets[i]), int(offsets[j])
        if hi - lo > _CHUNK:  # one long document: fold its shingles chunk by chunk
            sig = np.full(num_perm, MASK32, dtype=np.uint64)
            for k in range(lo, hi, _CHUNK):
                np.minimum(sig, hashed(x[k : min(k + _CHUNK, hi)]).min(axis=1), out=sig)
            out[i] = sig
        else:
            out[i:j] = np.minimum.reduceat(hashed(x[lo:hi]), offsets[i:j] - lo, axis=1).T
        i = j
    return out


def minhash_signature(text: str, num_perm: int, shingle: int, seed: int) -> np.ndarray:
    """MinHash signature, uint32[num_perm], of the text's word ``shingle``-grams."""
    return _signatures(*_shingle_hashes([text], shingle), *permutations(num_perm, seed))[0]


def minhash_batch(texts: Iterable[str], cfg: DedupConfig) -> np.ndarray:
    """Signatures of many texts, uint32[n, cfg.num_perm] (row i == minhash_signature(texts[i], ...)),
    computed in runs of ≤ _RUN_CHARS characters so that memory stays bounded for long documents."""
    texts, perms, runs, start, size = [str(t) for t in texts], permutations(cfg.num_perm, cfg.seed), [], 0, 0
    for i, text in enumerate(texts):
        size += len(text)
        if size > _RUN_CHARS or i == len(texts) - 1:
            runs.append(_signatures(*_shingle_hashes(texts[start : i + 1], cfg.shingle), *perms))
            start, size = i + 1, 0
    return np.concatenate(runs) if runs else np.zeros((0, cfg.num_perm), dtype=np.uint32)


def band_keys(signatures: np.ndarray, bands: int) -> np.ndarray:
    """LSH bucket keys, uint64[n, bands] ([1, bands] for one signature): key (i, j) hashes band j's rows
    of doc i's signature and j itself (equal rows in different bands never share a bucket). Docs sharing
    a key are candidates; a 64-bit collision only adds a candidate that verification rejects."""
    sig = np.atleast_2d(np.asarray(signatures)).astype(np.uint64)
    n, num_perm = sig.shape
    if bands < 1 or num_perm % bands:
        raise ValueError(f"signature length {num_perm} is not divisible by bands={bands}")
    v = sig.reshape(n, bands, num_perm // bands)
    h = np.broadcast_to(_fmix64(np.arange(1, bands + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)),
                        (n, bands))
    for r in range(v.shape[2]):
        h = _fmix64(h * np.uint64(0x100000001B3) + v[:, :, r])
    return h


def estimated_jaccard(sig_a: np.ndarray, sig_b: np.ndarray) -> float | np.ndarray:
    """Share of equal positions (along the last axis): float for two signatures, array for stacks."""
    equal = np.asarray(sig_a) == np.asarray(sig_b)
    est = np.count_nonzero(equal, axis=-1) / equal.shape[-1]
    return float(est) if np.ndim(est) == 0 else est


def connected_components(pairs: Iterable[tuple[str, str]]) -> dict[str, str]:
    """Union-find over the pairs: id → representative (the smallest id of its cluster), for every id seen."""
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]  # path halving
            x = parent[x]
        return x

    for a, b in pairs:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)  # the root is always the smallest id of its cluster
    return {x: find(x) for x in list(parent)}


def bucket_edges(ids: Sequence[str], sigs: np.ndarray, threshold: float) -> list[tuple[str, str]]:
    """Verified edges of one LSH bucket: (representative, member) with estimated Jaccard ≥ threshold.

    Up to ``_ALL_PAIRS`` members every pair is checked and each cluster comes back as a star around its
    smallest id (same components as all verified pairs, fewer edges). Larger buckets (boilerplate) are
    clustered greedily — the smallest unassigned id takes every remaining member similar to it — in
    O(k · clusters) instead of O(k²); those edges are a verified subset."""
    order = sorted(range(len(ids)), key=lambda i: str(ids[i]))
    names = [str(ids[i]) for i in order]
    s = np.asarray(sigs)[order]
    if len(names) <= _ALL_PAIRS:
        similar = estimated_jaccard(s[:, None, :], s[None, :, :]) >= threshold
        rows, cols = np.nonzero(np.triu(similar, 1))
        reps = connected_components((names[r], names[c]) for r, c in zip(rows, cols, strict=True))
        return sorted((rep, x) for x, rep in reps.items() if x != rep)
    edges, left = [], np.arange(len(names))
    while len(left) > 1:
        near = estimated_jaccard(s[left[0]][None, :], s[left[1:]]) >= threshold
        edges += [(names[left[0]], names[k]) for k in left[1:][near]]
        left = left[1:][~near]
    return edges


# ----------------------------------------------------------------------------------------- Ray side
# Ray 2.60's map_groups costs ~15 µs per group plus ~0.1 ms per output column per group: one group per
# hash or band key would take seconds per 10^4 documents. So groups are coarse (the hash's first
# _HASH_CHARS hex digits, a band key's top _KEY_BITS bits: 4096 each) and split exactly inside the UDF.
_HASH_CHARS, _KEY_BITS, _GROUP = 3, 12, "_dedup_group"


def _with_hash_group(batch: Any) -> Any:
    import pyarrow.compute as pc

    return batch.append_column(_GROUP, pc.utf8_slice_codeunits(batch.column("hash"), 0, _HASH_CHARS))


def _keep_smallest_ids(group: Any) -> Any:
    """map_groups UDF: per distinct ``hash`` in the group, the row with the smallest id."""
    import pyarrow as pa

    table = group.drop_columns([_GROUP])
    hashes = table.column("hash").to_pylist()
    if len(set(hashes)) == len(hashes):  # the common case: nothing to drop, no sort
        return table
    ids = table.column("id").to_pylist()
    keep: dict[str, int] = {}
    for i, (h, doc) in enumerate(zip(hashes, ids, strict=True)):
        if h not in keep or doc < ids[keep[h]]:
            keep[h] = i
    return table.take(pa.array(sorted(keep.values()), type=pa.int64()))


def exact_dedup(ds: Any, num_partitions: int | None = None) -> Any:
    """Keep one document per ``hash`` — the one with the smallest id — with a distributed
    ``groupby(hash prefix).map_groups``; no set of hashes reaches the driver. Any string hash works; a hex
    digest (lm.data.clean.text_hash) spreads evenly. Returns the lazy result, rows grouped by hash (not in
    input order); callers count drops themselves (``ds.count()`` before and after; the pipeline writes the
    result to Parquet first, as it reads it again). ``num_partitions``: shuffle partitions of the hash
    shuffle (None: Ray's default; the sort shuffle makes one per input block instead)."""
    grouped = ds.map_batches(_with_hash_group, batch_format="pyarrow", zero_copy_batch=True)
    return grouped.groupby(_GROUP, num_partitions=num_partitions).map_groups(_keep_smallest_ids, batch_format="pyarrow")


def _signature_rows(batch: dict[str, np.ndarray], cfg: DedupConfig) -> Any:
    """map_batches UDF: (id, text) → (id, sig) with sig a fixed-size list of cfg.num_perm uint32."""
    import pyarrow as pa

    sigs = minhash_batch(batch["text"], cfg)
    flat = pa.array(sigs.reshape(-1), type=pa.uint32())
    return pa.table({"id": pa.array(np.asarray(batch["id"]).astype(str)),
                     "sig": pa.FixedSizeListArray.from_arrays(flat, cfg.num_perm)})


def _band_rows(batch: Any, bands: int) -> Any:
    """map_batches UDF (pyarrow): (id, sig) → one (group, band_key, id) row per doc and band. Signatures
    stay out of the shuffle (16x smaller): only buckets of 2+ ids come back, and only they are verified."""
    import pyarrow as pa

    sigs = batch.column("sig").combine_chunks().flatten().to_numpy().reshape(batch.num_rows, -1)
    keys = band_keys(sigs, bands).reshape(-1)
    ids = pa.array(np.repeat(np.asarray(batch.column("id").to_pylist(), dtype=object), bands), type=pa.string())
    return pa.table({_GROUP: (keys >> np.uint64(64 - _KEY_BITS)).astype(np.int32), "band_key": keys, "id": ids})


def _candidate_buckets(group: Any) -> Iterable[dict[str, Any]]:
    """map_groups UDF: the ids of every LSH bucket (equal band_key) of 2+ docs, one list per bucket."""
    import pyarrow as pa

    keys = group.column("band_key").to_numpy()
    order = np.argsort(keys, kind="stable")
    starts = np.flatnonzero(np.concatenate([[True], keys[order][1:] != keys[order][:-1]]))
    sizes = np.diff(np.append(starts, len(keys)))
    if not np.any(sizes > 1):
        return
    ids = np.asarray(group.column("id").to_pylist(), dtype=object)
    members = [sorted(ids[order[start : start + size]].tolist())
               for start, size in zip(starts[sizes > 1], sizes[sizes > 1], strict=True)]
    yield pa.table({"members": pa.array(members, type=pa.list_(pa.string()))})


def near_dedup(ds: Any, cfg: DedupConfig, num_partitions: int | None = None) -> tuple[Any, int]:
    """Drop near-duplicates (estimated Jaccard of the MinHash signatures ≥ cfg.threshold), keeping the
    smallest id of each cluster (clusters are transitive: a~b and b~c put a, b, c together).

    Returns ``(dataset, number of documents dropped)``. With no similar pair the input dataset itself
    is returned, else a lazy filter of it. ``ds`` is read up to three times (signatures → LSH buckets;
    the candidates' signatures; the returned filter), streaming: pass a dataset that is cheap to read
    again (the pipeline's comes from Parquet), never a whole materialized corpus.
    ``num_partitions``: shuffle partitions of the band-key groupby.
    """
    def signatures(docs: Any) -> Any:
        return docs.select_columns(["id", "text"]).map_batches(
            _signature_rows, fn_kwargs={"cfg": cfg}, batch_format="numpy", batch_size=1024)

    rows = signatures(ds).map_batches(_band_rows, fn_kwargs={"bands": cfg.bands}, batch_format="pyarrow")
    # only buckets of 2+ documents come back: bounded by the near-duplicate candidates, not the corpus
    buckets = [list(r["members"]) for r in rows.groupby(_GROUP, num_partitions=num_partitions).map_groups(
        _candidate_buckets, batch_format="pyarrow").take_all()]
    if not buckets:
        return ds, 0
    candidates = sorted({x for b in buckets for x in b})
    # the candidates' signatures, recomputed (minhash_batch is row by row: the same values) rather than
    # keeping every document's signature from the first pass
    found = signatures(filter_in(ds, "id", candidates)).take_all()
    sig_of = {str(r["id"]): np.asarray(r["sig"], dtype=np.uint32) for r in found}
    edges = {e for b in buckets for e in bucket_edges(b, np.stack([sig_of[x] for x in b]), cfg.threshold)}
    drop = sorted(x for x, rep in connected_components(sorted(edges)).items() if x != rep)
    if not drop:
        return ds, 0
    return filter_in(ds, "id", drop, keep=False), len(drop)


# ------------------------------------------------------------------ dedup against an existing corpus

INDEX_KNOWN_EXACT, INDEX_KNOWN_NEAR = "duplicate_of_corpus", "near_duplicate_of_corpus"


def index_rows(batch: dict[str, np.ndarray], cfg: DedupConfig) -> Any:
    """map_batches UDF: (hash, text) → the corpus index's rows (hash, sig): the exact-dedup key and,
    when ``cfg.near``, the MinHash signature (an empty list otherwise)."""
    import pyarrow as pa

    hashes = pa.array(np.asarray(batch["hash"]).astype(str))
    if not cfg.near:
        return pa.table({"hash": hashes, "sig": pa.array([[] for _ in range(len(hashes))], type=pa.list_(pa.uint32()))})
    sigs = minhash_batch(batch["text"], cfg)
    offsets = pa.array(np.arange(0, sigs.size + 1, cfg.num_perm, dtype=np.int32))
    sig = pa.ListArray.from_arrays(offsets, pa.array(sigs.reshape(-1), type=pa.uint32()))
    return pa.table({"hash": hashes, "sig": sig})


class CorpusIndex:
    """What a corpus already holds, to deduplicate new documents against it (continual learning):
    the exact hashes of its documents and their MinHash signatures, bucketed by LSH band key.

        index = CorpusIndex.from_tables([pq.read_table(...) for each index file], cfg.data.dedup)
        ds.map_batches(mark_known, fn_kwargs={"index": index}, batch_format="numpy")   # adds column "known"
    """

    def __init__(self, hashes: Iterable[str], signatures: np.ndarray, cfg: DedupConfig):
        self.cfg, self.hashes = cfg, set(hashes)
        self.signatures = np.asarray(signatures, dtype=np.uint32).reshape(-1, cfg.num_perm)
        self.buckets: dict[int, list[int]] = {}
        if cfg.near and len(self.signatures):
            for i, keys in enumerate(band_keys(self.signatures, cfg.bands).tolist()):
                for key in keys:
                    self.buckets.setdefault(key, []).append(i)

    @classmethod
    def from_tables(cls, tables: Iterable[Any], cfg: DedupConfig) -> CorpusIndex:
        """From index tables (columns hash, sig) as :func:`index_rows` writes them; signatures of
        another length (another num_perm) are left out of near matching."""
        hashes: list[str] = []
        sigs: list[np.ndarray] = []
        for table in tables:
            hashes += table.column("hash").to_pylist()
            for sig in table.column("sig").to_pylist():
                if len(sig) == cfg.num_perm:
                    sigs.append(np.asarray(sig, dtype=np.uint32))
        return cls(hashes, np.stack(sigs) if sigs else np.zeros((0, cfg.num_perm), np.uint32), cfg)

    def __len__(self) -> int:
        return len(self.hashes)

    def known(self, hashes: Sequence[str], texts: Sequence[str]) -> list[str]:
        """Per document: "" (new), INDEX_KNOWN_EXACT (its hash is in the corpus) or INDEX_KNOWN_NEAR (an
        indexed document shares an LSH bucket with it at estimated Jaccard ≥ cfg.threshold)."""
        out = [INDEX_KNOWN_EXACT if h in self.hashes else "" for h in hashes]
        todo = [i for i, reason in enumerate(out) if not reason]
        if not (self.cfg.near and self.buckets and todo):
            return out
        sigs = minhash_batch([texts[i] for i in todo], self.cfg)
        for i, sig, keys in zip(todo, sigs, band_keys(sigs, self.cfg.bands).tolist(), strict=True):
            candidates = sorted({j for key in keys for j in self.buckets.get(key, ())})
            if candidates and np.max(estimated_jaccard(self.signatures[candidates], sig)) >= self.cfg.threshold:
                out[i] = INDEX_KNOWN_NEAR
        return out


def mark_known(batch: dict[str, np.ndarray], index: CorpusIndex) -> dict[str, np.ndarray]:
    """map_batches UDF: a ``known`` column (see :meth:`CorpusIndex.known`) beside (hash, text, …)."""
    out = dict(batch)
    out["known"] = np.asarray(index.known(np.asarray(batch["hash"]).astype(str).tolist(),
                                          [str(t) for t in batch["text"]]), dtype=object)
    return out
