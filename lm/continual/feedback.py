"""Served traffic as training examples: the JSONL records Serve's feedback capture writes
(lm.serve.feedback: ``completion`` / ``chat`` records with prompts and completions, ``feedback``
records with a rating and/or a correction for a completion id) joined into (prompt, response)
pairs, and a pair turned into tokens whose loss covers the response only. Pure functions: no Ray.

    pairs, counts = sft_pairs(records, use_unrated=False)
    ids, loss_mask = sft_tokens(tokenizer, pair)     # mask 1 on response tokens and the end-of-text

Rules: a correction replaces the answer (the pair is prompt → correction); a rating of 1 keeps the
model's answer; a rating of -1 without a correction drops it; unrated (or 0) answers are kept only
with ``use_unrated``. Records that cannot be read are skipped and counted by reason. A chat record's
prompt is already the chat template's text; its answers and corrections become the reply as the model
writes it after ``Assistant:`` (lm.chat.assistant_reply), and the tokens are lm.chat.sft_tokens', the
same as supervised fine-tuning data (``data.format: sft``).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

from lm import chat
from lm.tokenizer import BPETokenizer


@dataclass(frozen=True)
class Pair:
    prompt: str
    response: str
    source: str  # "correction" | "rated" | "unrated"
    id: str


def parse_lines(lines: Iterable[str], counts: Counter) -> list[dict]:
    """JSON objects from JSONL lines; blank lines ignored, the rest that are not objects counted."""
    out = []
    for line in lines:
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            counts["skipped: not JSON"] += 1
            continue
        if isinstance(record, dict):
            out.append(record)
        else:
            counts["skipped: not an object"] += 1
    return out


def sft_pairs(records: Iterable[dict], *, use_unrated: bool = False) -> tuple[list[Pair], Counter]:
    """(prompt, response) pairs from completion and feedback records (see the module docstring), in
    the order the completions were recorded, and counts of what was kept and skipped, by reason."""
    counts: Counter = Counter()
    completions: dict[str, dict] = {}
    feedback: dict[str, dict] = {}
    for r in records:
        kind, rid = r.get("type"), r.get("id")
        if not isinstance(rid, str) or not rid:
            counts["skipped: no id"] += 1
        elif kind in ("completion", "chat"):
            prompts, texts = r.get("prompts"), r.get("completions")
            if (not isinstance(prompts, list) or not isinstance(texts, list) or not prompts or not texts
                    or len(texts) % len(prompts) or not all(isinstance(x, str) for x in prompts + texts)):
                counts["skipped: malformed completion"] += 1
                continue
            completions[rid] = r
        elif kind == "feedback":
            entry = feedback.setdefault(rid, {})  # later feedback on the same id overrides earlier fields
            entry.update({k: r[k] for k in ("rating", "correction") if r.get(k) is not None})
        else:
            counts["skipped: unknown type"] += 1
    pairs: list[Pair] = []
    for rid, r in completions.items():
        prompts, texts = r["prompts"], r["completions"]
        n = len(texts) // len(prompts)  # choices per prompt, in prompt order
        fb = feedback.get(rid, {})
        correction, rating = fb.get("correction"), fb.get("rating")
        if r["type"] == "chat":  # the reply as the model writes it after "Assistant:"
            texts = [chat.assistant_reply(t) if t.strip() else t for t in texts]
            correction = chat.assistant_reply(correction) if isinstance(correction, str) else correction
        if isinstance(correction, str) and correction.strip():
            pairs.append(Pair(prompts[0], correction, "correction", rid))
            counts["kept: correction"] += 1
        elif rating == 1:
            pairs += [Pair(prompts[i // n], t, "rated", rid) for i, t in enumerate(texts) if t.strip()]
            counts["kept: rated good"] += 1
        elif rating == -1:
            counts["dropped: rated bad"] += 1
        elif use_unrated:
            pairs += [Pair(prompts[i // n], t, "unrated", rid) for i, t in enumerate(texts) if t.strip()]
            counts["kept: unrated"] += 1
        else:
            counts["dropped: unrated"] += 1
    counts["skipped: feedback for an unknown id"] += len(set(feedback) - set(completions))
    return pairs, +counts  # (unary + drops zero counts)


def sft_tokens(tokenizer: BPETokenizer, pair: Pair) -> tuple[list[int], list[int]]:
    """The example's token ids (prompt, response, end-of-text) and a loss mask over them: 1 where the
    token is part of the response (or the end-of-text after it), 0 on the prompt (lm.chat.sft_tokens)."""
    return chat.sft_tokens(tokenizer, pair.prompt, pair.response)
