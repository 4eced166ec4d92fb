"""Sampling one token per row of a batch, each row with its own settings (no Ray).

    tokens = sample_rows(logits, temperature, top_k, top_p, uniforms)   # [B, V] logits, [B] settings
    logits = adjust_logits(logits, generated, presence, frequency, bias)  # OpenAI's penalties and logit_bias
    chosen, top = top_logprobs(logits, tokens, k)                          # logprobs of the chosen, top k
    lps, tops = prompt_logprobs(prompt_logits, prompt_ids, k)              # echo: the prompt's own
    check_request(req, context_length, vocab_size)                         # ValueError before it runs
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


def adjust_logits(logits: torch.Tensor, generated: list[list[int]], presence: list[float], frequency: list[float],
                  bias: list[dict[int, float] | None]) -> torch.Tensor:
    """OpenAI's per-row logit adjustments (float32 copy of ``logits`` [B, V]): + ``bias[j]`` (token id → bias)
    - presence[j]·(count > 0) - frequency[j]·count, count = the times each token is in ``generated[j]`` (the
    row's tokens so far)."""
    out = logits.float().clone()
    B, V = out.shape
    if any(bias):
        at = [(j, t, b) for j, row in enumerate(bias) for t, b in (row or {}).items()]
        rows, cols, vals = (torch.tensor(x, device=out.device) for x in zip(*at, strict=True))
        out.index_put_((rows, cols), vals.float(), accumulate=True)
    if any(presence) or any(frequency):
        counts = torch.zeros(B, V, device=out.device)
        for j, ids in enumerate(generated):
            if ids:
                counts[j].index_add_(0, torch.tensor(ids, device=out.device), torch.ones(len(ids), device=out.device))
        p = torch.tensor(presence, device=out.device)[:, None]
        f = torch.tensor(frequency, device=out.device)[:, None]
        out -= p * (counts > 0) + f * counts
    return out


def top_logprobs(logits: torch.Tensor, chosen: torch.Tensor, k: int) -> tuple[list[float], list[list[tuple[int, float]]]]:
    """Per row of ``logits`` [B, V]: the log-probability (log-softmax) of its ``chosen`` token, and its ``k``
    likeliest tokens as (id, logprob), likeliest first."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    picked = logp.gather(1, chosen[:, None]).squeeze(1).tolist()
    if k <= 0:
        return picked, [[] for _ in picked]
    values, ids = logp.topk(min(k, logp.size(-1)), dim=-1)
    return picked, [list(zip(i, v, strict=True)) for i, v in zip(ids.tolist(), values.tolist(), strict=True)]


def prompt_logprobs(logits: torch.Tensor, ids: list[int], k: int) -> tuple[list[float | None], list[list | None]]:
    """The log-probability of each prompt token given the ones before it, and its ``k`` likeliest
    alternatives, from the prompt's own logits [n, V] (position t predicts token t + 1); the first token has
    no context: None for both (OpenAI's echo)."""
    chosen = torch.tensor(ids[1:], device=logits.device)  # [n - 1]
    picked, tops = top_logprobs(logits[:-1], chosen, k)
    return [None, *picked], [None, *tops]


class ArgumentError(ValueError):
    """A request argument out of its range; ``param`` names it (the API's 400 says which)."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


def check_adjustments(req, vocab: int, where: str) -> None:
    """ArgumentError unless the penalties, logit_bias and top_logprobs are in OpenAI's ranges and the vocabulary."""
    for name in ("presence_penalty", "frequency_penalty"):
        if not -2 <= getattr(req, name) <= 2:
            raise ArgumentError(name, f"{where}: {name} must be in [-2, 2], got {getattr(req, name)!r}")
    if bad := [t for t in req.logit_bias or {} if not (isinstance(t, int) and 0 <= t < vocab)]:
        raise ArgumentError("logit_bias", f"{where}: logit_bias names token ids outside the vocabulary "
                            f"[0, {vocab}): {bad[:3]}")
    if bad := [b for b in (req.logit_bias or {}).values() if not -100 <= b <= 100]:
        raise ArgumentError("logit_bias", f"{where}: logit_bias values must be in [-100, 100], got {bad[:3]}")
    if not (isinstance(req.top_logprobs, int) and 0 <= req.top_logprobs <= 20):
        raise ArgumentError("top_logprobs", f"{where}: top_logprobs must be an int in [0, 20], "
                            f"got {req.top_logprobs!r}")


def check_request(req, context_length: int, vocab_size: int, where: str = "request") -> None:
    """Raise ValueError (naming ``where``) if ``req`` (an lm.serve.engine.GenRequest) cannot run on a model of
    this context and vocabulary (ArgumentError, naming the parameter, for the adjustments)."""
    ctx, vocab = context_length, vocab_size
    n = len(req.prompt_ids)
    if n == 0:
        raise ValueError(f"{where}: the prompt is empty; it needs at least one token")
    if min(req.prompt_ids) < 0 or max(req.prompt_ids) >= vocab:
        raise ValueError(f"{where}: the prompt holds token ids outside [0, vocab_size={vocab})")
    if not isinstance(req.max_tokens, int) or req.max_tokens < 0:
        raise ValueError(f"{where}: max_tokens must be an int >= 0, got {req.max_tokens!r}")
    if n + req.max_tokens > ctx:
        raise ValueError(f"{where}: prompt of {n} tokens + max_tokens {req.max_tokens} = "
                         f"{n + req.max_tokens} exceeds the model's context length {ctx}")
    if not (req.temperature >= 0 and req.temperature != float("inf")):
        raise ValueError(f"{where}: temperature must be a finite number >= 0, got {req.temperature!r}")
    if req.top_k is not None and (not isinstance(req.top_k, int) or req.top_k < 1):
        raise ValueError(f"{where}: top_k must be an int >= 1 or None, got {req.top_k!r}")
    if req.top_p is not None and not 0 < req.top_p <= 1:
        raise ValueError(f"{where}: top_p must be in (0, 1] or None, got {req.top_p!r}")
    check_adjustments(req, vocab, where)
