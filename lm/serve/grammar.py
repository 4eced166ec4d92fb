"""Structured output: OpenAI's ``response_format`` as a grammar, and the per-row token masks that enforce it
(constrained decoding in the continuous batch, lm.serve.engine). No Ray, no HTTP.

Runtime dependency: **llguidance** (Microsoft's grammar engine, in pyproject's ``dependencies``). It compiles a
JSON Schema into a grammar, builds its token trie from our own ``tokenizer.json`` (a Hugging Face ``tokenizers``
file, lm.tokenizer) and, per generated token, computes the set of tokens that keep the output on the grammar.
Nothing here writes a JSON grammar by hand.

    grammar = json_grammar({"type": "json_schema", "json_schema": {"name": "x", "schema": {...}}})  # str | None
    check(grammar, tokenizer)                 # ArgumentError(param "response_format") naming what is unsupported
    m = matcher(grammar, tokenizer)           # one per row: llguidance.LLMatcher
    logits = mask_logits(logits, [m, None])   # [B, V]: the rows with a matcher keep only the tokens it allows
    advance(m, token)                         # after sampling: "stop" once the grammar is complete

``{"type": "json_object"}`` is the schema ``{"type": "object"}``; ``json_schema`` without a schema is any JSON
value. Whitespace is bounded: none between tokens, and exactly ``", "`` and ``": "`` as separators
(:data:`JSON_OPTIONS`, applied over a schema's own ``x-guidance`` options), so a small model cannot loop on
spaces. End-of-text is allowed only where the grammar accepts; once the grammar can take nothing more, the row
ends ("stop"). Keywords llguidance does not implement (``dependentSchemas``, unknown ``format`` s, ...) are
compile errors, reported before a request joins a batch.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch

from lm.serve.sampling import ArgumentError
from lm.tokenizer import BPETokenizer

JSON_OPTIONS = {"whitespace_flexible": False, "whitespace_pattern": None, "item_separator": ", ", "key_separator": ": ",
                "lenient": False}  # llguidance's JSON options, over any a schema sets itself (x-guidance)
PARAM = "response_format"
_TOKENIZERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # BPETokenizer -> llguidance.LLTokenizer


def json_grammar(response_format: dict | None) -> str | None:
    """The llguidance grammar of an OpenAI ``response_format`` (as lm.serve.schemas validated it), or None
    for plain text (no format, or ``{"type": "text"}``)."""
    from llguidance import LLMatcher

    kind = (response_format or {}).get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        schema: Any = {"type": "object"}
    elif kind == "json_schema":
        schema = (response_format.get("json_schema") or {}).get("schema") or {}
    else:
        raise ArgumentError(PARAM, f"response_format type {kind!r} is not one of text, json_object, json_schema")
    try:
        return LLMatcher.grammar_from_json_schema(schema, overrides=JSON_OPTIONS)
    except (ValueError, TypeError) as err:
        raise ArgumentError(PARAM, f"response_format: the JSON schema cannot be read: {err}") from None


def lltokenizer(tokenizer: BPETokenizer):
    """llguidance's view of ``tokenizer`` (built from its tokenizer.json once, then cached)."""
    from llguidance import LLTokenizer

    if (ll := _TOKENIZERS.get(tokenizer)) is None:
        ll = _TOKENIZERS[tokenizer] = LLTokenizer(tokenizer.to_json(), n_vocab=tokenizer.vocab_size,
                                                  eos_token=tokenizer.eos_id)
    return ll


def check(grammar: str, tokenizer: BPETokenizer, where: str = "request") -> None:
    """ArgumentError (param ``response_format``) if the grammar does not compile, e.g. a schema keyword
    llguidance does not implement: the message names it."""
    from llguidance import LLMatcher

    is_error, messages = LLMatcher.validate_grammar_with_warnings(grammar, lltokenizer(tokenizer))
    if is_error:
        raise ArgumentError(PARAM, f"{where}: response_format: the JSON schema is not supported: {messages[0]}")


def matcher(grammar: str, tokenizer: BPETokenizer):
    """A fresh matcher (the row's grammar state); ArgumentError if the grammar does not compile."""
    from llguidance import LLMatcher

    m = LLMatcher(lltokenizer(tokenizer), grammar, log_level=0)
    if m.is_error():
        raise ArgumentError(PARAM, f"response_format: the JSON schema is not supported: {m.get_error()}")
    return m


def mask_logits(logits: torch.Tensor, matchers: list, tokenizer: BPETokenizer) -> torch.Tensor:
    """``logits`` [B, V] with the tokens each row's matcher forbids at -inf (a copy; rows whose matcher is
    None are untouched). Columns past the tokenizer's vocabulary are forbidden to constrained rows."""
    rows = [j for j, m in enumerate(matchers) if m is not None]
    if not rows:
        return logits
    V = logits.size(1)
    ours = (lltokenizer(tokenizer).vocab_size + 31) // 32  # the 32-bit words llguidance writes per row
    bits = torch.zeros(len(rows), max(ours, (V + 31) // 32), dtype=torch.int32)  # [G, W]: bit b of word w: 32w+b
    for g, j in enumerate(rows):
        matchers[j].unsafe_compute_mask_ptr(bits[g].data_ptr(), ours * 4)
    allowed = _unpack(bits.to(logits.device), V)  # [G, V] bool
    out = logits.float().clone()  # [B, V]
    index = torch.tensor(rows, device=logits.device)
    out[index] = out[index].masked_fill(~allowed, float("-inf"))
    return out


def _unpack(bits: torch.Tensor, vocab: int) -> torch.Tensor:
    """[G, W] int32 bitmasks (bit b of word w: token 32·w + b) -> [G, vocab] bool."""
    shifts = torch.arange(32, dtype=torch.int32, device=bits.device)
    return ((bits[:, :, None] >> shifts) & 1).bool().flatten(1)[:, :vocab]  # [G, W, 32] -> [G, W·32] -> [G, V]


def advance(m, token: int) -> str | None:
    """The matcher takes a sampled token: "stop" once the grammar is complete (it takes nothing more but
    end-of-text), else None. "length" if the matcher failed, which the mask should make impossible: such a
    row ends without claiming a valid answer."""
    if not m.consume_token(token):
        return "length"
    return "stop" if m.is_stopped() else None


def accepts(m) -> bool:
    """Whether a row may end here as a valid answer (always, without a grammar)."""
    return m is None or (m.is_accepting() and not m.is_error())
