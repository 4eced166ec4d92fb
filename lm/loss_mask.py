"""The one encoding of a target that carries no loss (a leaf: it imports nothing of lm).

On disk a supervised row's loss mask is its own column (``loss_mask``, uint8, 1 = scored: lm.data.loader);
in memory a target the loss skips is :data:`IGNORE` (-100, PyTorch's ``cross_entropy`` ``ignore_index``).
:func:`masked_targets` is the one place the first becomes the second, for training (lm.data.pack,
lm.model, lm.train) and evaluation (lm.eval.metrics, lm.eval.ngram) alike; the inputs keep every id.

    targets = masked_targets(rows[:, 1:], loss_mask[:, 1:])   # numpy or torch; loss-mask-0 targets -> IGNORE
"""

from __future__ import annotations

IGNORE = -100  # a target without loss: F.cross_entropy(..., ignore_index=IGNORE)


def masked_targets(targets, keep):
    """A copy of ``targets`` (numpy array or torch tensor) with :data:`IGNORE` where ``keep`` (a loss mask of
    the same shape) is 0; ``keep`` None: ``targets`` itself."""
    if keep is None:
        return targets
    if tuple(keep.shape) != tuple(targets.shape):
        raise ValueError(f"loss_mask has shape {tuple(keep.shape)}, the targets {tuple(targets.shape)}")
    out = targets.clone() if hasattr(targets, "clone") else targets.copy()
    out[keep == 0] = IGNORE
    return out
