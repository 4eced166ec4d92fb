"""Decontamination (``data.decontaminate``): train documents that share a word n-gram (13 words by default)
with a held-out or evaluation text are dropped (reason ``contaminated``). N-grams are compared as 64-bit
hashes of their lower-cased words (punctuation ignored), so a whole held-out set is one sorted uint64 array:
8 bytes per n-gram, ~0.8 GB for 100 M words of held-out text.

    grams = ngram_hashes("the held-out text ...", 13)                  # uint64, one per n-gram (unsorted)
    table = NgramTable.of([grams, ...])                                 # sorted, unique
    table.contains_any(ngram_hashes(train_text, 13))                    # True: contaminated

The Ray half (lm.data.pipeline): :func:`ngram_rows` over the held-out splits (map_batches), the hashes
gathered on the driver with those of the eval sets' texts (:func:`source_texts`), then :func:`mark_contaminated`
over every document, fused into the pass that writes them (lm.data.steps.Scratch ``keep``). No Ray import.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

from lm.data.manifest import Decontamination

CONTAMINATED = "contaminated"
_WORD = re.compile(r"\w+")
_MULT = np.uint64(0x100000001B3)  # FNV-64 prime: the polynomial rolling combination of word hashes


def _word_hash(word: str) -> int:
    return int.from_bytes(hashlib.blake2b(word.encode("utf-8"), digest_size=8).digest(), "little")


def ngram_hashes(text: str, n: int) -> np.ndarray:
    """A uint64 hash of every word n-gram of ``text`` (words: ``\\w+`` runs, lower-cased); empty when ``text``
    has fewer than ``n`` words. Stable across processes and runs (no Python ``hash``)."""
    words = _WORD.findall(text.lower())
    count = len(words) - n + 1
    if count <= 0:
        return np.empty(0, dtype=np.uint64)
    hashes = {w: _word_hash(w) for w in set(words)}
    wh = np.fromiter((hashes[w] for w in words), dtype=np.uint64, count=len(words))
    acc = np.zeros(count, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j in range(n):
            acc = acc * _MULT + wh[j:j + count]
    return acc


class NgramTable:
    """A sorted set of n-gram hashes, what training documents are checked against."""

    def __init__(self, hashes: np.ndarray, n: int):
        self.hashes, self.n = np.unique(np.asarray(hashes, dtype=np.uint64)), n

    @classmethod
    def of(cls, parts: Iterable[np.ndarray], n: int) -> NgramTable:
        arrays = [np.asarray(p, dtype=np.uint64) for p in parts]
        return cls(np.concatenate(arrays) if arrays else np.empty(0, dtype=np.uint64), n)

    def __len__(self) -> int:
        return len(self.hashes)

    def contains_any(self, grams: np.ndarray) -> bool:
        """Whether any of ``grams`` is in the table."""
        if not len(grams) or not len(self.hashes):
            return False
        idx = np.searchsorted(self.hashes, grams)
        idx[idx == len(self.hashes)] = 0
        return bool((self.hashes[idx] == grams).any())

    def contaminated(self, text: str) -> bool:
        return self.contains_any(ngram_hashes(text, self.n))


def ngram_rows(batch: dict[str, Any], n: int) -> dict[str, np.ndarray]:
    """map_batches UDF: the distinct n-gram hashes of a batch's texts, one row each (column ``h``)."""
    parts = [ngram_hashes(str(t), n) for t in batch["text"]]
    return {"h": np.unique(np.concatenate(parts)) if parts else np.empty(0, dtype=np.uint64)}


def mark_contaminated(batch: Any, table: NgramTable, reason_column: str = "reason") -> Any:
    """map_batches UDF (pyarrow): a ``reason`` column, ``contaminated`` for train rows sharing an n-gram with
    ``table``, ``""`` for every other row."""
    import pyarrow as pa

    reasons = [CONTAMINATED if split == "train" and table.contaminated(str(text)) else ""
               for text, split in zip(batch.column("text").to_pylist(), batch.column("split").to_pylist(), strict=True)]
    return batch.append_column(reason_column, pa.array(reasons, type=pa.string()))


def gather(ds: Any, batch_rows: int = 1 << 20) -> Iterator[np.ndarray]:
    """The ``h`` column of a dataset of :func:`ngram_rows`, as arrays on the driver (what the table is made of)."""
    for batch in ds.iter_batches(batch_size=batch_rows, batch_format="numpy"):
        yield np.asarray(batch["h"], dtype=np.uint64)


def shard_grams(store, shards: list[str], tokenizer, n: int) -> Iterator[np.ndarray]:
    """The n-gram hashes of each document of packed ``shards`` (URIs; decoded with ``tokenizer``, one row group
    at a time): what an increment of a corpus (lm.continual) is decontaminated against, the corpus's held-out
    texts no longer being there as text."""
    from lm.data.pack import unpack_documents
    from lm.data.stream import ParquetSplit

    for uri in shards:
        shard = ParquetSplit.of_uris([uri], store.pyarrow_filesystem)
        blocks = (shard.read(i)[0] for i in range(len(shard.unit_rows)))
        for tokens in unpack_documents(blocks, tokenizer.eos_id):
            yield ngram_hashes(tokenizer.decode(tokens.tolist()), n)


def source_texts(store, sources: list, clean) -> Iterator[str]:
    """The cleaned documents of text ``sources`` (lm.config.SourceConfig: eval sets, benchmarks), read in this
    process like data.sources."""
    from lm.config import DataConfig
    from lm.data.clean import clean_text
    from lm.data.sources import plan_files, read_file_task

    data = DataConfig(sources=sources, clean=clean)
    for task in plan_files(store, data):
        for row in read_file_task(task, filesystem_factory=store.pyarrow_filesystem, clean=clean,
                                  max_file_bytes=int(data.max_file_mb * 2**20)):
            if not row["reason"]:
                text, reason = clean_text(row["text"], clean)
                if not reason:
                    yield text


def eval_sources(cfg) -> list:
    """The text sources of eval.sets (those with a uri) as lm.config.SourceConfig named ``eval-<name>``, when
    data.decontaminate and its eval_sets are on."""
    from lm.config import SourceConfig

    dc = cfg.data.decontaminate
    if not (dc.enabled and dc.eval_sets):
        return []
    return [SourceConfig(name=f"eval-{s.name}", uri=s.uri, format=s.format, delimiter=s.delimiter,
                         text_field=s.text_field) for s in cfg.eval.sets if s.uri]


def _source_grams(cfg, store) -> tuple[list[np.ndarray], list[str], list[str]]:
    """The n-gram hashes of the eval sets' texts and of data.decontaminate.sources, the names of those read,
    and of the eval sets that could not be (missing or empty: they may not exist yet; noted, not fatal)."""
    from lm.data.sources import DataError
    from lm.storage import StorageError

    dc, parts, used, skipped = cfg.data.decontaminate, [], [], []
    for source in eval_sources(cfg):
        try:
            parts += [ngram_hashes(t, dc.ngram) for t in source_texts(store, [source], cfg.data.clean)]
            used.append(source.name)
        except (DataError, StorageError):
            skipped.append(source.name)
    if dc.sources:  # named for decontamination: an error stops the run
        parts += [ngram_hashes(t, dc.ngram) for t in source_texts(store, list(dc.sources), cfg.data.clean)]
        used += [s.name for s in dc.sources]
    return parts, used, skipped


def decontaminate(cfg, store, docs: Any, held_out: dict[str, Iterable[np.ndarray]] | None = None
                  ) -> tuple[Any, Decontamination | None]:
    """``docs`` (columns text, split, …) with a ``reason`` column marking contaminated train documents
    (:func:`mark_contaminated`; lazily: the caller's next pass computes it) when there is something to check
    against, and what that was (the manifest's entry, ``dropped`` left for the caller to count); ``docs``
    unchanged and None when data.decontaminate is off. Reads the held-out splits of ``docs`` once (their
    n-gram hashes come to the driver) and the other texts here; ``held_out``: more n-gram hashes by name
    (an existing corpus's held-out splits, :func:`shard_grams`)."""
    from lm.data.tables import filter_in

    dc = cfg.data.decontaminate
    if not dc.enabled:
        return docs, None
    parts: list[np.ndarray] = []
    if dc.splits:
        held = filter_in(docs, "split", list(dc.splits)).select_columns(["text"])
        parts += gather(held.map_batches(ngram_rows, fn_kwargs={"n": dc.ngram}, batch_format="numpy",
                                         batch_size=1024))
    more, used, skipped = _source_grams(cfg, store)
    for name, grams in (held_out or {}).items():
        more += list(grams)
        used.append(name)
    table = NgramTable.of(parts + more, dc.ngram)
    info = Decontamination(ngram=dc.ngram, against=[*dc.splits, *used], ngrams=len(table), skipped=skipped)
    if not len(table):
        return docs, info
    return docs.map_batches(mark_contaminated, fn_kwargs={"table": table}, batch_format="pyarrow"), info
