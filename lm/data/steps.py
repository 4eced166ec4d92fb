"""The Ray Data steps of the data pipeline (lm.data.pipeline chains them): map_batches / map_groups
UDFs over the pure functions in lm.data.*, and the tokenizer actor. No Ray import at module level.

  read_and_clean   files → cleaned documents with their split (one fused task per file)
  TokenizeActor    documents → token arrays, train documents repeated by their source's mixing weight
  add_bucket       the shard each document goes to (a hash of its id: deterministic shard contents)
  write_shard      one (split, bucket) group → packed rows → one Parquet file (write_file: the write itself)
  repeat_by_weight train rows repeated by their source's mixing weight (also lm.data.sft's tokenizer)
  count_by         counts and sums per key, per batch in parallel, added up on the driver
  hash_sample      a seeded, id-hash-chosen share of the rows
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from itertools import chain
from typing import Any

import numpy as np

from lm.config import join_uri
from lm.data.clean import clean_batch
from lm.data.loader import shard_bytes
from lm.data.pack import pack_rows
from lm.data.split import hash_unit, mixing_copies, split_batch
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


def read_and_clean(files: dict[str, Any], *, read: Callable, cfg, split: dict[str, Any]) -> Iterator[dict[str, list]]:
    """map_batches UDF: the documents of each file, cleaned and assigned their split (``split``: the
    keyword arguments of :func:`split_batch`), as column batches of ≤ READ_BATCH_ROWS (one fused task
    per file: no Python dict per row crosses Ray)."""
    columns: dict[str, list] = {}
    n_files = len(next(iter(files.values()), []))
    for i in range(n_files):
        for row in read({k: v[i] for k, v in files.items()}):
            for key, value in row.items():
                columns.setdefault(key, []).append(value)
            if len(columns["id"]) >= READ_BATCH_ROWS:
                yield split_batch(clean_batch(columns, cfg), **split)
                columns = {}
    if columns:
        yield split_batch(clean_batch(columns, cfg), **split)


def add_bucket(batch: dict[str, Any], shards_per_split: dict[str, int]) -> dict[str, Any]:
    batch["bucket"] = [
        int(hash_unit(f"shard:{doc_id}") * shards_per_split[split])
        for doc_id, split in zip(batch["id"], batch["split"], strict=True)
    ]
    return batch


def write_file(fs_factory, uri: str, data: bytes) -> None:
    """Write ``data`` at ``uri`` through the pyarrow filesystem of ``fs_factory`` (from a Ray worker)."""
    import pyarrow as pa
    import pyarrow.fs

    fs, path = fs_factory(uri)
    if isinstance(fs, pa.fs.LocalFileSystem):  # S3 has no directories (and must not get markers)
        fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(data)


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


def count_by(ds, keys: list[str], sums: list[str] = ()) -> list[dict]:
    """Counts (and sums) per distinct ``keys``, computed per batch in parallel and added up here."""
    partial_rows = ds.select_columns([*keys, *sums]).map_batches(
        _batch_counts, fn_kwargs={"keys": keys, "sums": list(sums)}, batch_format="numpy", batch_size=4096
    ).take_all()
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


