"""Choosing the next token, and the rules a generation request's arguments follow (pure torch, no Ray).

The one sampling implementation and the one argument checker of lmforge: ``Transformer.generate``
(lm.model) and the serving engine (lm.serve.engine, through lm.serve.sampling) both use them, so a
setting means the same thing, and a bad one fails with the same message naming it, in either.

    tokens = sample_rows(logits, temperature, top_k, top_p, uniforms)   # [B, V] logits, [B] settings
    temperature, top_k, top_p = row_settings(B, 0.8, 200, None, V, device)   # one setting for every row
    check_settings(max_tokens, temperature, top_k, top_p, where="request")   # ValueError naming the argument
    check_prompt(ids, vocab_size=V, context_length=T, where="request", new_tokens=max_tokens)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def sample_rows(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                uniforms: torch.Tensor) -> torch.Tensor:
    """One token per row of ``logits`` [B, V], each row with its own settings ([B] tensors).

    temperature 0 = greedy (argmax); else logits / temperature, keep the values >= the top_k-th
    largest (top_k >= V: off), then the nucleus (tokens whose preceding mass is < top_p; top_p >= 1:
    off); the token is drawn by inverse CDF with ``uniforms`` (one number in [0, 1) per row), so a
    row's draw depends on its logits and its number only: over the tokens by likelihood for rows with
    top-k / top-p, in vocabulary order (no sort) otherwise.
    """
    greedy = logits.argmax(dim=-1)  # [B]
    sampled_rows = temperature > 0  # [B]
    if not bool(sampled_rows.any()):
        return greedy
    V = logits.size(-1)
    scaled = logits.float() / torch.where(sampled_rows, temperature, 1.0)[:, None]  # [B, V]
    token = _inverse_cdf(scaled.softmax(dim=-1), uniforms)  # rows without top-k / top-p: no sort needed
    filtered = sampled_rows & ((top_k < V) | (top_p < 1))
    if bool(filtered.any()):
        values, order = scaled.sort(dim=-1, descending=True, stable=True)  # [B, V] each
        kth = values.gather(1, (top_k.clamp(1, V) - 1)[:, None])  # [B, 1]
        values = values.masked_fill(values < kth, float("-inf"))
        probs = values.softmax(dim=-1)
        outside = probs.cumsum(dim=-1) - probs >= top_p[:, None]  # the mass before this token reaches top_p
        probs = values.masked_fill(outside, float("-inf")).softmax(dim=-1)
        picked = order.gather(1, _inverse_cdf(probs, uniforms)[:, None]).squeeze(1)  # [B]
        token = torch.where(filtered, picked, token)
    return torch.where(sampled_rows, token, greedy)


def _inverse_cdf(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Per row, the first index whose cumulative mass exceeds u·total (right=True: never a token of
    probability 0)."""
    cdf = probs.cumsum(dim=-1)
    index = torch.searchsorted(cdf, uniforms[:, None].to(cdf) * cdf[:, -1:], right=True)
    return index.clamp(max=probs.size(-1) - 1).squeeze(1)


def row_settings(batch: int, temperature: float, top_k: int | None, top_p: float | None, vocab_size: int,
                 device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The [B] tensors :func:`sample_rows` reads when every row has the same settings (top_k None: the
    vocabulary, i.e. off; top_p None: 1, off)."""
    return (torch.full((batch,), float(temperature), device=device),
            torch.full((batch,), vocab_size if top_k is None else top_k, device=device, dtype=torch.long),
            torch.full((batch,), 1.0 if top_p is None else float(top_p), device=device))


def check_settings(max_tokens: int, temperature: float, top_k: int | None, top_p: float | None, *,
                   where: str = "request", max_tokens_name: str = "max_tokens") -> None:
    """ValueError, naming ``where`` and the argument, unless the token budget (``max_tokens_name``: what
    the caller calls it) is an int >= 0 and temperature, top_k and top_p are in range."""
    if not isinstance(max_tokens, int) or max_tokens < 0:
        raise ValueError(f"{where}: {max_tokens_name} must be an int >= 0, got {max_tokens!r}")
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"{where}: temperature must be a finite number >= 0 (0 = greedy), "
                         f"got {temperature!r}")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"{where}: top_k must be an int >= 1 or None, got {top_k!r}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"{where}: top_p must be in (0, 1] or None, got {top_p!r}")


def check_prompt(ids: Sequence[int], *, vocab_size: int, context_length: int, where: str = "request",
                 new_tokens: int = 0, max_tokens_name: str = "max_tokens") -> None:
    """ValueError, naming ``where``, unless the prompt has a token, only ids of the vocabulary, and fits the
    context with ``new_tokens`` more (0: the caller caps the new tokens to the context itself)."""
    n = len(ids)
    if n == 0:
        raise ValueError(f"{where}: the prompt is empty; it needs at least one token")
    if min(ids) < 0 or max(ids) >= vocab_size:
        raise ValueError(f"{where}: the prompt holds token ids outside [0, vocab_size={vocab_size})")
    if n + new_tokens > context_length:
        plus = f" + {max_tokens_name} {new_tokens} = {n + new_tokens}" if new_tokens else ""
        raise ValueError(f"{where}: prompt of {n} tokens{plus} exceeds the model's context length "
                         f"{context_length} (max_seq_len)")
