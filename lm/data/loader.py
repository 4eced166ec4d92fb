"""Reading prepared data: the manifest, its shards as a Ray Dataset or a plain iterator.

    manifest = read_manifest(store, data_uri)
    for x, y in iter_batches(store, data_uri, "train", batch_size=16, seed=1, epoch=0): ...   # tests, 1 process
    ds = ray_dataset(store, data_uri, "train")      # for ray.train.get_dataset_shard("train")

Rows hold ``seq_len + 1`` tokens; inputs are ``row[:-1]``, targets ``row[1:]``. A shard may also hold
a ``loss_mask`` column (supervised examples: 0 on prompt tokens, no loss there); :func:`load_split`
returns it (ones for shards without one). A manifest's shard paths are relative to its folder, or
whole URIs (a continual-learning mix refers to shards of other data directories). Each epoch visits
every row once, in an order drawn from ``seed`` and ``epoch`` (shards shuffled, rows within a shard
shuffled), so a resumed run sees the same order.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator

import numpy as np

from lm.config import join_uri
from lm.data.pack import rows_to_inputs_targets
from lm.storage import ObjectStore, StorageError


def read_manifest(store: ObjectStore, data_uri: str) -> dict:
    uri = join_uri(data_uri, "manifest.json")
    if not store.exists(uri):
        raise StorageError(f"{uri}: no data manifest there (run `lm data prepare` first)")
    return json.loads(store.read_text(uri))


def shard_uri(data_uri: str, path: str) -> str:
    """A manifest's shard path as a URI: relative to the data folder unless it is one already."""
    return path if "://" in path or path.startswith("/") else join_uri(data_uri, path)


def shard_uris(manifest: dict, data_uri: str, split: str) -> list[str]:
    found = [shard_uri(data_uri, s["path"]) for s in manifest["shards"] if s["split"] == split]
    if not found:
        raise ValueError(f"{data_uri}: the manifest has no shards for split {split!r}")
    return found


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
        columns["loss_mask"] = pa.FixedSizeListArray.from_arrays(pa.array(loss_mask.reshape(-1), type=pa.uint8()), width)
    buf = io.BytesIO()
    row_group_rows = row_group_rows or max(1, ROW_GROUP_BYTES // (4 * width))
    pq.write_table(pa.table(columns), buf, compression="zstd", row_group_size=row_group_rows)
    return buf.getvalue()


def read_shard(store: ObjectStore, uri: str) -> np.ndarray:
    """One shard as an int32 array [rows, seq_len + 1]."""
    import pyarrow.parquet as pq

    return fixed_lists(pq.read_table(io.BytesIO(store.read_bytes(uri)), columns=["tokens"]).column("tokens"), np.int32)


def read_shard_masked(store: ObjectStore, uri: str) -> tuple[np.ndarray, np.ndarray | None]:
    """One shard's rows and its ``loss_mask`` (uint8, the rows' shape), None when it has none."""
    import pyarrow.parquet as pq

    table = pq.read_table(io.BytesIO(store.read_bytes(uri)))
    rows = fixed_lists(table.column("tokens"), np.int32)
    mask = fixed_lists(table.column("loss_mask"), np.uint8) if "loss_mask" in table.column_names else None
    return rows, mask


def load_split(store: ObjectStore, data_uri: str, split: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Every row of ``split`` and their loss mask (None when no shard has one; ones for shards without)."""
    parts = [read_shard_masked(store, u) for u in shard_uris(read_manifest(store, data_uri), data_uri, split)]
    rows = np.concatenate([r for r, _ in parts])
    if all(m is None for _, m in parts):
        return rows, None
    return rows, np.concatenate([np.ones_like(r, dtype=np.uint8) if m is None else m for r, m in parts])


def corpus_index_tables(store: ObjectStore, data_uri: str) -> list:
    """The corpus index of a data directory (lm.data.pipeline) as pyarrow tables (hash, sig)."""
    import pyarrow.parquet as pq

    manifest = read_manifest(store, data_uri)
    if "index" not in manifest:
        raise StorageError(f"{data_uri}: this data (format {manifest.get('format')}) has no corpus index; "
                           "prepare it again with this version (`lm data prepare`)")
    uris = sorted(u for u in store.list(join_uri(data_uri, manifest["index"]) + "/") if u.endswith(".parquet"))
    return [pq.read_table(io.BytesIO(store.read_bytes(u))) for u in uris]


def load_rows(store: ObjectStore, data_uri: str, split: str) -> np.ndarray:
    """Every row of ``split`` in manifest order (for small data and evaluation)."""
    manifest = read_manifest(store, data_uri)
    return np.concatenate([read_shard(store, u) for u in shard_uris(manifest, data_uri, split)])


def iter_rows(store: ObjectStore, data_uri: str, split: str, seed: int, epoch: int) -> Iterator[np.ndarray]:
    """Every row of ``split`` once, in the shuffled order of (seed, epoch); one shard in memory at a time."""
    uris = shard_uris(read_manifest(store, data_uri), data_uri, split)
    rng = np.random.default_rng([seed, epoch])
    for i in rng.permutation(len(uris)):
        rows = read_shard(store, uris[i])
        yield from rows[rng.permutation(len(rows))]


def iter_batches(store: ObjectStore, data_uri: str, split: str, batch_size: int, seed: int, epoch: int):
    """(inputs, targets) int64 torch batches of ``split`` for one epoch (the last partial batch is dropped)."""
    import torch

    batch: list[np.ndarray] = []
    for row in iter_rows(store, data_uri, split, seed, epoch):
        batch.append(row)
        if len(batch) == batch_size:
            yield rows_to_inputs_targets(torch.from_numpy(np.stack(batch).astype(np.int64)))
            batch = []


def ray_dataset(store: ObjectStore, data_uri: str, split: str, seed: int | None = None):
    """The shards of ``split`` as a Ray Dataset (column ``tokens``), block order shuffled by ``seed``."""
    import ray

    uris = shard_uris(read_manifest(store, data_uri), data_uri, split)
    fs, _ = store.pyarrow_filesystem(uris[0])
    ds = ray.data.read_parquet([store.pyarrow_filesystem(u)[1] for u in uris], filesystem=fs)
    return ds if seed is None else ds.randomize_block_order(seed=seed)
