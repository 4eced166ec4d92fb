"""Small pyarrow batch helpers shared by the Ray Data steps (vectorised: no Python per row).

    ds.map_batches(rows_where_in, fn_kwargs={"column": "split", "values": ["train"]},
                   batch_format="pyarrow", zero_copy_batch=True)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def rows_where_in(batch: Any, column: str, values: Sequence[Any], keep: bool = True) -> Any:
    """map_batches UDF (pyarrow): the rows whose ``column`` is in ``values`` (``keep=False``: is not)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    data = batch.column(column)
    mask = pc.is_in(data, value_set=pa.array(list(values), type=data.type))
    return batch.filter(mask if keep else pc.invert(mask))


def filter_in(ds: Any, column: str, values: Sequence[Any], keep: bool = True) -> Any:
    """``ds`` restricted to rows whose ``column`` is (``keep``) or is not in ``values``, lazily."""
    return ds.map_batches(rows_where_in, fn_kwargs={"column": column, "values": list(values), "keep": keep},
                          batch_format="pyarrow", zero_copy_batch=True)
