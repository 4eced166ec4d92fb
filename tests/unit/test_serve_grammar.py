"""Structured output in the engine (lm.serve.grammar, lm.serve.engine): on the demo model's architecture
(configs/shakespeare-cpu.yaml: 4 layers, 128-token context) with random weights and a real 2048-token BPE
tokenizer, the grammar's mask alone must force valid JSON: 50 schemas drawn from a fixed set of shapes all
finish "stop" and validate; constrained rows leave their batch-mates' outputs unchanged (joining a running
batch too); end-of-text only where the grammar accepts; bounded whitespace; "length" when cut off; an
unsupported schema feature refused before the request joins a batch, naming it."""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import jsonschema
import pytest
import torch

from lm.config import TokenizerConfig, load_config
from lm.model import Transformer
from lm.serve.engine import Engine, GenRequest
from lm.serve.grammar import json_grammar
from lm.serve.sampling import ArgumentError
from lm.tokenizer import train_tokenizer

REPO = Path(__file__).parents[2]
PROMPT = "User: Who speaks first? Answer in JSON.\n\nAssistant:"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tok():
    text = gzip.decompress((REPO / "lm/corpora/tinyshakespeare.txt.gz").read_bytes()).decode()[:300_000]
    return train_tokenizer(iter(text.split("\n\n")), TokenizerConfig(vocab_size=2048))


@pytest.fixture(scope="module")
def engine(tok):
    """The demo model's architecture, randomly initialised (seeded)."""
    cfg = load_config(REPO / "configs/shakespeare-cpu.yaml").model
    assert cfg.max_seq_len == 128
    torch.manual_seed(0)
    model = Transformer(cfg.model_copy(update={"vocab_size": tok.vocab_size})).eval()
    return Engine(model, tok, max_batch_size=8)


def schema_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}


def constrained(tok, schema: dict | None, max_tokens: int | None = None, **kw) -> GenRequest:
    prompt = tok.encode(PROMPT)
    fmt = {"type": "json_object"} if schema is None else schema_format(schema)
    return GenRequest(prompt, max_tokens or 128 - len(prompt), grammar=json_grammar(fmt), **kw)


def valid(text: str, schema: dict) -> None:
    jsonschema.Draft202012Validator(schema).validate(json.loads(text))


def same(a, b) -> None:
    assert (a.token_ids, a.text, a.finish_reason) == (b.token_ids, b.text, b.finish_reason)


def test_fifty_schemas_all_validate_on_the_demo_model(engine, tok, json_schemas):
    schemas = json_schemas(50, seed=19)
    reqs = [constrained(tok, s, temperature=[0.0, 0.7, 1.0, 1.4][i % 4], seed=i) for i, s in enumerate(schemas)]
    done = engine.generate(reqs)
    assert [c.finish_reason for c in done] == ["stop"] * 50  # every shape is bounded: the mask finishes it
    for schema, c in zip(schemas, done, strict=True):
        valid(c.text, schema)
        assert c.text == tok.decode(c.token_ids)
    assert len({c.text for c in done}) > 40
    # streamed: the same pieces add up to the same answers
    pieces = [""] * 8
    for step in engine.stream(reqs[:8]):
        for i, out in enumerate(step):
            pieces[i] += out.text if out is not None else ""
    assert pieces == [c.text for c in done[:8]]


def test_constrained_rows_leave_their_batch_mates_alone(engine, tok, json_schemas):
    """Rows with and without a grammar, together, reversed and joining a running batch: each gets what it
    gets alone (greedy and seeded)."""
    prompt = tok.encode("ROMEO:")
    plain = [GenRequest(prompt, 30, temperature=0), GenRequest(prompt, 24, temperature=0.9, seed=4, top_k=40),
             GenRequest(tok.encode("First Citizen:"), 20, temperature=1.2, seed=8, top_p=0.9, logprobs=True)]
    shaped = [constrained(tok, s, temperature=t, seed=i) for i, (s, t) in enumerate(
        zip(json_schemas(3, seed=5), [0.0, 0.8, 1.3], strict=True))]
    reqs = [plain[0], shaped[0], plain[1], shaped[1], plain[2], shaped[2]]
    alone = [engine.generate([r])[0] for r in reqs]
    for a, b in zip(alone, engine.generate(reqs), strict=True):
        same(a, b)
    for a, b in zip(alone, engine.generate(reqs[::-1])[::-1], strict=True):
        same(a, b)
    batch, got = engine.batch(), {}
    batch.add(reqs[:3], keys=[0, 1, 2])
    step = 0
    while batch:
        for key, out in batch.step():
            got.setdefault(key, []).append(out)
        step += 1
        if step == 3:
            batch.add(reqs[3:], keys=[3, 4, 5])
    for key, a in enumerate(alone):
        assert "".join(o.text for o in got[key]) == a.text and got[key][-1].finish_reason == a.finish_reason
        assert [t for o in got[key] for t in o.token_ids] == a.token_ids
    assert any(a.finish_reason == "stop" for a in alone[1::2]) and alone[0].text != alone[2].text


def test_end_of_text_only_where_the_grammar_accepts_and_whitespace_is_bounded(engine, tok):
    """A model that wants nothing but end-of-text or whitespace (logit_bias +100) still answers whole,
    valid JSON: end-of-text waits until the grammar accepts, and the only whitespace outside strings is the
    fixed separators ", " and ": "."""
    eos = {tok.eos_id: 100.0}
    spaces = {i: 100.0 for i in range(tok.vocab_size) if tok.token_bytes(i) and not tok.token_bytes(i).strip()}
    assert len(spaces) > 3
    integer = {"type": "integer", "minimum": 0, "maximum": 999}
    record = {"type": "object", "properties": {"a": {"type": "string", "maxLength": 3}, "b": integer,
                                                "c": {"type": "array", "items": integer, "maxItems": 3}},
              "required": ["a", "b", "c"], "additionalProperties": False}
    loose = {**record, "x-guidance": {"whitespace_flexible": True, "whitespace_pattern": " *"}}  # overridden
    cases = [(integer, eos), (None, eos), (record, eos), (record, spaces), (None, spaces), (loose, spaces)]
    done = engine.generate([constrained(tok, s, 100, temperature=0.0, logit_bias=b) for s, b in cases])
    for (schema, _), c in zip(cases, done, strict=True):
        if schema is None and c.finish_reason == "length":  # json_object may run on inside a string
            continue
        assert c.finish_reason == "stop", c.text
        valid(c.text, schema or {"type": "object"})
        outside = re.sub(r'"(?:[^"\\]|\\.)*"', '""', c.text)  # the text with every string emptied
        assert not re.search(r"\s", outside.replace(", ", "").replace(": ", "")), c.text
    assert done[0].text.isdigit() and len(done[0].token_ids) == 1  # end-of-text as soon as the grammar accepts


def test_an_answer_cut_off_by_max_tokens_says_length(engine, tok, json_schemas):
    schema = json_schemas(1, seed=3)[0]
    cut = engine.generate([constrained(tok, schema, 4, temperature=0.0)])[0]
    assert cut.finish_reason == "length" and len(cut.token_ids) == 4
    with pytest.raises(json.JSONDecodeError):
        json.loads(cut.text)
    whole = engine.generate([constrained(tok, schema, temperature=0.0)])[0]
    assert whole.finish_reason == "stop" and whole.token_ids[:4] == cut.token_ids
    steps = list(engine.stream([constrained(tok, schema, 4, temperature=0.0)]))
    assert steps[-1][0].finish_reason == "length" and all(s[0].finish_reason is None for s in steps[:-1])


@pytest.mark.parametrize("schema, feature", [
    ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, "uniqueItems"),
    ({"type": "object", "dependentRequired": {"a": ["b"]}}, "dependentRequired"),
    ({"not": {"type": "string"}}, "not"),
    ({"type": "object", "if": {"required": ["a"]}, "then": {"required": ["b"]}}, "if"),
    ({"type": "string", "format": "colour"}, "colour"),
    ({"type": "objekt"}, "objekt"),
    ({"$ref": "#/$defs/Missing"}, "Missing"),
])
def test_an_unsupported_schema_feature_is_refused_before_the_batch_naming_it(engine, tok, schema, feature):
    from lm.serve.engine_process import EngineHandle

    bad = constrained(tok, schema, 10)
    for check in (engine.check, EngineHandle(1, tok, engine.model.cfg).check):  # in the replica, the engine process
        with pytest.raises(ArgumentError, match=re.escape(feature)) as err:
            check(bad)
        assert err.value.param == "response_format"
    with pytest.raises(ValueError, match=re.escape(feature)):
        engine.stream([constrained(tok, None, 10), bad])
    batch = engine.batch()
    batch.add([constrained(tok, None, 3, temperature=0.0)], keys=["ok"])
    with pytest.raises(ArgumentError):
        batch.add([bad], keys=["bad"])
    assert [r.key for r in batch.rows] == ["ok"] and batch.step()[0][0] == "ok"


def test_response_formats_as_grammars():
    assert json_grammar(None) is None and json_grammar({"type": "text"}) is None
    assert json_grammar({"type": "json_object"}) and json_grammar({"type": "json_schema", "json_schema": {"name": "x"}})
    with pytest.raises(ArgumentError, match="yaml") as err:
        json_grammar({"type": "yaml"})
    assert err.value.param == "response_format"
