"""lm.continual.feedback: served completions + feedback → (prompt, response) pairs by the documented
rules; bad records skipped and counted; the loss mask covers the response only."""

from __future__ import annotations

import json
from collections import Counter

from lm.continual.feedback import Pair, parse_lines, sft_pairs, sft_tokens


def test_feedback_rules_and_bad_records():
    lines = [
        json.dumps({"type": "completion", "id": "cmpl-a", "prompts": ["P1", "P2"], "completions": ["a1", "a2"]}),
        json.dumps({"type": "completion", "id": "cmpl-b", "prompts": ["Q"], "completions": ["b1", "b2"]}),
        json.dumps({"type": "chat", "id": "chatcmpl-c", "prompts": ["User: hi"], "completions": ["c1"]}),
        json.dumps({"type": "completion", "id": "cmpl-d", "prompts": ["R"], "completions": ["d1"]}),
        json.dumps({"type": "completion", "id": "cmpl-e", "prompts": ["S"], "completions": ["e1"]}),
        json.dumps({"type": "feedback", "id": "cmpl-a", "rating": 1}),
        json.dumps({"type": "feedback", "id": "cmpl-b", "rating": -1}),
        json.dumps({"type": "feedback", "id": "chatcmpl-c", "rating": -1}),
        json.dumps({"type": "feedback", "id": "chatcmpl-c", "correction": "better"}),  # a later correction wins
        json.dumps({"type": "feedback", "id": "cmpl-zzz", "rating": 1}),
        "not json", "[1, 2]", "",
        json.dumps({"type": "completion", "id": "cmpl-x", "prompts": ["A", "B"], "completions": ["only one"]}),
        json.dumps({"type": "weird", "id": "w"}),
    ]
    counts = Counter()
    records = parse_lines(lines, counts)
    pairs, more = sft_pairs(records)
    counts.update(more)
    assert pairs == [Pair("P1", "a1", "rated", "cmpl-a"), Pair("P2", "a2", "rated", "cmpl-a"),
                     Pair("User: hi", " better", "correction", "chatcmpl-c")]  # a chat reply follows "Assistant:"
    assert counts == Counter({"kept: rated good": 1, "kept: correction": 1, "dropped: rated bad": 1,
                              "dropped: unrated": 2, "skipped: not JSON": 1, "skipped: not an object": 1,
                              "skipped: malformed completion": 1, "skipped: unknown type": 1,
                              "skipped: feedback for an unknown id": 1})
    with_unrated, _ = sft_pairs(records, use_unrated=True)
    assert [p.response for p in with_unrated if p.source == "unrated"] == ["d1", "e1"]


def test_loss_mask_covers_the_response_and_end_of_text(small_tokenizer):
    tok = small_tokenizer
    ids, mask = sft_tokens(tok, Pair("ROMEO: speak", " I will.", "rated", "cmpl-a"))
    n_prompt = len(tok.encode("ROMEO: speak"))
    assert ids[:n_prompt] == tok.encode("ROMEO: speak") and ids[-1] == tok.eos_id
    assert mask == [0] * n_prompt + [1] * (len(ids) - n_prompt)
    assert tok.decode(ids[n_prompt:-1]) == " I will."
