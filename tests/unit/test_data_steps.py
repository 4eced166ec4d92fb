"""Ray Data UDFs of the data pipeline (lm.data.steps), called directly on batches."""

import numpy as np


def test_batch_counts_are_typed_arrow_columns_ray_can_concatenate():
    """Counts per batch come back as string/int64 Arrow columns whatever the batch holds: numpy str
    scalars would become a tensor column in one block and a string column in another (CI failure)."""
    import pyarrow as pa
    from ray.data._internal.arrow_ops.transform_pyarrow import concat

    from lm.data.steps import _batch_counts

    batch = {"source": np.array(["a", "b", "a"], dtype=object), "split": np.array(["train"] * 3, dtype=object),
             "n": np.array([1, 2, 3])}
    one = _batch_counts(batch, ["source", "split"], ["n"])
    assert one.schema.field("source").type == pa.string() and one.schema.field("sum(n)").type == pa.int64()
    assert sorted(zip(one.column("source").to_pylist(), one.column("count()").to_pylist(),
                      one.column("sum(n)").to_pylist(), strict=True)) == [("a", 2, 4), ("b", 1, 2)]
    empty = _batch_counts({k: v[:0] for k, v in batch.items()}, ["source", "split"], ["n"])
    assert concat([one, empty]).num_rows == 2
