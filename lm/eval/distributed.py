"""The same token sums as lm.eval.metrics, on Ray Data: shards (or pieces of rows) → an actor pool.

Each actor loads the model directory once (and receives the fitted n-gram baseline once), scores its
batches with :func:`lm.eval.metrics.score_rows` (supervised rows through their loss masks) and returns
one row of sums per batch; the driver streams those rows and adds them up: it sees counts, never rows
(pieces made on the driver go into the object store one at a time). Actors take a fractional ``num_cpus``
(``eval.actor_cpus``) so Ray Data's read tasks can always be scheduled beside them (a pool holding every CPU
deadlocks the reads on a small machine).

    sums, rows = ray_sums(store, model_uri, shard_uris=[...], batch_size=16, actors=2, actor_cpus=0.5, ngram=lm)
    sums["model"].metrics(), sums["ngram"].metrics()
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

from lm.eval.metrics import TokenSums, score_rows
from lm.eval.sets import Piece
from lm.storage import ObjectStore
from lm.uri import absolute_uri


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
        rows = _stacked(batch["tokens"])
        mask = _stacked(batch["loss_mask"]) if "loss_mask" in batch else None  # supervised: the responses
        sums = score_rows(self.model, rows, self.table, self.batch_size, self.ngram, loss_mask=mask)
        model, ngram = sums["model"], sums.get("ngram")
        return {"nll": np.array([model.nll]), "tokens": np.array([model.tokens]), "bytes": np.array([model.bytes]),
                "correct": np.array([model.correct]), "ngram_nll": np.array([ngram.nll if ngram else 0.0]),
                "rows": np.array([len(rows)])}


def _stacked(column: np.ndarray) -> np.ndarray:
    return np.stack(column) if column.dtype == object else np.asarray(column)


def _piece_table(piece: Piece):
    """A piece in the shards' own columns (``tokens``, and ``loss_mask`` when it has one), for Ray Data."""
    import pyarrow as pa

    def column(values: np.ndarray, kind) -> pa.Array:
        return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1), type=kind), values.shape[1])

    columns = {"tokens": column(np.ascontiguousarray(piece.rows, np.int32), pa.int32())}
    if piece.loss_mask is not None:
        columns["loss_mask"] = column(np.ascontiguousarray(piece.loss_mask, np.uint8), pa.uint8())
    return pa.table(columns)


def ray_sums(store: ObjectStore, model_uri: str, *, shard_uris: list[str] | None = None, masked: bool = False,
             pieces: Iterable[Piece] | None = None, batch_size: int = 16, actors: int = 1,
             actor_cpus: float = 0.5, ngram: Any = None) -> tuple[dict[str, TokenSums], int]:
    """Score the rows of ``shard_uris`` (Parquet, column ``tokens``; ``masked``: and ``loss_mask``) or of
    ``pieces`` (lm.eval.sets.Piece: rows and their loss mask, each put into the object store as it comes)
    on Ray Data actors; the sums and the number of rows scored."""
    from lm.cluster import connect

    ray = connect()
    if (shard_uris is None) == (pieces is None):
        raise ValueError("give exactly one of shard_uris or pieces")
    if shard_uris is not None:
        fs, _ = store.pyarrow_filesystem(shard_uris[0])
        ds = ray.data.read_parquet([store.pyarrow_filesystem(u)[1] for u in shard_uris], filesystem=fs,
                                   columns=["tokens", "loss_mask"] if masked else ["tokens"])
    else:
        ds = ray.data.from_arrow_refs([ray.put(_piece_table(p)) for p in pieces])  # the driver holds one
    scored = ds.map_batches(
        ScoreActor, batch_size=batch_size * 8, batch_format="numpy",
        fn_constructor_kwargs={"store": store, "model_uri": absolute_uri(model_uri), "batch_size": batch_size,
                               "ngram": ngram},
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=actors), num_cpus=actor_cpus,
    )
    totals = dict.fromkeys(("nll", "tokens", "bytes", "correct", "ngram_nll", "rows"), 0)
    for batch in scored.iter_batches(batch_size=None, batch_format="numpy"):  # one row of sums per batch
        for key in totals:
            totals[key] += batch[key].sum()
    model = TokenSums(float(totals["nll"]), int(totals["tokens"]), int(totals["bytes"]), int(totals["correct"]))
    out = {"model": model}
    if ngram is not None:
        out["ngram"] = TokenSums(float(totals["ngram_nll"]), model.tokens, model.bytes, None)
    return out, int(totals["rows"])
