"""Log-likelihood requests scored with lmforge's own Transformer, as lm-evaluation-harness scores them.

A request is a (context, continuation) pair; its answer is ln P(continuation | context) summed over the
continuation's tokens, and whether greedy decoding would have produced exactly those tokens. Tokens are
split the way the harness's causal-LM backends split them (``TemplateLM._encode_pair``): whitespace at the
end of the context moves to the continuation, the pair is encoded whole and cut after the context's own
tokens; an empty context becomes the end-of-text token; a pair longer than the model's context keeps its
last ``max_seq_len + 1`` tokens. So the numbers are comparable, request by request, with the harness's
``resps`` on the model directory (HF backend) and on a running endpoint (``local-completions``).

    results = loglikelihoods(model, tok, [("ROMEO:\\nBut soft, what light", " breaks")])
    [(logprob, is_greedy)]
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lm.model import Transformer
from lm.tokenizer import BPETokenizer


def encode_pair(tok: BPETokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """The context's and the continuation's token ids, split as the harness splits them."""
    if not context:
        return [tok.eos_id], tok.encode(continuation)
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole, ctx = tok.encode(context + continuation), tok.encode(context)
    return ctx, whole[len(ctx):]


@torch.no_grad()
def loglikelihoods(model: Transformer, tok: BPETokenizer, requests: Sequence[tuple[str, str]],
                   batch_size: int = 16) -> list[tuple[float, bool]]:
    """(ln P(continuation | context), greedy) for each (context, continuation) request, in float32."""
    max_len = model.cfg.max_seq_len
    rows = []
    for context, continuation in requests:
        ctx, cont = encode_pair(tok, context, continuation)
        if not cont or len(cont) > max_len:
            raise ValueError(f"continuation {continuation!r} has {len(cont)} tokens; need 1 to {max_len}")
        ids = (ctx + cont)[-(max_len + 1):]
        rows.append((ids[:-1], cont))
    was_training = model.training
    model.eval()
    out: list[tuple[float, bool]] = []
    try:
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            ids = torch.zeros(len(chunk), max(len(i) for i, _ in chunk), dtype=torch.long)  # right padding: unseen
            for row, (inputs, _) in enumerate(chunk):
                ids[row, : len(inputs)] = torch.tensor(inputs)
            logp = torch.log_softmax(model(ids)[0].float(), dim=-1)
            for row, (inputs, cont) in enumerate(chunk):
                picked = logp[row, len(inputs) - len(cont) : len(inputs)]
                target = torch.tensor(cont)
                out.append((picked[torch.arange(len(cont)), target].double().sum().item(),
                            bool((picked.argmax(dim=-1) == target).all())))
    finally:
        model.train(was_training)
    return out
