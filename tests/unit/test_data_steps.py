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


def test_read_counts_keep_skipped_objects_and_count_documents():
    """The read stage's summary (written beside its Parquet, no second pass): one row per skipped object with
    its uri and detail, documents only counted per (source, reason) whatever their uri; add_up merges blocks."""
    import pyarrow as pa

    from lm.data.steps import add_up, read_counts

    def block(rows):
        return pa.table({k: [r[i] for r in rows]
                         for i, k in enumerate(("source", "uri", "reason", "detail", "n_bytes"))})

    a = block([("s", "a.txt", "", "", 10), ("s", "a.txt", "", "", 5), ("s", "b.gz", "corrupt_compression", "gzip", 0)])
    b = block([("s", "c.txt", "", "", 7), ("s", "c.txt", "too_short", "3 chars", 0),
               ("t", "d.txt", "empty", "0 bytes", 0)])
    partial_rows = [r for t in (a, b) for r in read_counts(t, ["corrupt_compression", "empty"]).to_pylist()]
    totals = add_up(partial_rows, ["source", "reason", "uri", "detail"], ["n_bytes"])
    assert [(r["source"], r["reason"], r["uri"], r["detail"], r["count()"], r["sum(n_bytes)"]) for r in totals] == [
        ("s", "", "", "", 3, 22), ("s", "corrupt_compression", "b.gz", "gzip", 1, 0),
        ("s", "too_short", "", "", 1, 0), ("t", "empty", "d.txt", "0 bytes", 1, 0)]
    assert add_up(totals, ["reason"]) == [{"reason": r, "count()": n} for r, n in
                                          [("", 3), ("corrupt_compression", 1), ("empty", 1), ("too_short", 1)]]
