"""Sampling one token per row of a batch, each row with its own settings (no Ray).

    tokens = sample_rows(logits, temperature, top_k, top_p, uniforms)   # [B, V] logits, [B] settings
"""

from __future__ import annotations

import torch


def sample_rows(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                uniforms: torch.Tensor) -> torch.Tensor:
    """One token per row of ``logits`` [B, V], each row with its own settings ([B] tensors).

    temperature 0 = greedy (argmax); else logits / temperature, keep the values >= the top_k-th
    largest (top_k >= V: off), then the nucleus (tokens whose preceding mass is < top_p; top_p >= 1:
    off), as :func:`lm.model.sample_next` does; the token is drawn by inverse CDF with ``uniforms``
    (one number in [0, 1) per row), so a row's draw depends on its logits and its number only: over
    the tokens by likelihood for rows with top-k / top-p, in vocabulary order (no sort) otherwise.
    """
    greedy = logits.argmax(dim=-1)
    sampled_rows = temperature > 0
    if not bool(sampled_rows.any()):
        return greedy
    V = logits.size(-1)
    scaled = logits.float() / torch.where(sampled_rows, temperature, 1.0)[:, None]
    token = _inverse_cdf(scaled.softmax(dim=-1), uniforms)  # rows without top-k / top-p: no sort needed
    filtered = sampled_rows & ((top_k < V) | (top_p < 1))
    if bool(filtered.any()):
        values, order = scaled.sort(dim=-1, descending=True, stable=True)
        kth = values.gather(1, (top_k.clamp(1, V) - 1)[:, None])
        values = values.masked_fill(values < kth, float("-inf"))
        probs = values.softmax(dim=-1)
        outside = probs.cumsum(dim=-1) - probs >= top_p[:, None]  # the mass before this token reaches top_p
        probs = values.masked_fill(outside, float("-inf")).softmax(dim=-1)
        token = torch.where(filtered, order.gather(1, _inverse_cdf(probs, uniforms)[:, None]).squeeze(1), token)
    return torch.where(sampled_rows, token, greedy)


def _inverse_cdf(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Per row, the first index whose cumulative mass exceeds u·total (right=True: never a token of
    probability 0)."""
    cdf = probs.cumsum(dim=-1)
    index = torch.searchsorted(cdf, uniforms[:, None].to(cdf) * cdf[:, -1:], right=True)
    return index.clamp(max=probs.size(-1) - 1).squeeze(1)
