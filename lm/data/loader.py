"""Shard files and the corpus index of a data directory (the manifest: lm.data.manifest; streaming a
split into a trainer: lm.data.stream).

    blob = shard_bytes(rows, loss_mask)           # a shard: Parquet, bounded row groups
    rows, mask = read_shard_masked(store, uri)    # one small shard, whole (tests, one-off tools)
    ds = ray_dataset(store, data_uri, "train")    # a split as a Ray Dataset (benchmarks, Ray Data readers)

Rows hold ``seq_len + 1`` tokens; inputs are ``row[:-1]``, targets ``row[1:]``. A shard may also hold
a ``loss_mask`` column (supervised examples: 0 on prompt tokens, no loss there).
"""

from __future__ import annotations

import io

import numpy as np

from lm.config import join_uri
from lm.data.manifest import read_manifest
from lm.storage import ObjectStore, StorageError


def fixed_lists(column, dtype) -> np.ndarray:
    column = column.combine_chunks()
    return np.asarray(column.flatten().to_numpy(zero_copy_only=False), dtype=dtype).reshape(-1, column.type.list_size)


ROW_GROUP_BYTES = 4 * 2**20  # a shard's row groups hold about this many bytes of tokens: what a reader loads at once


def shard_bytes(rows: np.ndarray, loss_mask: np.ndarray | None = None, row_group_rows: int | None = None) -> bytes:
    """A shard file (Parquet, zstd): column ``tokens`` (fixed lists of int32) and optionally ``loss_mask``,
    in row groups of ``row_group_rows`` rows (default: about :data:`ROW_GROUP_BYTES` each), the units
    that lm.data.stream reads."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    width = rows.shape[1]
    columns = {"tokens": pa.FixedSizeListArray.from_arrays(pa.array(rows.reshape(-1), type=pa.int32()), width)}
    if loss_mask is not None:
        flat = pa.array(loss_mask.reshape(-1), type=pa.uint8())
        columns["loss_mask"] = pa.FixedSizeListArray.from_arrays(flat, width)
    buf = io.BytesIO()
    row_group_rows = row_group_rows or max(1, ROW_GROUP_BYTES // (4 * width))
    pq.write_table(pa.table(columns), buf, compression="zstd", row_group_size=row_group_rows)
    return buf.getvalue()


def read_shard_masked(store: ObjectStore, uri: str) -> tuple[np.ndarray, np.ndarray | None]:
    """One shard's rows and its ``loss_mask`` (uint8, the rows' shape), None when it has none."""
    import pyarrow.parquet as pq

    table = pq.read_table(io.BytesIO(store.read_bytes(uri)))
    rows = fixed_lists(table.column("tokens"), np.int32)
    mask = fixed_lists(table.column("loss_mask"), np.uint8) if "loss_mask" in table.column_names else None
    return rows, mask


def corpus_index_tables(store: ObjectStore, data_uri: str) -> list:
    """The corpus index of a data directory (lm.data.pipeline) as pyarrow tables (hash, sig)."""
    import pyarrow.parquet as pq

    manifest = read_manifest(store, data_uri)
    if getattr(manifest, "index", None) is None:
        raise StorageError(f"{data_uri}: this data ({manifest.kind}) has no corpus index; "
                           "prepare it again with this version (`lm data prepare`)")
    uris = sorted(u for u in store.list(join_uri(data_uri, manifest.index) + "/") if u.endswith(".parquet"))
    return [pq.read_table(io.BytesIO(store.read_bytes(u))) for u in uris]


def ray_dataset(store: ObjectStore, data_uri: str, split: str, seed: int | None = None):
    """The shards of ``split`` as a Ray Dataset (column ``tokens``), block order shuffled by ``seed``."""
    import ray

    uris = read_manifest(store, data_uri).shards_of(data_uri, split)
    fs, _ = store.pyarrow_filesystem(uris[0])
    ds = ray.data.read_parquet([store.pyarrow_filesystem(u)[1] for u in uris], filesystem=fs)
    return ds if seed is None else ds.randomize_block_order(seed=seed)
