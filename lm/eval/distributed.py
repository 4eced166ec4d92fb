"""The same token sums as lm.eval.metrics, on Ray Data: shards (or in-memory rows) → an actor pool.

Each actor loads the model directory once (and receives the fitted n-gram baseline once), scores its
batches with :func:`lm.eval.metrics.score_rows` and returns one row of sums per batch; the driver adds
them up. Actors take a fractional ``num_cpus`` (``eval.actor_cpus``) so Ray Data's read tasks can always
be scheduled beside them (a pool holding every CPU deadlocks the reads on a small machine).

    sums = ray_sums(store, model_uri, shard_uris=[...], batch_size=16, actors=2, actor_cpus=0.5, ngram=lm)
    sums["model"].metrics(), sums["ngram"].metrics()
"""

from __future__ import annotations

from typing import Any

import numpy as np

from lm.eval.metrics import TokenSums, score_rows
from lm.storage import ObjectStore
from lm.storage.uri import absolute_uri


class ScoreActor:
    """A Ray Data actor: one model (and n-gram baseline) per actor; one row of sums per batch."""

    def __init__(self, store: ObjectStore, model_uri: str, batch_size: int, ngram: Any = None):
        import torch

        from lm.eval.metrics import token_byte_lengths
        from lm.modeldir import load_model_dir

        torch.set_num_threads(1)
        loaded = load_model_dir(store, model_uri)
        self.model, self.batch_size, self.ngram = loaded.model, batch_size, ngram
        self.table = token_byte_lengths(loaded.tokenizer, loaded.model.cfg.vocab_size)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        column = batch["tokens"] if "tokens" in batch else batch["data"]
        rows = np.stack(column) if column.dtype == object else np.asarray(column)
        sums = score_rows(self.model, rows, self.table, self.batch_size, self.ngram)
        model, ngram = sums["model"], sums.get("ngram")
        return {"nll": np.array([model.nll]), "tokens": np.array([model.tokens]), "bytes": np.array([model.bytes]),
                "correct": np.array([model.correct]), "ngram_nll": np.array([ngram.nll if ngram else 0.0])}


def ray_sums(store: ObjectStore, model_uri: str, *, shard_uris: list[str] | None = None,
             rows: np.ndarray | None = None, batch_size: int = 16, actors: int = 1, actor_cpus: float = 0.5,
             ngram: Any = None, max_rows: int | None = None) -> dict[str, TokenSums]:
    """Score the rows of ``shard_uris`` (Parquet, column ``tokens``) or of ``rows`` on Ray Data actors."""
    from lm.cluster import connect

    ray = connect()
    if (shard_uris is None) == (rows is None):
        raise ValueError("give exactly one of shard_uris or rows")
    if shard_uris is not None:
        fs, _ = store.pyarrow_filesystem(shard_uris[0])
        ds = ray.data.read_parquet([store.pyarrow_filesystem(u)[1] for u in shard_uris], filesystem=fs,
                                   columns=["tokens"])
    else:
        pieces = max(1, min(2 * actors, len(rows) // batch_size))  # blocks for every actor to take
        ds = ray.data.from_numpy([np.ascontiguousarray(p) for p in np.array_split(rows, pieces)])
    if max_rows is not None:
        ds = ds.limit(max_rows)
    scored = ds.map_batches(
        ScoreActor, batch_size=batch_size * 8, batch_format="numpy",
        fn_constructor_kwargs={"store": store, "model_uri": absolute_uri(model_uri), "batch_size": batch_size,
                               "ngram": ngram},
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=actors), num_cpus=actor_cpus,
    ).take_all()
    model = TokenSums(float(np.sum([r["nll"] for r in scored])), int(sum(r["tokens"] for r in scored)),
                      int(sum(r["bytes"] for r in scored)), int(sum(r["correct"] for r in scored)))
    out = {"model": model}
    if ngram is not None:
        out["ngram"] = TokenSums(float(np.sum([r["ngram_nll"] for r in scored])), model.tokens, model.bytes, None)
    return out
