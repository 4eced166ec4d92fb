"""The count-based baseline: an interpolated Kneser-Ney n-gram language model over token ids (numpy).

Fitted on the train split's packed rows and scored on exactly the rows (and target tokens) the
transformer is scored on, so its bits per byte stand beside the model's in every report: how far above
a "statistical language model" the transformer is. Contexts stay within a row, as the transformer's do.

Why hand-written: ``nltk.lm`` scores one n-gram at a time through Python dictionaries and takes minutes
for tinyshakespeare's ~300k tokens; here every order is a sorted array of int64 n-gram keys
(``t1·V^(k-1) + … + tk``) looked up with ``np.searchsorted``, which fits and scores that corpus in
about a second.

The estimate (Chen & Goodman's interpolated Kneser-Ney, one discount per order):

    P_k(w | h) = max(c_k(h w) − D_k, 0) / c_k(h ·)  +  D_k · T_k(h) / c_k(h ·) · P_{k−1}(w | h')

``c_n`` counts n-grams; lower orders count continuations (the distinct tokens seen before ``h w``);
``T_k(h)`` is the number of distinct ``w`` after ``h``; ``D_k = n1 / (n1 + 2 n2)`` from the counts of
counts. The unigram level interpolates with the uniform distribution over the vocabulary, so every id
has a probability and each ``P(· | h)`` sums to 1. A context never seen falls back to the order below;
the first tokens of a row use the orders their short context allows.

    lm = NGramLM.fit(train_rows, order=3, vocab_size=tok.vocab_size)
    nll = lm.nll(eval_rows)               # nats over rows[:, 1:], padding (< 0) skipped
    p = lm.prob([5, 7], np.arange(V))     # P(w | 5 7) for every w
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lm.data.pack import rows_to_inputs_targets

_MAX_KEY = 2**63


@dataclass
class _Level:
    """One order k: sorted keys of k-grams with their counts, and per context (the first k−1 ids) the
    sorted context keys, count totals and numbers of distinct followers."""

    keys: np.ndarray
    counts: np.ndarray
    contexts: np.ndarray
    totals: np.ndarray
    types: np.ndarray
    discount: float


def _windows(rows: np.ndarray, k: int) -> np.ndarray:
    """Every k-gram inside a row, as an int64 array of shape [m, k] (padding windows dropped)."""
    if rows.shape[1] < k:
        return np.zeros((0, k), dtype=np.int64)
    win = np.lib.stride_tricks.sliding_window_view(rows, k, axis=1).reshape(-1, k)
    return win[(win >= 0).all(axis=1)].astype(np.int64)


def _encode(grams: np.ndarray, vocab_size: int) -> np.ndarray:
    key = np.zeros(len(grams), dtype=np.int64)
    for j in range(grams.shape[1]):
        key = key * vocab_size + grams[:, j]
    return key


def _discount(counts: np.ndarray) -> float:
    n1, n2 = int((counts == 1).sum()), int((counts == 2).sum())
    d = n1 / (n1 + 2 * n2) if n1 + n2 else 0.75
    return d if 0 < d < 1 else 0.75


def _level(keys: np.ndarray, counts: np.ndarray, vocab_size: int) -> _Level:
    ctx = keys // vocab_size  # keys sorted → contexts sorted
    contexts, starts, types = np.unique(ctx, return_index=True, return_counts=True)
    totals = np.add.reduceat(counts, starts) if len(counts) else np.zeros(0, dtype=np.int64)
    return _Level(keys, counts, contexts, totals, types, _discount(counts))


def _lookup(sorted_keys: np.ndarray, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(index, found) of each query in ``sorted_keys``."""
    idx = np.searchsorted(sorted_keys, queries)
    idx = np.minimum(idx, max(len(sorted_keys) - 1, 0))
    found = (sorted_keys[idx] == queries) if len(sorted_keys) else np.zeros(len(queries), dtype=bool)
    return idx, found


class NGramLM:
    """An interpolated Kneser-Ney n-gram model over token ids (see the module doc)."""

    def __init__(self, order: int, vocab_size: int, raw: list[_Level], continuation: list[_Level]):
        self.order, self.vocab_size = order, vocab_size
        self.raw, self.continuation = raw, continuation  # per order 1..n; continuation: 1..n-1

    @classmethod
    def fit(cls, rows: np.ndarray, order: int, vocab_size: int) -> NGramLM:
        """Count every n-gram (n ≤ ``order``) inside the rows of ``rows`` [n_rows, width] (ids < vocab_size)."""
        if order < 1:
            raise ValueError(f"n-gram order must be >= 1, got {order}")
        if vocab_size < 1 or vocab_size**order >= _MAX_KEY:
            raise ValueError(f"vocab_size {vocab_size} ** order {order} does not fit in int64 n-gram keys: "
                             "lower eval.ngram_order")
        rows = np.asarray(rows)
        if rows.ndim != 2:
            raise ValueError(f"rows must be 2-D [n_rows, width], got shape {rows.shape}")
        if rows.size and rows.max() >= vocab_size:
            raise ValueError(f"token id {int(rows.max())} is outside the vocabulary of {vocab_size}")
        raw, continuation = [], []
        for k in range(1, order + 1):
            keys, counts = np.unique(_encode(_windows(rows, k), vocab_size), return_counts=True)
            raw.append(_level(keys, counts, vocab_size))
            if k < order:  # continuation counts: distinct left neighbours of each k-gram
                longer = np.unique(_encode(_windows(rows, k + 1), vocab_size))
                keys, counts = np.unique(longer % vocab_size**k, return_counts=True)
                continuation.append(_level(keys, counts, vocab_size))
        return cls(order, vocab_size, raw, continuation)

    def _unigram(self, level: _Level) -> np.ndarray:
        """P_1 over the whole vocabulary: discounted counts interpolated with the uniform distribution."""
        V = self.vocab_size
        total = float(level.counts.sum())
        if total == 0:
            return np.full(V, 1.0 / V)
        counts = np.zeros(V, dtype=np.float64)
        counts[level.keys] = level.counts
        d = level.discount
        return np.maximum(counts - d, 0) / total + d * len(level.keys) / total / V

    def _mix(self, level: _Level, contexts: np.ndarray, targets: np.ndarray, lower: np.ndarray) -> np.ndarray:
        """P_k(target | context) from the lower order's P_{k-1} (contexts: the k − 1 ids before each target)."""
        V = self.vocab_size
        if not len(level.keys):
            return lower
        ctx = _encode(contexts, V)
        at, seen = _lookup(level.contexts, ctx)
        gram_at, gram_seen = _lookup(level.keys, ctx * V + targets)
        c = np.where(gram_seen, level.counts[gram_at], 0).astype(np.float64)
        mixed = (np.maximum(c - level.discount, 0) + level.discount * level.types[at] * lower) / np.maximum(
            level.totals[at], 1)
        return np.where(seen, mixed, lower)

    def _probs(self, contexts: np.ndarray, context_len: np.ndarray, targets: np.ndarray) -> np.ndarray:
        """P(target | the last ``context_len`` ids of each context row) [m]; contexts [m, order − 1].

        The highest order a query's context allows uses raw counts, the orders below it continuation counts."""
        top = np.minimum(context_len + 1, self.order)
        out = self._unigram(self.raw[0])[targets]
        if self.order == 1:
            return out
        p = self._unigram(self.continuation[0])[targets]
        for k in range(2, self.order + 1):
            usable = top >= k
            if not usable.any():
                break
            ctx = contexts[usable][:, contexts.shape[1] - (k - 1):]
            lower = p[usable]
            final = top[usable] == k
            out[np.flatnonzero(usable)[final]] = self._mix(self.raw[k - 1], ctx[final], targets[usable][final],
                                                           lower[final])
            if k < self.order:
                p[usable] = self._mix(self.continuation[k - 1], ctx, targets[usable], lower)
        return out

    def prob(self, context: list[int] | np.ndarray, tokens: np.ndarray) -> np.ndarray:
        """P(w | context) for each w in ``tokens`` (only the last order − 1 context ids matter)."""
        tokens = np.asarray(tokens, dtype=np.int64)
        width = self.order - 1
        ctx = np.asarray(list(context)[-width:] if width else [], dtype=np.int64)
        padded = np.concatenate([np.zeros(width - len(ctx), dtype=np.int64), ctx])
        contexts = np.broadcast_to(padded, (len(tokens), width))
        return self._probs(contexts, np.full(len(tokens), len(ctx)), tokens)

    def log_probs(self, rows: np.ndarray, loss_mask: np.ndarray | None = None) -> np.ndarray:
        """ln P(row[j] | row[j − order + 1 : j]) for the targets ``rows[:, 1:]``; 0 where the target is not
        scored (negative: padding, or loss mask 0 with a ``loss_mask`` of the rows' shape)."""
        rows = np.asarray(rows, dtype=np.int64)
        n, width = rows.shape
        w = self.order - 1
        ids = np.maximum(rows, 0)  # contexts read every token (padding as 0), scored or not
        padded = np.concatenate([np.zeros((n, w), dtype=np.int64), ids], axis=1)  # context ids before row start
        positions = np.arange(1, width)
        _, targets = rows_to_inputs_targets(rows, loss_mask)
        keep = targets >= 0
        if w:
            ctx = np.stack([padded[:, positions + i] for i in range(w)], axis=-1)  # [n, width − 1, w]
        else:
            ctx = np.zeros((n, width - 1, 0), dtype=np.int64)
        ctx_len = np.broadcast_to(np.minimum(positions, w), (n, width - 1))
        out = np.zeros((n, width - 1), dtype=np.float64)
        out[keep] = np.log(self._probs(ctx[keep], ctx_len[keep], targets[keep]))
        return out

    def nll(self, rows: np.ndarray, chunk_rows: int = 4096, loss_mask: np.ndarray | None = None) -> float:
        """Summed negative log-likelihood (nats) of the scored targets of ``rows`` (as :meth:`log_probs`), in
        chunks."""
        total = 0.0
        for i in range(0, len(rows), chunk_rows):
            mask = None if loss_mask is None else loss_mask[i : i + chunk_rows]
            total -= self.log_probs(rows[i : i + chunk_rows], mask).sum()
        return float(total)
