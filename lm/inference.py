"""Text in, text out: prompts → token ids → ``Transformer.generate`` → text, with stop strings.

Shared by ``lm generate``, the demo and the serving engine.

    texts = generate_text(model, tokenizer, ["ROMEO:"], cfg.generate)
"""

from __future__ import annotations

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
