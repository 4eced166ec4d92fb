"""Packing token streams into fixed-length training rows (pure numpy; no Ray, no I/O).

Owns the layout of a packed row: documents are concatenated, each followed by ``eos_id``, and the
stream is cut into rows of ``seq_len + 1`` tokens, so one row gives ``seq_len`` (input, target)
pairs by shifting one position (:func:`rows_to_inputs_targets`). Documents may straddle rows.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

_INT32 = np.iinfo(np.int32)


def pack_rows(token_lists: Iterable[Sequence[int]], seq_len: int, eos_id: int) -> tuple[np.ndarray, int]:
    """Concatenate documents (each followed by ``eos_id``) and cut into rows of ``seq_len + 1``.

    Returns ``(rows, n_dropped)``: an int32 array of shape ``[n_rows, seq_len + 1]`` and the number of
    tokens in the final partial row, which is dropped. Deterministic; input order is kept.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    if not _INT32.min <= eos_id <= _INT32.max:
        raise ValueError(f"eos_id {eos_id} does not fit in int32")
    width = seq_len + 1
    eos = np.array([eos_id], dtype=np.int64)
    parts: list[np.ndarray] = []
    for tokens in token_lists:
        parts.append(np.asarray(tokens, dtype=np.int64).reshape(-1))
        parts.append(eos)
    if not parts:
        return np.zeros((0, width), dtype=np.int32), 0
    flat = np.concatenate(parts)
    if flat.min() < _INT32.min or flat.max() > _INT32.max:
        raise ValueError("token ids do not fit in int32")
    n_rows = len(flat) // width
    rows = flat[: n_rows * width].astype(np.int32).reshape(n_rows, width)
    return rows, len(flat) - n_rows * width


def rows_to_inputs_targets(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Split packed rows ``[n, seq_len + 1]`` into ``inputs = rows[:, :-1]``, ``targets = rows[:, 1:]``.

    Works on numpy arrays and torch tensors alike (views, no copy).
    """
    if rows.ndim != 2 or rows.shape[1] < 2:
        raise ValueError(f"rows must have shape [n, seq_len + 1] with seq_len >= 1, got {tuple(rows.shape)}")
    return rows[:, :-1], rows[:, 1:]
