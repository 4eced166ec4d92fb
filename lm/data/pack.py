"""Packing token streams into fixed-length training rows (pure numpy; no Ray, no I/O).

Owns the layout of a packed row: documents are concatenated, each followed by ``eos_id``, and the
stream is cut into rows of ``seq_len + 1`` tokens, so one row gives ``seq_len`` (input, target)
pairs by shifting one position (:func:`rows_to_inputs_targets`). Documents may straddle rows.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import numpy as np

from lm.loss_mask import masked_targets

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


def unpack_documents(units: Iterable[np.ndarray], eos_id: int) -> Iterator[np.ndarray]:
    """The documents of one shard's rows, in order (the inverse of :func:`pack_rows`): ``units`` are its
    row blocks ``[n_rows, seq_len + 1]`` in stored order; each document's tokens without its ``eos_id``. The
    last document may be cut (its tail was the dropped partial row). Holds one block and one document."""
    carry = np.zeros(0, dtype=np.int64)
    for rows in units:
        flat = np.concatenate([carry, np.asarray(rows, dtype=np.int64).reshape(-1)])
        ends = np.flatnonzero(flat == eos_id)
        start = 0
        for end in ends.tolist():
            if end > start:
                yield flat[start:end]
            start = end + 1
        carry = flat[start:]
    if len(carry):
        yield carry


def pack_examples(examples: Iterable[tuple[Sequence[int], Sequence[int]]], seq_len: int,
                  pad_id: int | None = None) -> tuple[np.ndarray, np.ndarray, int]:
    """Supervised examples ``(token ids, loss mask)`` (each already ending in end-of-text, as
    lm.chat.sft_tokens makes them) concatenated and cut into rows of ``seq_len + 1`` like
    :func:`pack_rows`, their masks alongside: ``(rows int32, masks uint8, n_dropped)``.

    With ``pad_id``, no example straddles two rows (its response always sees its whole prompt): a row
    takes whole examples in order and is filled up with ``pad_id`` (mask 0); the last row is padded and
    kept (``n_dropped`` is 0); an example longer than a row is a ValueError (filter them first)."""
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    width = seq_len + 1
    ids, masks = [], []
    for tokens, mask in examples:
        if len(tokens) != len(mask):
            raise ValueError(f"an example has {len(tokens)} tokens but a mask of {len(mask)}")
        ids.append(np.asarray(tokens, dtype=np.int64).reshape(-1))
        masks.append(np.asarray(mask, dtype=np.uint8).reshape(-1))
    if not ids:
        return np.zeros((0, width), dtype=np.int32), np.zeros((0, width), dtype=np.uint8), 0
    flat, flat_mask = np.concatenate(ids), np.concatenate(masks)
    if flat.size and (flat.min() < _INT32.min or flat.max() > _INT32.max):
        raise ValueError("token ids do not fit in int32")
    if pad_id is not None:
        return (*_pad_rows(ids, masks, width, pad_id), 0)
    n = len(flat) // width
    return (flat[: n * width].astype(np.int32).reshape(n, width), flat_mask[: n * width].reshape(n, width),
            len(flat) - n * width)


def _pad_rows(ids: list[np.ndarray], masks: list[np.ndarray], width: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Whole examples per row, greedily in order, the rest of each row ``pad_id`` with mask 0."""
    places, row, used = [], 0, 0
    for i, example in enumerate(ids):
        if len(example) > width:
            raise ValueError(f"example {i} has {len(example)} tokens, more than a row of {width}")
        if used + len(example) > width:
            row, used = row + 1, 0
        places.append((row, used))
        used += len(example)
    rows = np.full((row + 1, width), pad_id, dtype=np.int32)
    out_mask = np.zeros((row + 1, width), dtype=np.uint8)
    for (r, start), example, mask in zip(places, ids, masks, strict=True):
        rows[r, start : start + len(example)] = example
        out_mask[r, start : start + len(example)] = mask
    return rows, out_mask


def rows_to_inputs_targets(rows, loss_mask=None):
    """Split packed rows ``[n, seq_len + 1]`` into ``inputs = rows[:, :-1]``, ``targets = rows[:, 1:]``;
    with a ``loss_mask`` of the rows' shape, targets whose mask is 0 become :data:`lm.loss_mask.IGNORE`
    (no loss: the prompt of a supervised example).

    Works on numpy arrays and torch tensors alike (views, no copy, unless masked).
    """
    if rows.ndim != 2 or rows.shape[1] < 2:
        raise ValueError(f"rows must have shape [n, seq_len + 1] with seq_len >= 1, got {tuple(rows.shape)}")
    if loss_mask is not None and tuple(loss_mask.shape) != tuple(rows.shape):
        raise ValueError(f"loss_mask has shape {tuple(loss_mask.shape)}, the rows {tuple(rows.shape)}")
    return rows[:, :-1], masked_targets(rows[:, 1:], None if loss_mask is None else loss_mask[:, 1:])
