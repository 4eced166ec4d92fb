"""The data pipeline on Ray Data: corpora in object storage → packed token shards + manifest.

    lm data prepare -c configs/shakespeare-cpu.yaml          (or jobs/prepare_data.py on a cluster)

Stages (each a Ray Data step over the pure functions in lm.data.*; the UDFs live in lm.data.steps):
  plan (driver: list files; errors before any work) → read (flat_map, through the storage layer's
  pyarrow filesystem; bad objects become skip rows) → clean + quality stack (map_batches: language,
  heuristic filters, PII redaction; lm.data.quality) → split (hash of the document id) → exact dedup
  (groupby on the text hash) → near dedup (MinHash + LSH) → decontamination (train documents sharing
  an n-gram with the held-out splits or eval sets; lm.data.decontam) → tokenizer trained
  on a seeded sample of the train split → tokenize (actor pool, tokenizer loaded once per actor) →
  pack + write Parquet shards (groupby on a hash bucket, so shard contents are deterministic) →
  ``manifest.json`` published last. With ``data.format: sft`` the records of prompt / response JSONL
  go through lm.data.sft's read, tokenize and write steps instead (loss mask on the response only).

Memory is bounded by configuration, not by the corpus: every stage streams. A stage read more than once
(the read rows, the exact-dedup result, the corpus-dedup marks, the documents left, the token rows) is
written as Parquet under ``tmp-<fingerprint>/`` and read back, never ``materialize()``d; blocks, and so
what one task holds, are bounded by ``data.block_mb`` and the groupbys' partitions sized by it (the sort
shuffle: one per block); shuffle blocks wait in Ray's object store, which spills to disk. The driver
sees counts, the skipped objects, the near-dedup candidates, one row per shard and the tokenizer's
bounded training sample, never the corpus. jobs/bench/data.py measures both (memory at 20 and 200 MB,
throughput against the same stages in one process).

Output under ``data.output`` (default ``<run>/data``): ``tokenizer.json``,
``shards-<fingerprint>/{train,val,test}-NNNNN.parquet`` (column ``tokens``: seq_len + 1 int32
each; SFT shards add ``loss_mask``), ``index-<fingerprint>/*.parquet`` (the corpus index: hash and
MinHash signature of every kept document, what lm.continual deduplicates new documents against) and
``manifest.json``. A re-run with the same inputs finds its manifest and does nothing. A fine-tuning
run (``train.init_from``) is tokenized with that model's tokenizer.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import time
from collections.abc import Iterable
from functools import partial
from typing import Any

import numpy as np

from lm.cluster import connect
from lm.config import Config, join_uri
from lm.config.base import absolute_paths
from lm.data.decontam import CONTAMINATED, decontaminate, eval_sources
from lm.data.dedup import (
    INDEX_KNOWN_EXACT,
    INDEX_KNOWN_NEAR,
    CorpusIndex,
    exact_dedup,
    index_rows,
    mark_known,
    near_dedup,
)
from lm.data.manifest import MANIFEST, DataManifest, Decontamination, parse_manifest
from lm.data.objects import source_objects
from lm.data.quality import COUNT_COLUMNS
from lm.data.sft import SFTTokenizeActor, manifest_entry, read_records, write_sft_shard
from lm.data.sources import OBJECT_REASONS, DataError, check_every_source_read, plan_files, read_file_task
from lm.data.steps import (
    Scratch,
    TokenizeActor,
    add_bucket,
    add_up,
    export_splits,
    hash_sample,
    read_and_clean,
    read_counts,
    write_shard,
)
from lm.data.summary import build_manifest, reason_totals
from lm.data.tables import filter_in
from lm.progress import Log, end_stages, stage
from lm.storage import ObjectStore, StorageError
from lm.tokenizer import BPETokenizer, train_tokenizer
from lm.uri import absolute_uri

logger = logging.getLogger("lmforge.data")  # → the run's log file (lm.logfile)

SCRATCH = "tmp"  # <data>/tmp-<fingerprint>/: the run's intermediate Parquet (lm.data.steps.Scratch)


_EXECUTION_ONLY = {"output", "tokenize_actors", "actor_cpus", "shuffle_partitions", "block_mb",
                   "shuffle_strategy"}


def settings_hash(cfg: Config) -> str:
    """Hash of the settings that shape the output (not where it goes nor how it is executed; local source
    paths as absolute paths)."""
    sft_only = {"format", "sft"} if cfg.data.format == "text" else set()  # text data keeps its earlier hash
    settings = {
        "data": absolute_paths(cfg.data).model_dump(mode="json", exclude=_EXECUTION_ONLY | sft_only),
        "tokenizer": cfg.tokenizer.model_dump(mode="json"),
        "seq_len": cfg.seq_len,
    }
    if against := [absolute_paths(s).model_dump(mode="json") for s in eval_sources(cfg)]:
        settings["decontaminate_eval_sets"] = against  # what the train split is decontaminated against
    blob = json.dumps(settings, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def inputs_fingerprint(cfg: Config, files: list[dict], extra: str = "") -> str:
    """Hash of everything that determines the output: the files (uri, size), the settings and ``extra``
    (a given tokenizer, a corpus index). Local files count by their absolute path, so a source spelled
    relative (``lm prepare``) and made absolute (Config.with_absolute_paths: ``lm train``) are the same
    inputs."""
    listed = [(absolute_uri(f["uri"]), f.get("size", -1)) for f in files]
    blob = json.dumps({"files": listed, "settings": settings_hash(cfg)})
    blob += extra
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _train_tokenizer(cfg: Config, docs, total: int) -> BPETokenizer:
    """Train on a seeded sample (≤ tokenizer.max_train_bytes) of the train split (``total`` bytes), in id order."""
    train = filter_in(docs, "split", ["train"])
    fraction = min(1.0, cfg.tokenizer.max_train_bytes / max(total, 1))
    # a hash of the id decides, not the block layout, so the same inputs always give the same sample
    seed = cfg.data.seed
    sample = train if fraction >= 1 else train.map_batches(
        hash_sample, fn_kwargs={"seed": seed, "fraction": fraction}, batch_format="pyarrow", zero_copy_batch=True)
    stage(f"data: training the tokenizer on {fraction:.0%} of {total / 1e6:.1f} MB of train text")
    # to the driver: a sample bounded by tokenizer.max_train_bytes (what the trainer holds anyway), not the corpus
    rows = sorted(sample.select_columns(["id", "text"]).take_all(), key=lambda r: r["id"])
    return train_tokenizer((str(r["text"]) for r in rows), cfg.tokenizer)


def init_tokenizer(store: ObjectStore, model_uri: str) -> BPETokenizer:
    """The tokenizer of the model ``train.init_from`` names: fine-tuning data must be tokenized with it."""
    uri = join_uri(model_uri, "tokenizer.json")
    if not store.exists(uri):
        is_model = store.exists(join_uri(model_uri, "config.json"))
        what = "has no tokenizer.json" if is_model else "is not a model directory"
        raise DataError(f"train.init_from={model_uri} {what}: the data of a fine-tuning run is tokenized with the "
                        "model's own tokenizer (train the model first, e.g. `lm run`, or point init_from at its "
                        "<run>/model)")
    return BPETokenizer.from_json(store.read_text(uri))


def prepare_data(cfg: Config, store: ObjectStore | None = None, log: Log = print, *,
                 tokenizer: BPETokenizer | None = None, known: CorpusIndex | None = None,
                 export_texts: tuple[str, ...] = (), only: set[str] | None = None,
                 held_out: dict[str, Iterable[np.ndarray]] | None = None) -> DataManifest:
    """Run the whole pipeline; return the manifest (published at ``<data>/manifest.json``).

    For an increment of an existing corpus (lm.continual): ``tokenizer`` is used instead of training
    one, documents ``known`` to the corpus (exact or near duplicates) are dropped and counted, and the
    cleaned documents of the ``export_texts`` splits are also written as ``<split>-texts.jsonl``; ``only``
    restricts the sources' files to these URIs (the objects an iteration claimed); ``held_out``: n-gram hashes
    by name to decontaminate against besides data.decontaminate's (the corpus's held-out splits). Without ``tokenizer``,
    a run that fine-tunes (``train.init_from``) uses that model's tokenizer; others train one."""
    start = time.perf_counter()
    store = store or ObjectStore(cfg.storage)
    if tokenizer is None and cfg.train.init_from:
        tokenizer = init_tokenizer(store, cfg.train.init_from)
    out = cfg.data_uri
    files = plan_files(store, cfg.data)  # raises before any work if a source is missing
    if only is not None:
        files = [f for f in files if f["uri"] in only]
        if not files:
            raise DataError(f"none of the {len(only)} given objects is a file of data.sources")
    extra = json.dumps([tokenizer.fingerprint() if tokenizer else None, len(known) if known else None,
                        sorted(export_texts), sorted(held_out or {})])
    fingerprint = inputs_fingerprint(cfg, files, extra)
    manifest_uri = join_uri(out, MANIFEST)
    if store.exists(manifest_uri):
        with contextlib.suppress(StorageError):  # another version's manifest: made again
            old = parse_manifest(store.read_text(manifest_uri), manifest_uri)
            if isinstance(old, DataManifest) and old.inputs_fingerprint == fingerprint:
                log(f"data: {manifest_uri} is up to date (inputs {fingerprint}); nothing to do")
                return old
    stage(f"data: {len(files)} files from {len(cfg.data.sources)} sources → {out}")
    ray = connect()
    context = ray.data.DataContext.get_current()  # datasets made below keep its settings
    previous = context.shuffle_strategy, context.target_max_block_size, context.op_resource_reservation_enabled
    # Ray Data reserves a share of the CPUs for each operator: on a small machine a stage's map tasks then
    # run one at a time (measured on 2 CPUs: near dedup 12.6 -> 9.0 s, the whole pipeline 63 -> 53 s)
    context.op_resource_reservation_enabled = False
    if cfg.data.shuffle_strategy == "sort":
        context.shuffle_strategy = ray.data.context.ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
    context.target_max_block_size = int(cfg.data.block_mb * 2**20)  # what one task holds (blocks, read-backs)
    try:
        manifest = _run_stages(cfg, store, files, fingerprint, tokenizer, known, export_texts, held_out)
    finally:
        end_stages()
        context.shuffle_strategy, context.target_max_block_size, context.op_resource_reservation_enabled = previous
        store.delete(join_uri(out, f"{SCRATCH}-{fingerprint}"))
    log(f"data: {manifest.summary_line()} → {manifest_uri} ({time.perf_counter() - start:.0f} s)")
    return manifest


class _StageClock:
    """Shows each stage done and how long it took (lm.progress.stage: the live status line, the log file)."""

    def __init__(self):
        self.last = time.perf_counter()

    def __call__(self, message: str) -> None:
        now = time.perf_counter()
        stage(f"data: {message} [{now - self.last:.1f} s]")
        self.last = now


_ROW_BYTES = 256  # the columns of a document row besides its text (id, uri, hash, ...), roughly
_BAND_ROW_BYTES = 48  # a near-dedup shuffle row (int32 group, uint64 band key, id), roughly


def _partitions(cfg: Config, n_bytes: float) -> int:
    """Partitions of a groupby over ``n_bytes``: enough that none holds more than data.block_mb (hash
    shuffle; the sort shuffle cuts one partition per input block whatever this says)."""
    return max(cfg.data.shuffle_partitions, math.ceil(n_bytes / (cfg.data.block_mb * 2**20)))


def _run_stages(cfg: Config, store: ObjectStore, files: list[dict], fingerprint: str,
                tokenizer: BPETokenizer | None, known: CorpusIndex | None, export_texts: tuple[str, ...],
                held_out: dict[str, Iterable[np.ndarray]] | None) -> DataManifest:
    done = _StageClock()
    out = cfg.data_uri
    scratch = Scratch(store, join_uri(out, f"{SCRATCH}-{fingerprint}"))
    sft = cfg.data.format == "sft"
    rows, skipped, reasons = _read(cfg, store, files, scratch)
    clean = [r for r in reasons if r["reason"] == ""]
    n_clean = sum(r["count()"] for r in clean)
    check_every_source_read(files, reasons, skipped)
    done(f"read and cleaned {n_clean} {'records' if sft else 'documents'} ({len(skipped)} objects skipped)")
    docs = filter_in(rows, "reason", [""]).drop_columns(["reason", "detail", *COUNT_COLUMNS])
    docs, removed = _dedup(cfg, docs, n_clean, sum(r["sum(n_bytes)"] for r in clean), scratch, known, done)
    docs, per_split, reasons, decontam = _write_docs(cfg, store, docs, scratch, reasons, removed, done, held_out)
    if n_clean == sum(removed.values()):
        raise DataError(f"no documents left after reading and filtering {len(files)} files "
                        f"(dropped: {reason_totals(reasons)}; duplicates: {removed['exact']} exact, "
                        f"{removed['near']} near, {removed[INDEX_KNOWN_EXACT] + removed[INDEX_KNOWN_NEAR]} of the "
                        f"existing corpus, {removed.get(CONTAMINATED, 0)} contaminated; skipped objects: "
                        f"{len(skipped)})")

    train_bytes = sum(r["sum(n_bytes)"] for r in per_split if r["split"] == "train")
    tok = tokenizer or _train_tokenizer(cfg, docs, train_bytes)
    store.publish_file(tok.to_json().encode(), join_uri(out, "tokenizer.json"))
    done(f"tokenizer {'given' if tokenizer else 'trained'} ({tok.vocab_size} tokens)")
    texts = export_splits(store, out, docs, export_texts)
    fs, index_path = store.pyarrow_filesystem(join_uri(out, f"index-{fingerprint}"))
    docs.select_columns(["hash", "text"]).map_batches(index_rows, fn_kwargs={"cfg": cfg.data.dedup},
                                                      batch_format="numpy").write_parquet(index_path, filesystem=fs)
    done("wrote the corpus index")
    tokens, per_source, reasons = _tokenize(cfg, scratch.read("docs", cfg.data.actor_cpus), tok, scratch, reasons)
    done(f"tokenized {sum(r['sum(n_tokens)'] for r in per_source):,} {'response ' if sft else ''}tokens")
    shards = _write_shards(cfg, store, tokens, per_source, tok, f"shards-{fingerprint}", out)
    done(f"packed and wrote {len(shards)} shards")

    manifest = build_manifest(cfg, fingerprint, settings_hash(cfg), files, tok, shards, per_source, reasons, skipped,
                              removed, texts, decontam, manifest_entry(cfg.data.sft) if sft else None,
                              source_objects(store, files))
    store.publish_file(manifest.dumps(), join_uri(out, MANIFEST))
    _remove_stale(store, out, fingerprint)
    logger.info("data: the corpus\n%s", manifest.summary_table())
    return manifest


def _read(cfg: Config, store: ObjectStore, files: list[dict],
          scratch: Scratch) -> tuple[Any, list[dict], list[dict]]:
    """Read and clean every file (one task each) into ``<scratch>/rows``; returns them, the skipped objects
    (one row per file at most: bounded by the number of files) and the counts and text bytes per (source,
    reason) of the documents."""
    import ray

    read = partial(read_file_task, filesystem_factory=store.pyarrow_filesystem, clean=cfg.data.clean,
                   max_file_bytes=int(cfg.data.max_file_mb * 2**20))
    split = {"val_fraction": cfg.data.val_fraction, "test_fraction": cfg.data.test_fraction,
             "fixed": {s.name: s.split for s in cfg.data.sources if s.split}}
    reader, kwargs = ((read_records, {"read": read, "sft": cfg.data.sft, "clean": cfg.data.clean, "split": split,
                                      "pii": cfg.data.pii})
                      if cfg.data.format == "sft"
                      else (read_and_clean, {"read": read, "cfg": cfg.data.clean, "split": split, "data": cfg.data}))
    sums = ["n_bytes", *COUNT_COLUMNS]  # and the quality stack's counts
    rows, counts = scratch(ray.data.from_items(files, override_num_blocks=max(1, len(files))).map_batches(
        reader, fn_kwargs=kwargs, batch_size=1), "rows", ["source", "reason", "uri", "detail"], sums,
        summary=partial(read_counts, object_reasons=sorted(OBJECT_REASONS), sums=sums))
    skipped = sorted(({k: r[k] for k in ("source", "uri", "reason", "detail")} for r in counts
                      if r["reason"] in OBJECT_REASONS for _ in range(r["count()"])),
                     key=lambda r: (r["source"], r["uri"], r["reason"]))
    reasons = add_up([r for r in counts if r["reason"] not in OBJECT_REASONS], ["source", "reason"], sums)
    return rows, skipped, reasons


def _dedup(cfg: Config, docs, n_clean: int, n_bytes: int, scratch: Scratch, known: CorpusIndex | None,
           done: _StageClock) -> tuple[Any, dict[str, int]]:
    """Exact dedup, near dedup and dedup against the corpus (``known``), each where it can drop something;
    returns the documents left (read from Parquet: later stages read them several times) and the number
    each removed."""
    removed = {"exact": 0, "near": 0, INDEX_KNOWN_EXACT: 0, INDEX_KNOWN_NEAR: 0}
    dedup = cfg.data.dedup
    if dedup.exact and n_clean > 1:
        docs, counts = scratch(exact_dedup(docs, _partitions(cfg, n_bytes + n_clean * _ROW_BYTES)), "exact", ["split"])
        removed["exact"] = n_clean - sum(r["count()"] for r in counts)
        done(f"exact dedup: {removed['exact']} removed")
    left = n_clean - removed["exact"]
    if dedup.near and left > 1:  # near_dedup reads ``docs`` again: from Parquet, streaming
        docs, removed["near"] = near_dedup(docs, dedup, _partitions(cfg, left * dedup.bands * _BAND_ROW_BYTES))
        done(f"near dedup: {removed['near']} removed")
    if known is not None and len(known) and left - removed["near"] > 0:
        marked, counts = scratch(docs.map_batches(mark_known, fn_kwargs={"index": known}, batch_format="numpy"),
                                 "known", ["known"])
        removed.update({r["known"]: r["count()"] for r in counts if r["known"]})
        docs = filter_in(marked, "known", [""]).drop_columns(["known"])
        done(f"dedup against the corpus ({len(known):,} documents): {removed[INDEX_KNOWN_EXACT]} exact, "
             f"{removed[INDEX_KNOWN_NEAR]} near duplicates removed")
    return docs, removed


def _write_docs(cfg: Config, store: ObjectStore, docs, scratch: Scratch, reasons: list[dict], removed: dict[str, int],
                done: _StageClock, held_out: dict[str, Iterable[np.ndarray]] | None = None
                ) -> tuple[Any, list[dict], list[dict], Decontamination | None]:
    """The documents left, decontaminated (text data; lm.data.decontam) and written as files: the passes below
    read no dropped rows, and the tokenizer actors' input is a plain read of half a CPU (_tokenize), with no
    filter task of a whole CPU, which Ray Data's budget never grants beside the actors and a Serve replica
    (test_continual deadlocked). Contaminated train documents are marked in the pass that writes, counted
    (``reasons``, ``removed``), not written. Returns the documents, their counts and bytes per split, the
    reasons and the manifest's decontamination entry (None: off)."""
    docs, decontam = decontaminate(cfg, store, docs, held_out) if cfg.data.format == "text" else (docs, None)
    marked = decontam is not None and decontam.ngrams > 0
    docs, per_split = scratch(docs, "docs", ["split", "source", "reason"] if marked else ["split"], ["n_bytes"],
                              keep=("reason", "") if marked else None)
    if marked:
        dropped = [r for r in per_split if r["reason"]]
        reasons = reasons + add_up(dropped, ["source", "reason"], ["n_bytes"])
        removed[CONTAMINATED] = decontam.dropped = sum(r["count()"] for r in dropped)
        per_split = add_up([r for r in per_split if not r["reason"]], ["split"], ["n_bytes"])
        done(f"decontamination: {decontam.dropped} train documents share a {decontam.ngram}-gram with "
             f"{', '.join(decontam.against)}")
    return docs, per_split, reasons, decontam


def _tokenize(cfg: Config, docs, tok: BPETokenizer, scratch: Scratch,
              reasons: list[dict]) -> tuple[Any, list[dict], list[dict]]:
    """Tokenize (actor pool; ``docs`` read by tasks of data.actor_cpus, as the writes are: a whole CPU may never
    be granted beside the actors) into ``<scratch>/tokens`` (counted while written, read by the shard writer);
    returns them, their counts per (source, split) and ``reasons`` plus (SFT) the records longer than a row."""
    import ray

    sft = cfg.data.format == "sft"
    actor_kwargs = {"tokenizer_json": tok.to_json(), "weights": {s.name: s.weight for s in cfg.data.sources}}
    size = "n_all" if sft else "n_tokens"  # what the rows hold (SFT: prompt and response)
    keys, sums = ["source", "split", *(["reason"] if sft else [])], sorted({"n_tokens", "n_bytes", "original", size})
    tokens, per_source = scratch(docs.map_batches(
        SFTTokenizeActor if sft else TokenizeActor,
        fn_constructor_kwargs={**actor_kwargs, "seq_len": cfg.seq_len} if sft else actor_kwargs,
        batch_size=1024, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=cfg.data.tokenize_actors),
        num_cpus=cfg.data.actor_cpus), "tokens", keys, sums, task_cpus=cfg.data.actor_cpus)
    if sft:  # records longer than a row are dropped here, counted like the read stage's reasons
        reasons = reasons + add_up([r for r in per_source if r["reason"]], ["source", "reason"])
        per_source = add_up([r for r in per_source if not r["reason"]], ["source", "split"], sums)
        tokens = filter_in(tokens, "reason", [""])
    if sft and not per_source:
        raise DataError(f"no record fits a row of {cfg.seq_len + 1} tokens (dropped: {reason_totals(reasons)})")
    return tokens, per_source, reasons


def _write_shards(cfg: Config, store: ObjectStore, tokens, per_source: list[dict], tok: BPETokenizer,
                  folder: str, out: str) -> list[dict]:
    """Pack and write the shards: groupby (split, bucket), one Parquet file per group (a group holds about
    data.rows_per_shard rows); the driver gets one small row per shard."""
    sft = cfg.data.format == "sft"
    size = "n_all" if sft else "n_tokens"
    split_tokens: dict[str, int] = {}
    for r in per_source:
        split_tokens[r["split"]] = split_tokens.get(r["split"], 0) + r[f"sum({size})"]
    seq_len = cfg.seq_len
    shards_per_split = {s: max(1, math.ceil(n / (seq_len + 1) / cfg.data.rows_per_shard))
                        for s, n in split_tokens.items()}
    n_bytes = sum(split_tokens.values()) * (8 if sft else 4)  # int32 tokens (SFT: and a loss mask)
    written = (tokens.map_batches(add_bucket, fn_kwargs={"shards_per_split": shards_per_split}, batch_format="pyarrow",
                                  zero_copy_batch=True)
               .groupby(["split", "bucket"], num_partitions=_partitions(cfg, n_bytes))
               .map_groups(write_sft_shard if sft else write_shard,
                           fn_kwargs={"out_dir": join_uri(out, folder), "fs_factory": store.pyarrow_filesystem,
                                      "seq_len": seq_len,
                                      **({"pad_id": tok.pad_id} if sft else {"eos_id": tok.eos_id})},
                           batch_format="numpy")
               .take_all())
    return sorted(({**w, "path": f"{folder}/{w['path']}"} for w in written), key=lambda w: w["path"])


def _remove_stale(store: ObjectStore, out: str, fingerprint: str) -> None:
    """Shard, index and scratch folders of earlier runs with other inputs."""
    stale = {u[len(out):].lstrip("/").split("/", 1)[0] for u in store.list(out)}
    for name in sorted(stale):
        prefix = name.split("-", 1)[0]
        if prefix in ("shards", "index", SCRATCH) and name != f"{prefix}-{fingerprint}":
            store.delete(join_uri(out, name))
