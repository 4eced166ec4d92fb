"""Reading prepared data: the manifest, its shards as a Ray Dataset or a plain iterator.

    manifest = read_manifest(store, data_uri)
    for x, y in iter_batches(store, data_uri, "train", batch_size=16, seed=1, epoch=0): ...   # tests, 1 process
    ds = ray_dataset(store, data_uri, "train")      # for ray.train.get_dataset_shard("train")

Rows hold ``seq_len + 1`` tokens; inputs are ``row[:-1]``, targets ``row[1:]``. Each epoch visits
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


def shard_uris(manifest: dict, data_uri: str, split: str) -> list[str]:
    found = [join_uri(data_uri, s["path"]) for s in manifest["shards"] if s["split"] == split]
    if not found:
        raise ValueError(f"{data_uri}: the manifest has no shards for split {split!r}")
    return found


def read_shard(store: ObjectStore, uri: str) -> np.ndarray:
    """One shard as an int32 array [rows, seq_len + 1]."""
    import pyarrow.parquet as pq

    column = pq.read_table(io.BytesIO(store.read_bytes(uri)), columns=["tokens"]).column("tokens")
    column = column.combine_chunks()
    width = column.type.list_size
    return np.asarray(column.flatten().to_numpy(zero_copy_only=False), dtype=np.int32).reshape(-1, width)


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
