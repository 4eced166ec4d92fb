"""The Ray Data steps of the data pipeline (lm.data.pipeline chains them): map_batches / map_groups
UDFs over the pure functions in lm.data.*, and the tokenizer actor. No Ray import at module level.

  read_and_clean   files → cleaned documents with their split (one fused task per file)
  TokenizeActor    documents → token arrays, train documents repeated by their source's mixing weight
  add_bucket       the shard each document goes to (a hash of its id: deterministic shard contents)
  write_shard      one (split, bucket) group → packed rows → one Parquet file (write_file: the write itself)
  repeat_by_weight train rows repeated by their source's mixing weight (also lm.data.sft's tokenizer)
  add_up           counts and sums per key (made per block while writing: Scratch), added up on the driver
  hash_sample      a seeded, id-hash-chosen share of the rows
  Scratch          a dataset written as Parquet and read back (a stage read more than once, streaming)
  export_splits    a split's texts, in id order, streamed into one JSONL file by a Ray task (write_texts)
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from itertools import chain
from typing import Any

import numpy as np

from lm.config import join_uri
from lm.data.clean import clean_batch
from lm.data.loader import shard_bytes
from lm.data.pack import pack_rows
from lm.data.split import hash_unit, mixing_copies, split_batch
from lm.data.tables import filter_in
from lm.tokenizer import BPETokenizer


class TokenizeActor:
    """Holds one tokenizer per actor; turns a batch of documents into token arrays, each train document
    repeated by its source's mixing weight (:func:`~lm.data.split.mixing_copies`; copy k > 0 gets the
    id ``<id>~k``, so copies land in different shards)."""

    def __init__(self, tokenizer_json: str, weights: dict[str, float]):
        self.tok = BPETokenizer.from_json(tokenizer_json)
        self.weights = weights

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import pyarrow as pa

        ids = self.tok.encode_batch([str(t) for t in batch["text"]])
        lengths = np.fromiter(map(len, ids), dtype=np.int32, count=len(ids))
        flat = np.fromiter(chain.from_iterable(ids), dtype=np.int32, count=int(lengths.sum()))
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
        table = pa.table({
            "id": pa.array(batch["id"].astype(str)),
            "source": pa.array(batch["source"].astype(str)),
            "split": pa.array(batch["split"].astype(str)),
            "n_bytes": pa.array(np.asarray(batch["n_bytes"], dtype=np.int64)),
            "n_tokens": pa.array(lengths.astype(np.int64) + 1),  # + end-of-text
            "tokens": pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat)),
        })
        return repeat_by_weight(table, self.weights)


def repeat_by_weight(table: Any, weights: dict[str, float]) -> Any:
    """The rows of a pyarrow table (columns id, split, source, …) each repeated by its source's mixing
    weight (:func:`~lm.data.split.mixing_copies`; copy k > 0 gets the id ``<id>~k``), with a column
    ``original`` (1 for the first copy, 0 for the others)."""
    import pyarrow as pa

    copies = [mixing_copies(i, sp, weights[src]) for i, sp, src in zip(
        table.column("id").to_pylist(), table.column("split").to_pylist(), table.column("source").to_pylist(),
        strict=True)]
    if all(c == 1 for c in copies):
        return table.append_column("original", pa.array(np.ones(len(copies), dtype=np.int64)))
    take = np.repeat(np.arange(len(copies)), copies)
    copy = np.concatenate([np.arange(c) for c in copies]).astype(np.int64) if take.size else take
    table = table.take(pa.array(take))
    ids = [i if k == 0 else f"{i}~{k}" for i, k in zip(table.column("id").to_pylist(), copy.tolist(), strict=True)]
    table = table.set_column(table.schema.get_field_index("id"), "id", pa.array(ids, type=pa.string()))
    return table.append_column("original", pa.array((copy == 0).astype(np.int64)))


READ_BATCH_ROWS = 4096


def read_and_clean(files: dict[str, Any], *, read: Callable, cfg, split: dict[str, Any],
                   data=None) -> Iterator[dict[str, list]]:
    """map_batches UDF: the documents of each file, cleaned (``cfg``: data.clean; with ``data``, the data
    section, also through the quality stack, lm.data.quality) and assigned their split (``split``: the
    keyword arguments of :func:`split_batch`), as column batches of ≤ READ_BATCH_ROWS (one fused task
    per file: no Python dict per row crosses Ray)."""
    columns: dict[str, list] = {}
    n_files = len(next(iter(files.values()), []))
    for i in range(n_files):
        for row in read({k: v[i] for k, v in files.items()}):
            for key, value in row.items():
                columns.setdefault(key, []).append(value)
            if len(columns["id"]) >= READ_BATCH_ROWS:
                yield split_batch(clean_batch(columns, cfg, data), **split)
                columns = {}
    if columns:
        yield split_batch(clean_batch(columns, cfg, data), **split)


def add_bucket(batch: Any, shards_per_split: dict[str, int]) -> Any:
    """map_batches UDF (pyarrow): a ``bucket`` column, the shard of each row's split it goes to (the other
    columns, token lists included, pass through without a copy)."""
    import pyarrow as pa

    return batch.append_column("bucket", pa.array([
        int(hash_unit(f"shard:{doc_id}") * shards_per_split[split])
        for doc_id, split in zip(batch.column("id").to_pylist(), batch.column("split").to_pylist(), strict=True)
    ], type=pa.int64()))


def _output_stream(fs_factory, uri: str) -> Any:
    """An output stream at ``uri`` through the pyarrow filesystem of ``fs_factory`` (S3: a multipart upload
    that buffers one part at a time)."""
    import pyarrow as pa
    import pyarrow.fs

    fs, path = fs_factory(uri)
    if isinstance(fs, pa.fs.LocalFileSystem):  # S3 has no directories (and must not get markers)
        fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    return fs.open_output_stream(path)


def write_file(fs_factory, uri: str, data: bytes) -> None:
    """Write ``data`` at ``uri`` through the pyarrow filesystem of ``fs_factory`` (from a Ray worker)."""
    with _output_stream(fs_factory, uri) as f:
        f.write(data)


def write_texts(ds, fs_factory, uri: str, batch_rows: int = 1024) -> int:
    """Stream the rows of ``ds`` (columns id, text), in its order, into one JSONL file at ``uri`` ({"id": …,
    "text": …} lines), a batch at a time; returns the number of lines. lm.data.pipeline runs it as a Ray
    task, so neither the rows nor the file pass through the driver; memory: one batch and one upload part."""
    n = 0
    with _output_stream(fs_factory, uri) as f:
        for batch in ds.iter_batches(batch_size=batch_rows, batch_format="pyarrow"):
            f.write("".join(json.dumps({"id": str(i), "text": str(t)}) + "\n" for i, t in zip(
                batch.column("id").to_pylist(), batch.column("text").to_pylist(), strict=True)).encode())
            n += batch.num_rows
    return n


def write_shard(group: dict[str, Any], *, out_dir: str, fs_factory, seq_len: int, eos_id: int) -> dict[str, Any]:
    """Pack one (split, bucket) group into rows of seq_len + 1 and write it as one Parquet file."""
    order = np.argsort(np.asarray(group["id"], dtype=object).astype(str))
    split, bucket = str(group["split"][0]), int(group["bucket"][0])
    rows, dropped = pack_rows((group["tokens"][i] for i in order), seq_len, eos_id)
    data = shard_bytes(rows.reshape(-1, seq_len + 1))
    name = f"{split}-{bucket:05d}.parquet"
    write_file(fs_factory, join_uri(out_dir, name), data)
    return {
        "path": [name], "split": [split], "rows": [len(rows)], "tokens": [int(rows.size)],
        "dropped_tail_tokens": [dropped], "docs": [len(order)], "sha256": [hashlib.sha256(data).hexdigest()],
    }


# ------------------------------------------------------------------------------------- the stages


def _batch_counts(batch: dict[str, Any], keys: list[str], sums: list[str]) -> Any:
    """Per-batch counts (and sums) by ``keys``: a few rows per batch, summed on the driver."""
    import pyarrow as pa

    acc: dict[tuple, list[int]] = {}
    columns = [np.asarray(batch[k]).astype(str) for k in keys]
    values = [np.asarray(batch[c], dtype=np.int64) for c in sums]
    for i, key in enumerate(zip(*columns, strict=True)):
        entry = acc.setdefault(key, [0] * (1 + len(sums)))
        entry[0] += 1
        for j, v in enumerate(values):
            entry[j + 1] += int(v[i])
    # Typed Arrow columns: a list of numpy str scalars would become a tensor column in some blocks
    # (numpy scalars look ndarray-like to Ray) and a string column in others, which Ray cannot concatenate.
    out = {k: pa.array([str(key[i]) for key in acc], type=pa.string()) for i, k in enumerate(keys)}
    out["count()"] = pa.array([e[0] for e in acc.values()], type=pa.int64())
    for j, c in enumerate(sums):
        out[f"sum({c})"] = pa.array([e[j + 1] for e in acc.values()], type=pa.int64())
    return pa.table(out)


def add_up(partial_rows: list[dict], keys: list[str], sums: list[str] = ()) -> list[dict]:
    """Rows of counts (``count()``, ``sum(<c>)``) added up per distinct ``keys`` (other keys are summed
    over), sorted by key."""
    totals: dict[tuple, dict] = {}
    for r in partial_rows:
        key = tuple(str(r[k]) for k in keys)
        entry = totals.setdefault(key, {**dict(zip(keys, key, strict=True)), "count()": 0,
                                        **{f"sum({c})": 0 for c in sums}})
        for name in ("count()", *[f"sum({c})" for c in sums]):
            entry[name] += int(r[name])
    return [totals[k] for k in sorted(totals)]


def hash_sample(batch: Any, seed: int, fraction: float) -> Any:
    """map_batches UDF (pyarrow): the rows whose seeded id hash falls below ``fraction``."""
    keep = [hash_unit(f"{seed}:{doc_id}") < fraction for doc_id in batch.column("id").to_pylist()]
    return batch.filter(np.asarray(keep, dtype=bool))


# -------------------------------------------------------------------------------- intermediate data, exports


def _table_counts(table: Any, keys: list[str], sums: list[str]) -> Any:
    return _batch_counts({c: table.column(c).to_numpy(zero_copy_only=False) for c in [*keys, *sums]}, keys, sums)


def read_counts(table: Any, object_reasons: list[str], sums: Sequence[str] = ("n_bytes",)) -> Any:
    """Summary of read rows (:class:`Scratch`): counts and sums of ``sums`` (text bytes; the quality stack's
    counts) per (source, reason, uri, detail), with uri and detail blanked but for the rows of skipped
    objects (one per file at most: bounded by the files)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    skipped = pc.is_in(table.column("reason"), value_set=pa.array(object_reasons, type=pa.string()))
    columns = {c: table.column(c) for c in ("source", "reason", *sums)}
    for c in ("uri", "detail"):
        columns[c] = pc.if_else(skipped, table.column(c).cast(pa.string()), pa.scalar("", pa.string()))
    return _table_counts(pa.table(columns), ["source", "reason", "uri", "detail"], list(sums))


def _write_part(table: Any, *, fs_factory, folder: str, summary: Callable, keep: tuple[str, str] | None = None) -> Any:
    """map_batches UDF (pyarrow, whole blocks): the block as one Parquet file under ``folder`` (``keep``:
    only its rows whose column ``keep[0]`` is ``keep[1]``, without that column); returns ``summary(block)``
    (of every row). One row group (a map_groups block has a chunk per group, and thousands of row groups
    read back many times slower)."""
    import uuid

    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    written = table
    if keep is not None:
        written = table.filter(pc.equal(table.column(keep[0]), keep[1])).drop_columns([keep[0]])
    if written.num_rows:
        with _output_stream(fs_factory, join_uri(folder, f"part-{uuid.uuid4().hex}.parquet")) as f:
            pq.write_table(written.combine_chunks(), f)
    return summary(table)


class Scratch:
    """Intermediate datasets that later stages read more than once, as Parquet under ``uri`` (lm.data.pipeline:
    ``<data>/tmp-<fingerprint>/``, deleted when the run ends). Reading them back streams block by block,
    where ``materialize()`` would hold the whole corpus in Ray's object store.

        docs, counts = scratch(ds, "name", ["split"], ["n_bytes"])   # counts per split, from the same pass
        again = scratch.read("name", task_cpus=0.5)                  # read by tasks of half a CPU

    CPUs: a task asks for ``task_cpus`` (Ray's default, 1, unless given) and Ray Data fuses consecutive map
    tasks only when they ask for the same; a stage beside an actor pool (and a Serve replica) reads and
    writes with fractional CPUs, as a task of a whole CPU may never be granted there.
    """

    def __init__(self, store, uri: str):
        self.store, self.uri = store, uri

    def __call__(self, ds, name: str, keys: list[str], sums: list[str] = (), summary: Callable | None = None,
                 task_cpus: float = 1.0, keep: tuple[str, str] | None = None) -> tuple[Any, list[dict]]:
        """Write ``ds`` under ``<uri>/<name>/`` (a file per block) and return a dataset reading it back with
        the counts (and sums) per ``keys`` (:func:`add_up`) of its rows, made while writing; ``summary`` (a
        pyarrow table → count rows of ``keys`` and ``sums``) replaces the plain counts. ``keep`` (column,
        value): only those rows are written (without the column), all are counted. The writing tasks
        ask for ``task_cpus``; the read-back's for Ray's default."""
        folder = join_uri(self.uri, name)
        summary = summary or partial(_table_counts, keys=list(keys), sums=list(sums))
        written = ds.map_batches(_write_part, batch_size=None, batch_format="pyarrow", num_cpus=task_cpus,
                                 fn_kwargs={"fs_factory": self.store.pyarrow_filesystem, "folder": folder,
                                            "summary": summary, "keep": keep})
        counts = add_up(written.take_all(), keys, sums)  # runs the writes
        return self.read(name), counts

    def read(self, name: str, task_cpus: float = 1.0) -> Any:
        """The dataset written as ``name``, read by tasks of ``task_cpus`` (empty when nothing was written)."""
        import ray

        folder = join_uri(self.uri, name)
        files = self.store.list(folder)
        if not files:
            return ray.data.from_items([])
        fs, path = self.store.pyarrow_filesystem(folder)
        # Ray 2.60's default (datasource V2) Parquet read coalesces files and its read task's memory grew
        # with the bytes it read (measured: 368 -> 581 MiB for 72 -> 216 MB); the V1 reader holds about one
        # file (~145 MiB flat). One block per file (each written from one block, at most data.block_mb): V1
        # would split to 200 blocks, and the sort shuffle's driver-side bookkeeping grows as blocks squared.
        # A dataset keeps the context it was made in, and what derives from it too.
        context = ray.data.DataContext.get_current()
        previous, context.use_datasource_v2 = context.use_datasource_v2, False
        try:
            return ray.data.read_parquet(path, filesystem=fs, override_num_blocks=len(files),
                                         num_cpus=task_cpus)
        finally:
            context.use_datasource_v2 = previous


def export_splits(store, out: str, docs, splits: tuple[str, ...]) -> dict[str, str]:
    """The cleaned, deduplicated documents of ``splits`` as ``<split>-texts.jsonl`` ({"id": …, "text": …}
    lines in id order): a distributed sort (its blocks wait in the object store, spilling like any
    shuffle's) streamed into the file by one Ray task (:func:`write_texts`); no row reaches the driver."""
    import ray

    # num_cpus=0: the task only consumes the sorted blocks; a CPU held here is one the sort's tasks lack
    writer = ray.remote(num_cpus=0)(write_texts)
    written = {}
    for split in splits:
        ds = filter_in(docs, "split", [split]).select_columns(["id", "text"]).sort("id")
        ray.get(writer.remote(ds, store.pyarrow_filesystem, join_uri(out, f"{split}-texts.jsonl")))
        written[split] = f"{split}-texts.jsonl"
    return written
