"""What the serving engine adds to lm.sampling's one sampler and argument checker (no Ray): OpenAI's
logit adjustments, logprobs, and the check of a whole request.

    tokens = sample_rows(logits, temperature, top_k, top_p, uniforms)   # lm.sampling's, re-exported
    logits = adjust_logits(logits, generated, presence, frequency, bias)  # OpenAI's penalties and logit_bias
    chosen, top = top_logprobs(logits, tokens, k)                          # logprobs of the chosen, top k
    lps, tops = prompt_logprobs(prompt_logits, prompt_ids, k)              # echo: the prompt's own
    check_request(req, context_length, vocab_size)                         # ValueError before it runs
"""

from __future__ import annotations

import torch

from lm.sampling import check_prompt, check_settings
from lm.sampling import sample_rows as sample_rows  # re-exported: the engine's sampler is lm.sampling's


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


def top_logprobs(logits: torch.Tensor, chosen: torch.Tensor,
                 k: int) -> tuple[list[float], list[list[tuple[int, float]]]]:
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
    this context and vocabulary (lm.sampling's checks; ArgumentError, naming the parameter, for the
    adjustments)."""
    check_settings(req.max_tokens, req.temperature, req.top_k, req.top_p, where=where)
    check_prompt(req.prompt_ids, vocab_size=vocab_size, context_length=context_length, where=where,
                 new_tokens=req.max_tokens)
    check_adjustments(req, vocab_size, where)
