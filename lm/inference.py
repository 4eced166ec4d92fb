"""Text in, text out: prompts → token ids → ``Transformer.generate`` → text, with stop strings.

Shared by ``lm generate``, the demo and the serving engine.

    texts = generate_text(model, tokenizer, ["ROMEO:"], cfg.generate)
    vectors = embed_ids(model, [tokenizer.encode("ROMEO:")])   # /v1/embeddings
"""

from __future__ import annotations

import torch

from lm.config import GenerateConfig
from lm.model import Transformer
from lm.tokenizer import BPETokenizer


def cut_at_stop(text: str, stop: list[str]) -> tuple[str, bool]:
    """Cut ``text`` before the earliest stop string; also say whether one was found."""
    hits = [i for i in (text.find(s) for s in stop if s) if i >= 0]
    return (text[: min(hits)], True) if hits else (text, False)


def generate_text(
    model: Transformer, tokenizer: BPETokenizer, prompts: list[str], gen: GenerateConfig
) -> list[str]:
    """Continue each prompt (an empty prompt starts from end-of-text, i.e. a fresh document)."""
    prompt_ids = [tokenizer.encode(p) or [tokenizer.eos_id] for p in prompts]
    stop_hook = None
    if gen.stop:
        def stop_hook(_row: int, new_ids: list[int]) -> bool:
            return cut_at_stop(tokenizer.decode(new_ids), gen.stop)[1]

    outputs = model.generate(
        prompt_ids,
        gen.max_new_tokens,
        temperature=gen.temperature,
        top_k=gen.top_k,
        top_p=gen.top_p,
        eos_id=None if gen.ignore_eos else tokenizer.eos_id,
        seed=gen.seed,
        stop=stop_hook,
    )
    return [cut_at_stop(tokenizer.decode(ids), gen.stop)[0] for ids in outputs]


@torch.no_grad()
def embed_ids(model: Transformer, id_lists: list[list[int]], batch_size: int = 16) -> list[list[float]]:
    """One vector per token list: the mean of the final normed hidden states over its tokens, scaled to
    unit length (so a dot product is the cosine similarity). Rows are right-padded in a batch; a causal
    model's real tokens never attend to the padding after them, so padding changes nothing."""
    if any(not ids for ids in id_lists):
        raise ValueError("cannot embed an empty token list")
    device = next(model.parameters()).device
    vectors: list[list[float]] = []
    for i in range(0, len(id_lists), batch_size):
        chunk = id_lists[i : i + batch_size]
        width = max(len(ids) for ids in chunk)
        ids = torch.tensor([row + [0] * (width - len(row)) for row in chunk], device=device)
        real = torch.tensor([[1.0] * len(row) + [0.0] * (width - len(row)) for row in chunk], device=device)
        hidden = model.hidden_states(ids).float()
        mean = (hidden * real[..., None]).sum(1) / real.sum(1, keepdim=True)
        vectors += torch.nn.functional.normalize(mean, dim=-1).tolist()
    return vectors
