"""Ray Serve end to end over real HTTP on 127.0.0.1: the official `openai` client (plain and streaming),
auth, every class of bad input (4xx, never 5xx), concurrency with batching, the response cache,
feedback capture, embeddings, retrieval-augmented prompts with their sources, named prompt templates,
hot reload under load with no failed request, the model in the ingress's replicas (serve.colocate),
following the registry's production alias (promotion and rollback), autoscaling 1 → 2 → 1, and structured output
(response_format) on the demo model's architecture."""

import json
import os
import random
import re
import signal
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal

import httpx
import numpy as np
import openai
import pytest
import schemathesis
from schemathesis.config import SchemathesisConfig
from serving import KEY, free_port, model_dir, settles_on, under_load

from lm.config import load_config
from lm.serve import app, schemas
from lm.storage import ObjectStore

pytestmark = [pytest.mark.ray, pytest.mark.slow]

REPO = Path(__file__).parents[2]
LIMITED = {"busy": "sk-busy-0123456789abc", "rpm": "sk-rpm-0123456789abcd", "tpm": "sk-tpm-0123456789abcd"}
KEY_FILE = f"""keys:
  - {{name: busy, key: {LIMITED['busy']}, max_concurrent: 1}}
  - {{name: rpm, key: {LIMITED['rpm']}, requests_per_minute: 3}}
  - {{name: tpm, key: {LIMITED['tpm']}, tokens_per_minute: 20}}
"""
# The one exclusion from schemathesis' checks: positive_data_acceptance takes a 400 (added to its statuses) if
# it names a limit of the deployment, which the schema cannot know: serve.max_tokens_limit, max_n, max_prompts,
# max_embedding_inputs, the model's context, vocabulary (prompt token ids, logit_bias) and width, serve.rag,
# rag.max_top_k, serve.templates, and a response_format JSON schema using a keyword the grammar engine does
# not implement.
# (A schema-valid prompt longer than the context is a correct 400.) at_deployment_limits checks the param.
DEPLOYMENT_LIMITS = {"max_tokens", "n", "prompt", "input", "dimensions", "rag", "rag.top_k", "template",
                     "template_vars", "logit_bias", "response_format"}
FUZZ = {"headers": {"Authorization": f"Bearer {KEY}"}, "request-timeout": 60, "checks": {
            "enabled": True, "positive_data_acceptance": {"expected-statuses": ["2xx", "400", "401", "404", "429"]}},
        "phases": {"examples": {"enabled": True}, "coverage": {"enabled": True}, "fuzzing": {"enabled": True}},
        "generation": {"max-examples": 300}, "suppress-health-check": ["too_slow"],  # a loaded 2-core machine
        # most bodies name the served model and ask for few tokens, so they reach the model, not a 404 or 400
        "dictionaries": {"served": {"values": ["lmforge"]}, "few": {"values": [1, 2, 5]}},
        "parameters": {"body.model": {"dictionary": "served", "probability": 0.8},
                       "body.max_tokens": {"dictionary": "few", "probability": 0.5}}}
FUZZED = schemathesis.openapi.from_dict(schemas.openapi_schema(app.api), config=SchemathesisConfig.from_dict(FUZZ))
FACTS = {"zembla.txt": "The capital of Zembla is Quixotl.\n\nZembla exports amber.",
         "orbis.txt": "Orbis is ruled by librarians with lanterns.",
         "rain.txt": "Rain falls on the northern hills."}


@pytest.fixture(scope="module")
def server(ray_session, tmp_path_factory, monkeypatch_module):
    from ray import serve

    from lm.rag import build_index
    from lm.serve.deploy import start

    root = tmp_path_factory.mktemp("serve")
    monkeypatch_module.setenv("LMFORGE_API_KEYS", f"sk-other-key-0123456789,{KEY}")
    port = free_port()
    (root / "facts").mkdir()
    for name, text in FACTS.items():
        (root / "facts" / name).write_text(text)
    (root / "keys.yaml").write_text(KEY_FILE)
    overrides = [f"storage.root={root}", f"serve.port={port}", "serve.max_batch_size=4", "serve.replica_cpus=0.5",
                 "serve.rag=true", f"rag.sources=[{{name: facts, uri: '{root}/facts'}}]", "rag.passage_words=8",
                 "rag.overlap_words=2", 'serve.templates={qa: "Q: {prompt} ({tone})\\nA:"}',
                 "serve.autoscaling.max_replicas=2", "serve.autoscaling.target_ongoing_requests=2",
                 "serve.autoscaling.upscale_delay_s=1", "serve.autoscaling.downscale_delay_s=4",
                 "serve.feedback.enabled=true", "serve.feedback.flush_interval_s=0.5", "serve.max_body_bytes=20000",
                 f"serve.api_keys_file={root}/keys.yaml"]
    cfg = load_config(REPO / "configs/tiny.yaml", overrides)
    store = ObjectStore(cfg.storage)
    first = model_dir(store, cfg, f"{root}/models/v1", seed=1)
    second = model_dir(store, cfg, f"{root}/models/v2", seed=2)
    cfg = load_config(REPO / "configs/tiny.yaml", [*overrides, f"serve.model={first}"])
    build_index(cfg, store, log=lambda _: None)
    start(cfg)
    base = f"http://127.0.0.1:{port}/v1"
    yield {"cfg": cfg, "overrides": overrides, "base": base, "root": root, "v1": first, "v2": second,
           "client": openai.OpenAI(base_url=base, api_key=KEY, max_retries=0)}
    if cfg.serve.app_name in serve.status().applications:
        serve.delete(cfg.serve.app_name)


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def test_openai_client_completions_chat_and_models(server):
    client = server["client"]
    assert [m.id for m in client.models.list().data] == ["lmforge"]
    # streaming, piece by piece; then the same greedy request whole (answered from the cache)
    pieces = [c.choices[0].text for c in client.completions.create(model="lmforge", prompt="ROMEO:", max_tokens=12,
                                                                    temperature=0, stream=True)]
    done = client.completions.create(model="lmforge", prompt="ROMEO:", max_tokens=12, temperature=0)
    assert done.object == "text_completion" and done.choices[0].finish_reason in ("length", "stop")
    assert done.usage.completion_tokens == 12 or done.choices[0].finish_reason == "stop"
    assert (done.usage.prompt_tokens > 0
            and done.usage.total_tokens == done.usage.prompt_tokens + done.usage.completion_tokens)
    assert len(pieces) > 1 and "".join(pieces) == done.choices[0].text
    # several prompts and n choices, seeded: choice j of a prompt is reproducible
    many = client.completions.create(model="lmforge", prompt=["KING:", "QUEEN:"], n=2, max_tokens=8, seed=7)
    assert [c.index for c in many.choices] == [0, 1, 2, 3]
    again = client.completions.create(model="lmforge", prompt=["KING:", "QUEEN:"], n=2, max_tokens=8, seed=7)
    assert [c.text for c in again.choices] == [c.text for c in many.choices]
    # logprobs and echo
    lp = client.completions.create(model="lmforge", prompt="KING:", max_tokens=5, temperature=0, logprobs=1, echo=True)
    echoed = lp.choices[0].logprobs.token_logprobs  # the prompt's tokens (the first without a logprob), then 5
    assert lp.choices[0].text.startswith("KING:") and len(echoed) == lp.usage.prompt_tokens + 5
    assert echoed[0] is None and all(v <= 0 for v in echoed[1:])
    chunks = list(client.chat.completions.create(model="lmforge", messages=[{"role": "user", "content": "Speak."}],
                                                 max_tokens=10, temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    chat = client.chat.completions.create(model="lmforge", messages=[{"role": "user", "content": "Speak."}],
                                          max_tokens=10, temperature=0)
    assert chat.object == "chat.completion" and chat.choices[0].message.role == "assistant"
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[-1].usage.completion_tokens > 0
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed.strip() == chat.choices[0].message.content
    # content as text parts: the same prompt as plain content
    parts = client.chat.completions.create(model="lmforge", max_tokens=10, temperature=0, messages=[
        {"role": "user", "content": [{"type": "text", "text": "Speak."}]}])
    assert parts.choices[0].message.content == chat.choices[0].message.content
    # stream_options.include_usage on completions: a last chunk with the usage and no choices
    chunks = list(client.completions.create(model="lmforge", prompt="ROMEO:", max_tokens=12, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage == done.usage and all(c.usage is None for c in chunks[:-1])
    assert "".join(c.choices[0].text for c in chunks[:-1]) == done.choices[0].text


def test_lm_chat_against_the_endpoint_streams_the_servers_replies_with_history(server):
    """`lm chat --endpoint`: each turn streamed through the openai client, the history sent with the next."""
    import io

    from lm.chat_terminal import EndpointChat, run_chat
    from lm.config import GenerateConfig

    endpoint, shown = EndpointChat(server["base"], KEY, GenerateConfig(temperature=0, max_new_tokens=8)), []

    class Recorded:  # each reply as the terminal got it, piece by piece (a reply may hold newlines)
        def reply(self, messages):
            pieces = list(endpoint.reply(messages))
            shown.append("".join(pieces).strip())
            yield from pieces

    out = io.StringIO()
    assert run_chat(Recorded(), io.StringIO("Speak.\nAgain.\n"), out) == 2
    assert out.getvalue().count("lmforge> ") == 2 and shown[0] in out.getvalue()
    client, ask = server["client"], {"model": "lmforge", "max_tokens": 8, "temperature": 0}
    first = client.chat.completions.create(messages=[{"role": "user", "content": "Speak."}], **ask)
    assert shown[0] == first.choices[0].message.content
    second = client.chat.completions.create(messages=[{"role": "user", "content": "Speak."},
                                                      {"role": "assistant", "content": shown[0]},
                                                      {"role": "user", "content": "Again."}], **ask)
    assert shown[1] == second.choices[0].message.content


def test_token_prompts_sampling_controls_and_top_logprobs(server):
    """Prompts as token ids, logit_bias, presence / frequency penalties and top logprobs (completions and chat),
    each streamed and not, through the openai client."""
    from lm.tokenizer import BPETokenizer

    client, tok = server["client"], BPETokenizer.load(Path(server["v1"]) / "tokenizer.json")

    def shown(raw: bytes) -> str:  # a token as OpenAI shows it: its text, or bytes:\x.. for part of a character
        try:
            return raw.decode()
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)

    def complete(stream: bool, **kw) -> tuple[str, list[str], list[float], list[dict]]:
        """(text, tokens, token logprobs, top logprobs) of a greedy completion."""
        kw = {"model": "lmforge", "max_tokens": 8, "temperature": 0, "logprobs": 5, **kw}
        if not stream:
            lp = (c := client.completions.create(**kw).choices[0]).logprobs
            return c.text, lp.tokens, lp.token_logprobs, lp.top_logprobs
        chunks = [c.choices[0] for c in client.completions.create(stream=True, **kw)]
        return ("".join(c.text for c in chunks), *([v for c in chunks for v in getattr(c.logprobs, field)]
                                                    for field in ("tokens", "token_logprobs", "top_logprobs")))

    for stream in (False, True):
        text, tokens, lps, tops = complete(stream, prompt="ROMEO:")
        assert complete(stream, prompt=tok.encode("ROMEO:"))[0] == text  # token ids: the same greedy text
        two = client.completions.create(model="lmforge", prompt=[tok.encode("ROMEO:"), tok.encode("KING:")],
                                        max_tokens=8, temperature=0)
        assert two.choices[0].text == text and two.choices[1].text == complete(stream, prompt="KING:")[0]
        for token, lp, top in zip(tokens, lps, tops, strict=True):  # greedy: the chosen token is the likeliest
            assert len(top) <= 5 and max(top, key=top.get) == token and top[token] == pytest.approx(lp, abs=1e-6)
            assert list(top.values()) == sorted(top.values(), reverse=True)
            assert sum(np.exp(list(top.values()))) <= 1 + 1e-6
        e = tok.encode("e")[0]
        assert complete(stream, prompt="ROMEO:", logit_bias={str(e): 100})[0] == tok.decode([e] * 8)
        first = next(i for i in range(tok.vocab_size) if shown(tok.token_bytes(i)) == tokens[0])  # the greedy first
        assert complete(stream, prompt="ROMEO:", logit_bias={str(first): -100})[1][0] != tokens[0]

        def repeats(stream=stream, **kw) -> int:
            counts = Counter(complete(stream, prompt="ROMEO:", max_tokens=40, **kw)[1])
            return max(counts.values())

        assert repeats(frequency_penalty=2, presence_penalty=1) <= repeats() <= repeats(frequency_penalty=-2)
        assert repeats(frequency_penalty=2, presence_penalty=1) < repeats(frequency_penalty=-2)
    # chat: logprobs with top_logprobs, the same streamed and not
    ask = {"model": "lmforge", "messages": [{"role": "user", "content": "Speak."}], "max_tokens": 8, "temperature": 0,
           "logprobs": True, "top_logprobs": 3}
    content = client.chat.completions.create(**ask).choices[0].logprobs.content
    streamed = [e for c in client.chat.completions.create(stream=True, **ask) if c.choices and c.choices[0].logprobs
                for e in c.choices[0].logprobs.content]
    assert [e.model_dump() for e in streamed] == [e.model_dump() for e in content] and len(content) > 0
    for entry in content:
        assert entry.top_logprobs[0].token == entry.token and len(entry.top_logprobs) == 3
        assert (entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)
                and shown(bytes(entry.bytes)) == entry.token)
        assert [t.logprob for t in entry.top_logprobs] == sorted((t.logprob for t in entry.top_logprobs), reverse=True)
    assert client.chat.completions.create(**{**ask, "logprobs": False}).choices[0].logprobs is None
    log_likelihood_requests(client, tok, Path(server["v1"]))


def log_likelihood_requests(client, tok, model_dir: Path) -> None:
    """Scoring as lm-eval's local-completions asks for it (token-id prompts, echo, max_tokens 0 or 1,
    logprobs 1), streamed and not: each prompt token's logprob (the first null) is a full forward's."""
    import torch

    from lm.modeldir import load_model

    model = load_model(model_dir)
    prompts = [tok.encode("ROMEO:\nWhat light through yonder"), tok.encode("KING:\nNow is the winter")]

    def forward(ids: list[int]) -> list[float]:
        with torch.no_grad():
            logits, _ = model(torch.tensor([ids]))
        return torch.log_softmax(logits[0, :-1].float(), -1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0].tolist()

    for stream in (False, True):
        for max_tokens in (0, 1):
            kw = {"model": "lmforge", "prompt": prompts, "echo": True, "max_tokens": max_tokens, "logprobs": 1,
                  "temperature": 0}
            if stream:
                choices = [{"text": "", "token_logprobs": [], "top_logprobs": []} for _ in prompts]
                for chunk in client.completions.create(stream=True, **kw):
                    c = choices[chunk.choices[0].index]
                    c["text"] += chunk.choices[0].text
                    if chunk.choices[0].logprobs:
                        c["token_logprobs"] += chunk.choices[0].logprobs.token_logprobs
                        c["top_logprobs"] += chunk.choices[0].logprobs.top_logprobs
            else:
                choices = [{"text": c.text, **c.logprobs.model_dump()} for c in client.completions.create(**kw).choices]
            for ids, c in zip(prompts, choices, strict=True):
                lps, tops = c["token_logprobs"], c["top_logprobs"]
                assert c["text"].startswith(tok.decode(ids)) and len(lps) == len(ids) + max_tokens
                assert lps[0] is None and tops[0] is None
                assert lps[1 : len(ids)] == pytest.approx(forward(ids), abs=1e-4)
                for lp, top in zip(lps[1:], tops[1:], strict=True):  # the likeliest, and the token itself
                    assert 1 <= len(top) <= 2 and max(top.values()) >= lp - 1e-6


def test_auth(server):
    assert httpx.get(server["base"].removesuffix("/v1") + "/healthz").status_code == 200
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        r = httpx.get(f"{server['base']}/models", headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server["base"], api_key="nope", max_retries=0).models.list()
    # the key is checked before the body is read or validated: no schema details for a client without one
    for body in ('{"model": "lmforge", "max_tokens": "many"}', "not json", "x" * 30000):
        r = httpx.post(f"{server['base']}/completions", content=body, headers={"Content-Type": "application/json"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", r.text
    r = httpx.post(f"{server['base']}/completions", content="x" * 30000,  # a declared size over the limit: 413 unread
                   headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "too_large"


def test_per_key_limits_answer_429_with_retry_after(server):
    """The key file's limits (requests in flight, requests and tokens per minute): 429 in OpenAI's shape with
    Retry-After, for that key only."""
    def post(key: str, max_tokens: int = 2, prompt: str | list[str] = "LIMIT:", n: int = 1) -> httpx.Response:
        return httpx.post(f"{server['base']}/completions", timeout=60, headers={"Authorization": f"Bearer {key}"},
                          json={"model": "lmforge", "prompt": prompt, "n": n, "max_tokens": max_tokens,
                                "temperature": 1})

    def refused(r: httpx.Response, limit: str) -> bool:
        if r.status_code != 429:  # the answers come in submission order: a 200 may come first
            return False
        error = r.json()["error"]
        return (error["code"] == "rate_limit_exceeded" and limit in error["message"]
                and 1 <= int(r.headers["retry-after"]) <= 60)

    with ThreadPoolExecutor(4) as pool:  # 4 long requests (16 rows x 40 tokens) at once on a key allowed 1 in flight
        answers = list(pool.map(lambda _: post(LIMITED["busy"], 40, [f"B{i}:" for i in range(8)], 2), range(4)))
    assert any(r.status_code == 200 for r in answers), [r.text for r in answers]
    assert any(refused(r, "1 concurrent requests") for r in answers), [r.text for r in answers]
    assert [post(LIMITED["rpm"]).status_code for _ in range(3)] == [200] * 3
    assert refused(post(LIMITED["rpm"]), "3 requests per minute")
    with pytest.raises(openai.RateLimitError, match="3 requests per minute"):
        openai.OpenAI(base_url=server["base"], api_key=LIMITED["rpm"], max_retries=0).models.list()
    used, answer = 0, post(LIMITED["tpm"], 12)
    while answer.status_code == 200 and used < 20:
        used += answer.json()["usage"]["total_tokens"]
        answer = post(LIMITED["tpm"], 12)
    assert used >= 20 and refused(answer, "20 tokens per minute"), (used, answer.text)
    assert post(KEY).status_code == 200  # other keys are not limited


@pytest.mark.parametrize(("body", "status", "param"), [
    ('{"model": "lmforge", "prompt": "hi", ', 400, None),                           # malformed JSON
    ({"model": "lmforge", "prompt": "hi", "max_tokens": "many"}, 400, "max_tokens"),  # wrong type
    ({"model": "lmforge", "prompt": "hi", "max_tokens": -3}, 400, "max_tokens"),     # negative
    ({"model": "lmforge", "prompt": "hi", "max_tokens": 10**9}, 400, "max_tokens"),  # huge
    ({"model": "lmforge", "prompt": "hi", "max_tokens": 64}, 400, "max_tokens"),     # prompt + max_tokens >
                                                                                     # context (64)
    ({"model": "lmforge", "prompt": "ROMEO: " * 80, "max_tokens": 1}, 400, "prompt"),  # prompt longer than the context
    ({"model": "gpt-9", "prompt": "hi"}, 404, "model"),                              # unknown model
    ({"model": "lmforge", "prompt": "hi", "temperature": 7}, 400, "temperature"),
    ({"model": "lmforge", "prompt": "hi", "n": 99}, 400, "n"),
    ({"model": "lmforge", "prompt": []}, 400, "prompt"),
    ({"model": "lmforge", "prompt": "hi", "bogus": 1}, 400, "bogus"),               # unknown field
    ({"model": "lmforge"}, 400, "prompt"),                                           # missing field
    ({"model": "lmforge", "prompt": "x" * 30000}, 413, None),                        # oversized body
    ({"model": "lmforge", "prompt": "hi", "seed": 1208925819614629174706176}, 400, "seed"),  # beyond 64 bits
    ({"model": "lmforge", "prompt": "hi", "top_k": 10**20}, 400, "top_k"),            # beyond its range
    (b'{"model": "lmforge", "prompt": "caf\xe9"}', 400, None),                         # not UTF-8
    ({"model": "lmforge", "prompt": "hi", "stream": "yes"}, 400, "stream"),           # no coercion: not a boolean
    ({"model": "lmforge", "prompt": "hi", "n": True}, 400, "n"),                      # nor an integer
    ({"model": "lmforge", "prompt": "hi", "max_tokens": "3"}, 400, "max_tokens"),
    ({"model": "lmforge", "prompt": "hi", "max_tokens": 2.5}, 400, "max_tokens"),    # 2.0 would be 2
    ({"model": "lmforge", "prompt": "hi", "stop": ["", "", "", "", ""]}, 400, "stop"),  # at most 4, as documented
    ({"model": "lmforge", "prompt": [5, 10**6]}, 400, "prompt"),                     # token ids beyond the vocabulary
    ({"model": "lmforge", "prompt": [[5], [-1]]}, 400, "prompt"),
    ({"model": "lmforge", "prompt": "hi", "logit_bias": {"1000000": 5}}, 400, "logit_bias"),
    ({"model": "lmforge", "prompt": "hi", "logit_bias": {"5": 101}}, 400, "logit_bias"),
    ({"model": "lmforge", "prompt": "hi", "frequency_penalty": 2.5}, 400, "frequency_penalty"),
    ({"model": "lmforge", "prompt": "hi", "logprobs": 6}, 400, "logprobs"),
])
def test_bad_requests_get_openai_style_4xx(server, body, status, param):
    content = body if isinstance(body, str | bytes) else json.dumps(body)
    r = httpx.post(f"{server['base']}/completions", content=content, timeout=30,
                   headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["message"] and error["type"]
    if param:
        assert error["param"] == param or error["param"].startswith(param), error


def test_openapi_documents_the_statuses_the_server_answers(server):
    """Every /v1 operation lists the errors it answers (OpenAI's shape), and no 422 (errors are 400s)."""
    spec = httpx.get(server["base"].removesuffix("/v1") + "/openapi.json", timeout=30).json()
    answers = {"post": {"200", "400", "401", "404", "413", "429", "503"}, "get": {"200", "401", "429", "503"}}
    for path, operations in spec["paths"].items():
        for method, op in operations.items():
            if path.startswith("/v1/"):
                assert set(op["responses"]) == answers[method], (path, method, op["responses"])
                assert op["security"] == [{"apiKey": []}], (path, method)
                for status in ("429", "503"):  # rate limited, no replica: both say when to come back
                    assert op["responses"][status]["headers"]["Retry-After"]["required"], (path, status)
            assert "422" not in op["responses"], (path, method)
            for status, response in op["responses"].items():
                if status != "200":
                    ref = response["content"]["application/json"]["schema"]["$ref"]
                    assert ref.endswith("/ErrorResponse"), (path, status)
    error = spec["components"]["schemas"]["ErrorObject"]
    assert set(error["required"]) == {"message", "type"} and "HTTPValidationError" not in spec["components"]["schemas"]
    assert {**spec["components"]["securitySchemes"]["apiKey"], "description": ""} == {
        "type": "http", "scheme": "bearer", "description": ""}
    models = spec["components"]["schemas"]
    seed = models["CompletionRequest"]["properties"]["seed"]["anyOf"][0]  # exact integers
    assert [seed["minimum"], seed["exclusiveMaximum"]] == [-(2**63), 2**63] and isinstance(seed["minimum"], int), seed
    shapes = {"prompt": ("CompletionRequest", "minItems", 1), "stop": ("CompletionRequest", "maxItems", 4),
              "input": ("EmbeddingRequest", "minItems", 1)}  # what the server refuses whatever it serves
    for field, (model, key, value) in shapes.items():
        assert value in [b.get(key) for b in models[model]["properties"][field]["anyOf"]], (field, key)
    for path, body in [("/v1/completions", "Completion"), ("/v1/chat/completions", "ChatCompletion")]:
        content = spec["paths"][path]["post"]["responses"]["200"]["content"]
        assert content["application/json"]["schema"]["$ref"].endswith(f"/{body}") and "text/event-stream" in content


@pytest.fixture(scope="module")
def fuzzed_root(server) -> str:
    """The live app's address, once its /openapi.json is checked to be FUZZED's schema (built at collection from
    lm.serve.app's routes: schemathesis' fixture-based loader, from_fixture, fails on pytest 9)."""
    root = server["base"].removesuffix("/v1")
    assert httpx.get(f"{root}/openapi.json", timeout=30).json() == FUZZED.raw_schema
    return root


def at_deployment_limits(ctx, response, case) -> None:
    """positive_data_acceptance's exclusion kept narrow: a schema-valid request refused names a deployment limit."""
    if case.meta is not None and case.meta.generation.mode.is_positive and response.status_code == 400:
        error = response.json()["error"]
        assert error["param"] in DEPLOYMENT_LIMITS, f"a schema-valid request refused: {error}"


@FUZZED.parametrize()
def test_fuzzing_finds_no_failure(case, fuzzed_root):
    """schemathesis against the live app, each operation on its own: every check, the coverage and fuzzing
    phases (FUZZ)."""
    case.call_and_validate(base_url=fuzzed_root, additional_checks=[at_deployment_limits])


def test_chat_bad_input(server):
    r = httpx.post(f"{server['base']}/chat/completions", json={"model": "lmforge", "messages": [{"role": "wizard",
                   "content": "x"}]}, headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 400 and r.json()["error"]["param"].startswith("messages")
    image = [{"type": "text", "text": "x"}, {"type": "image_url", "image_url": {"url": "https://x/y.png"}}]
    r = httpx.post(f"{server['base']}/chat/completions", json={"model": "lmforge", "messages": [{"role": "user",
                   "content": image}]}, headers={"Authorization": f"Bearer {KEY}"})
    error = r.json()["error"]
    assert r.status_code == 400 and error["param"] == "messages.0.content" and "image_url" in error["message"], error


def test_concurrent_requests_are_batched_and_all_answered(server):
    from ray import serve

    client = server["client"]
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda i: client.completions.create(model="lmforge", prompt=f"LORD {i}:",
                                                                     max_tokens=16, temperature=0.9), range(16)))
    # all answered (a sampled end-of-text as the first token is a legitimate empty answer)
    assert all(r.choices[0].finish_reason in ("length", "stop") for r in results)
    assert sum(r.usage.completion_tokens for r in results) > 16
    model = serve.get_deployment_handle("model", server["cfg"].serve.app_name)
    info = model.info.remote().result()
    assert info["version"] and info["context_length"] == 64


def test_deterministic_requests_hit_the_cache(server):
    client = server["client"]

    def ask(temperature: float, seed=None):
        raw = client.completions.with_raw_response.create(model="lmforge", prompt="CACHE ME:", max_tokens=6,
                                                          temperature=temperature, seed=seed)
        return raw.headers["x-lmforge-cache"], raw.parse().choices[0].text

    # four identical greedy requests over at most two replicas: one replica sees the request twice
    answers = [ask(0.0) for _ in range(4)]
    assert answers[0][0] == "miss" and "hit" in [a[0] for a in answers[1:]]
    assert len({text for _, text in answers}) == 1
    assert all(ask(1.0)[0] == "miss" for _ in range(2))  # sampled without a seed: never cached


def test_metrics_are_exported_in_prometheus_format(server, ray_session):
    port = ray_session.nodes()[0]["MetricsExportPort"]
    # the label values are this module's requests (an earlier module's app may have exported the names already)
    wanted = ("lmforge_requests", "lmforge_request_latency_ms", "lmforge_generated_tokens", "lmforge_batch_size",
              "lmforge_cache_lookups", 'route="completions"', 'result="hit"')
    deadline, text = time.monotonic() + 40, ""
    while time.monotonic() < deadline:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        if all(name in text for name in wanted):
            break
        time.sleep(2)
    missing = [name for name in wanted if name not in text]
    assert not missing, missing

    def total(pattern: str) -> float:
        return sum(float(m) for m in re.findall(pattern + r"[^\n]* ([0-9.e+]+)\n", text))

    # dynamic batching happened: some batches held more than one request (16 concurrent requests above)
    singles, batches = (total(r'\w*lmforge_batch_size_bucket\{[^}]*le="1(?:\.0)?"'),
                        total(r"\w*lmforge_batch_size_count"))
    assert batches > singles > 0


def test_request_metrics_count_every_status_by_route(server, ray_session):
    """lm.serve.gate records lmforge_requests and lmforge_request_latency_ms for every answer, tagged with the
    route and the status: the gate's own 401, FastAPI's 400, a route's 404, and 200s."""
    url, key = f"{server['base']}/chat/completions", {"Authorization": f"Bearer {KEY}"}
    chat = {"model": "lmforge", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    assert httpx.post(url, json=chat, timeout=30).status_code == 401
    assert httpx.post(url, json={**chat, "max_tokens": "many"}, headers=key, timeout=30).status_code == 400
    assert httpx.post(url, json={**chat, "model": "gpt-9"}, headers=key, timeout=30).status_code == 404
    assert httpx.post(url, json=chat, headers=key, timeout=60).status_code == 200
    assert httpx.post(url, json={**chat, "stream": True}, headers=key, timeout=60).status_code == 200
    port = ray_session.nodes()[0]["MetricsExportPort"]

    def counted(text: str, name: str) -> set[str]:  # the statuses with a nonzero count for route="chat"
        found = set()
        for labels, value in re.findall(r"^\w*" + name + r"(?:_total)?\{([^}]*)\} ([0-9.e+]+)$", text, re.M):
            status = re.search(r'status="(\d+)"', labels)
            if 'route="chat"' in labels and status and float(value) > 0:
                found.add(status.group(1))
        return found

    wanted, deadline = {"200", "400", "401", "404"}, time.monotonic() + 40
    while True:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        requests, latencies = counted(text, "lmforge_requests"), counted(text, "lmforge_request_latency_ms_count")
        if (wanted <= requests and wanted <= latencies) or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert wanted <= requests and wanted <= latencies, (requests, latencies)


def test_feedback_is_captured_as_jsonl(server):
    client, store = server["client"], ObjectStore(server["cfg"].storage)
    done = client.completions.create(model="lmforge", prompt="FEEDBACK:", max_tokens=4, temperature=0)
    correction = "Good morrow.\u2028Fare thee well.\x85"  # line breaks to str.splitlines (lm.continual reads so)
    r = httpx.post(f"{server['base']}/feedback", json={"id": done.id, "rating": 1, "correction": correction},
                   headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 200 and r.json()["recorded"]
    bad = httpx.post(f"{server['base']}/feedback", json={"id": "nonsense"}, headers={"Authorization": f"Bearer {KEY}"})
    assert bad.status_code == 400
    prefix = f"{server['root']}/feedback"
    deadline = time.monotonic() + 20
    records: list[dict] = []
    while time.monotonic() < deadline:
        records = [json.loads(line) for uri in store.list(prefix) for line in store.read_text(uri).splitlines()]
        if any(r["type"] == "feedback" and r["id"] == done.id for r in records):
            break
        time.sleep(0.5)
    completion = [r for r in records if r.get("id") == done.id and r["type"] == "completion"]
    assert (completion and completion[0]["prompts"] == ["FEEDBACK:"]
            and completion[0]["completions"] == [done.choices[0].text])
    assert any(r["type"] == "feedback" and r["correction"] == correction for r in records)


def test_embeddings_through_the_openai_client(server):
    client = server["client"]
    got = client.embeddings.create(model="lmforge", input=["ROMEO: good night", "KING:", "ROMEO: good night"])
    vectors = np.array([d.embedding for d in got.data])  # the client asks for base64 and decodes it
    assert [d.index for d in got.data] == [0, 1, 2] and vectors.shape == (3, 64)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5) and np.allclose(vectors[0], vectors[2])
    assert got.usage.prompt_tokens > 3
    headers = {"Authorization": f"Bearer {KEY}"}
    plain = httpx.post(f"{server['base']}/embeddings", headers=headers,
                       json={"model": "lmforge", "input": "KING:", "encoding_format": "float"}).json()
    assert np.allclose(plain["data"][0]["embedding"], vectors[1], atol=1e-6)
    for body, status, param in [({"model": "lmforge", "input": []}, 400, "input"),
                                ({"model": "lmforge", "input": ""}, 400, "input"),
                                ({"model": "lmforge", "input": [[1, 2], [10**7]]}, 400, "input"),
                                ({"model": "lmforge", "input": "ROMEO: " * 80}, 400, "input"),
                                ({"model": "lmforge", "input": "x", "dimensions": 7}, 400, "dimensions"),
                                ({"model": "ada", "input": "x"}, 404, "model")]:
        r = httpx.post(f"{server['base']}/embeddings", headers=headers, json=body)
        assert r.status_code == status and r.json()["error"]["param"] == param, (body, r.text)


def test_retrieval_puts_passages_in_the_prompt_and_returns_sources(server):
    client = server["client"]
    plain = client.completions.create(model="lmforge", prompt="Capital of Zembla?", max_tokens=4, temperature=0)
    done = client.completions.create(model="lmforge", prompt="Capital of Zembla?", max_tokens=4, temperature=0,
                                     extra_body={"rag": {"top_k": 2}})
    sources = done.choices[0].model_extra["sources"]
    assert sources and "zembla.txt" in sources[0]["doc"] and "Quixotl" in sources[0]["text"]
    assert len(sources) <= 2 and done.usage.prompt_tokens > plain.usage.prompt_tokens + 5
    assert "sources" not in (plain.choices[0].model_extra or {})
    streamed = list(client.completions.create(model="lmforge", prompt="Who rules Orbis?", max_tokens=4,
                                              temperature=0, stream=True, extra_body={"rag": True}))
    assert "orbis.txt" in streamed[0].choices[0].model_extra["sources"][0]["doc"]
    chat = client.chat.completions.create(model="lmforge", max_tokens=4, temperature=0, extra_body={"rag": True},
                                          messages=[{"role": "user", "content": "Where does rain fall?"}])
    assert "rain.txt" in chat.choices[0].model_extra["sources"][0]["doc"]
    with pytest.raises(openai.BadRequestError, match="exceeds this server's limit"):
        client.completions.create(model="lmforge", prompt="x", max_tokens=2, extra_body={"rag": {"top_k": 99}})


def test_named_prompt_templates_through_the_api(server):
    client = server["client"]
    done = client.completions.create(model="lmforge", prompt="Why?", max_tokens=2, temperature=0, echo=True,
                                     extra_body={"template": "qa", "template_vars": {"tone": "gravely"}})
    assert done.choices[0].text.startswith("Q: Why? (gravely)\nA:")
    chat = client.chat.completions.create(model="lmforge", max_tokens=2, temperature=0,
                                          messages=[{"role": "user", "content": "Why?"}],
                                          extra_body={"template": "qa", "template_vars": {"tone": "gravely"}})
    assert chat.usage.prompt_tokens > client.chat.completions.create(
        model="lmforge", max_tokens=2, temperature=0,
        messages=[{"role": "user", "content": "Why?"}]).usage.prompt_tokens
    for extra, param in [({"template": "nope"}, "template"), ({"template": "qa"}, "template_vars"),
                         ({"template": "qa", "template_vars": {"tone": "x", "mood": "y"}}, "template_vars")]:
        with pytest.raises(openai.BadRequestError) as err:
            client.completions.create(model="lmforge", prompt="Why?", max_tokens=2, extra_body=extra)
        assert err.value.body["param"] == param


def test_structured_output_on_the_demo_model_through_the_openai_client(server, json_schemas):
    """response_format on the demo model's architecture (configs/shakespeare-cpu.yaml: 128-token context, a
    2048-token tokenizer; random weights, so only the grammar's mask makes the answers JSON): answers to 50
    schemas drawn from a fixed set of shapes (half streamed) all finish "stop" and validate; json_object;
    the openai client's own parse() with a pydantic model; "length" when cut off."""
    import jsonschema
    from pydantic import BaseModel, Field

    from lm.serve.deploy import start

    cfg = load_config(REPO / "configs/shakespeare-cpu.yaml", [f"storage.root={server['root']}"])
    demo = model_dir(ObjectStore(cfg.storage), cfg, f"{server['root']}/models/demo", seed=3)
    start(load_config(REPO / "configs/tiny.yaml", [*server["overrides"], f"serve.model={demo}"]))
    client = server["client"]
    ask = {"model": "lmforge", "messages": [{"role": "user", "content": "Who speaks first? Answer in JSON."}]}

    def answer(i: int, fmt: dict, stream: bool, max_tokens: int = 100) -> tuple[str, str]:
        kw = {**ask, "max_tokens": max_tokens, "response_format": fmt, "temperature": [0, 0.8, 1.2][i % 3], "seed": i}
        if not stream:
            choice = client.chat.completions.create(**kw).choices[0]
            return choice.message.content, choice.finish_reason
        chunks = [c.choices[0] for c in client.chat.completions.create(stream=True, **kw) if c.choices]
        return "".join(c.delta.content or "" for c in chunks), chunks[-1].finish_reason

    deadline = time.monotonic() + 90  # the reload done: 100 tokens fit the demo model's context, not tiny's 64
    while True:
        try:
            answer(0, {"type": "json_object"}, False)
            break
        except openai.BadRequestError:
            assert time.monotonic() < deadline, "the demo model never served"
            time.sleep(0.5)
    shapes = json_schemas(50, seed=19)
    fmt = [{"type": "json_schema", "json_schema": {"name": f"shape_{i}", "schema": s, "strict": True}}
           for i, s in enumerate(shapes)]
    with ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(lambda i: answer(i, fmt[i], stream=i % 2 == 1), range(50)))
    assert [reason for _, reason in answers] == ["stop"] * 50, answers
    for (text, _), schema in zip(answers, shapes, strict=True):
        jsonschema.Draft202012Validator(schema).validate(json.loads(text))
    for stream in (False, True):
        text, reason = answer(1, {"type": "json_object"}, stream)
        assert reason == "length" or isinstance(json.loads(text), dict), (text, reason)
        assert answer(2, fmt[0], stream, max_tokens=3)[1] == "length"

    class Line(BaseModel):  # the client turns it into a strict JSON schema and parses the answer back
        speaker: Literal["ROMEO", "JULIET", "NURSE"]
        act: int = Field(ge=1, le=5)
        words: list[Literal["love", "death"]] = Field(max_length=2)

    parsed = client.chat.completions.parse(**ask, max_tokens=60, temperature=0.7, seed=1, response_format=Line)
    assert isinstance(parsed.choices[0].message.parsed, Line) and parsed.choices[0].finish_reason == "stop"
    start(load_config(REPO / "configs/tiny.yaml", [*server["overrides"], f"serve.model={server['v1']}"]))


@pytest.mark.parametrize("stream", [False, True])
def test_structured_output_refuses_an_unsupported_schema_naming_it(server, stream):
    """A schema keyword the grammar engine does not implement, or a malformed response_format: a 400 naming
    it (param response_format), before any answer starts."""
    unsupported = {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "array", "items": {"type": "integer"}, "uniqueItems": True}}}
    for fmt, param, says in [(unsupported, "response_format", "uniqueItems"),
                             ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"not": {}}}},
                              "response_format", '["not"]'),
                             ({"type": "json_schema", "json_schema": {"name": "x", "schema_": {}}},
                              "response_format.json_schema.json_schema.schema_", "Extra inputs"),
                             ({"type": "yaml"}, "response_format", "yaml")]:
        with pytest.raises(openai.BadRequestError) as err:  # streamed: the 400 comes before the event stream
            server["client"].chat.completions.create(model="lmforge", messages=[{"role": "user", "content": "JSON?"}],
                                                     max_tokens=8, stream=stream, response_format=fmt)
        assert err.value.status_code == 400 and err.value.body["param"] == param and says in err.value.body["message"]


def test_hot_reload_under_load_fails_no_request(server):
    from lm.serve.deploy import start

    with under_load(server["client"], "RELOAD:", 8, 0.0, threads=4) as (fingerprints, errors):
        time.sleep(2)
        before = fingerprints[-1]
        start(load_config(REPO / "configs/tiny.yaml", [*server["overrides"], f"serve.model={server['v2']}"]))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and (not fingerprints or fingerprints[-1] == before):
            time.sleep(0.5)
        time.sleep(2)
    assert not errors, errors[:3]
    assert fingerprints[-1] != before and len(fingerprints) > 8


def test_colocated_replicas_answer_http_themselves(server):
    """serve.colocate: one deployment whose replicas hold the model (no ingress hop): the openai client
    streamed and whole, a refused streamed request, and a reload under load with no failed request."""
    from ray import serve

    from lm.serve.deploy import start

    client, app = server["client"], server["cfg"].serve.app_name
    start(load_config(REPO / "configs/tiny.yaml", [*server["overrides"], "serve.colocate=true", "serve.rag=false",
                                                    f"serve.model={server['v1']}"]))
    assert set(serve.status().applications[app].deployments) == {"model"}
    assert len(client.embeddings.create(model="lmforge", input="COLO:").data[0].embedding) == 64
    with pytest.raises(openai.BadRequestError, match=r"retrieval is off on this server \(serve.rag\)"):
        client.completions.create(model="lmforge", prompt="x", max_tokens=2, extra_body={"rag": True})
    pieces = [c.choices[0].text for c in client.completions.create(model="lmforge", prompt="COLO:", max_tokens=10,
                                                                    temperature=0, stream=True)]
    whole = client.completions.create(model="lmforge", prompt="COLO:", max_tokens=10, temperature=0, seed=3)
    assert len(pieces) > 1 and "".join(pieces) == whole.choices[0].text
    with pytest.raises(openai.BadRequestError, match="context length"):
        list(client.completions.create(model="lmforge", prompt="ROMEO: " * 80, max_tokens=1, stream=True))
    with under_load(client, "COLO:", 6, 0.7, threads=3) as (fingerprints, errors):
        assert settles_on(fingerprints, whole.system_fingerprint), fingerprints[-6:]
        start(load_config(REPO / "configs/tiny.yaml", [*server["overrides"], "serve.colocate=true",
                                                        f"serve.model={server['v2']}"]))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and fingerprints[-1] == whole.system_fingerprint:
            time.sleep(0.5)
        time.sleep(1)
    assert not errors, errors[:3]
    assert fingerprints[-1] != whole.system_fingerprint


def test_serving_follows_the_registry_production_alias(server):
    """serve.model=registry:production: the replicas load the registry's production version and swap
    when a promotion (then a rollback) moves it, under load, with no failed request. With feedback capture
    off, every response still leaves its record (id, version, time; no text), and ``lm lineage`` follows a
    response id to its version and model directory."""
    from lm.lineage import build_chain
    from lm.registry import Registry
    from lm.serve.deploy import start

    cfg, client, store = server["cfg"], server["client"], ObjectStore(server["cfg"].storage)
    reg = Registry(store, cfg.registry_uri)
    v1 = reg.register(server["v1"])
    v2 = reg.register(server["v2"], parent=v1.id)
    reg.promote(v1.id)
    cfg = load_config(REPO / "configs/tiny.yaml", [*server["overrides"], "serve.model=registry:production",
                                                    "serve.registry_poll_s=0.5", "serve.feedback.enabled=false",
                                                    "serve.responses.flush_interval_s=0.5"])
    start(cfg)
    answer = client.completions.create(model="lmforge", prompt="PRIVATE: my secret plan", max_tokens=4)
    embedded = client.embeddings.create(model="lmforge", input="PRIVATE: my secret plan")
    eid = embedded.model_extra["id"]  # beside OpenAI's fields: embeddings responses have no id of their own
    assert eid.startswith("emb-") and embedded.model_extra["system_fingerprint"] == v1.id
    deadline = time.monotonic() + 30
    while True:
        logged = [json.loads(x) for u in store.list(cfg.responses_uri) for x in store.read_text(u).splitlines()]
        if {answer.id, eid} <= {r["id"] for r in logged}:
            break
        assert time.monotonic() < deadline, "no response record"
        time.sleep(0.3)
    for rid, kind in ((answer.id, "completion"), (eid, "embedding")):
        (record,) = [r for r in logged if r["id"] == rid]
        assert set(record) == {"time", "type", "id", "model_version", "model_uri"}
        assert record["model_version"] == v1.id and record["type"] == kind
        assert not any(rid in store.read_text(u) for u in store.list(cfg.feedback_uri))  # capture is off
        chain = build_chain(cfg, store, rid)
        assert chain.response.id == rid and chain.version.id == v1.id and chain.run.model_uri == server["v1"]

    with under_load(client, "WHO:", 4, 0.7, threads=3) as (fingerprints, errors):
        assert settles_on(fingerprints, v1.id), fingerprints[-6:]
        reg.promote(v2.id, reason="gate passed")
        assert settles_on(fingerprints, v2.id), fingerprints[-6:]
        reg.rollback(reason="test")
        assert settles_on(fingerprints, v1.id), fingerprints[-6:]
    assert not errors, errors[:3]


def test_autoscaling_up_under_load_and_back_down(server):
    from ray import serve

    client, app = server["client"], server["cfg"].serve.app_name

    def running() -> int:
        replicas = serve.status().applications[app].deployments["model"].replica_states
        return replicas.get("RUNNING", 0)

    stop = threading.Event()

    def load():
        while not stop.is_set():
            client.completions.create(model="lmforge", prompt="SCALE:", max_tokens=40, temperature=1.0)

    threads = [threading.Thread(target=load) for _ in range(8)]
    for t in threads:
        t.start()
    deadline, peak = time.monotonic() + 60, running()
    while time.monotonic() < deadline and peak < 2:
        time.sleep(0.5)
        peak = max(peak, running())
    stop.set()
    for t in threads:
        t.join()
    assert peak == 2
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and running() > 1:
        time.sleep(0.5)
    assert running() == 1


def test_a_killed_model_replica_fails_no_whole_request(server):
    """Chaos: one of 2 model replicas killed (SIGKILL) at a random moment under load: every non-streamed request
    is answered (the ingress sends it again to the other replica). With a single replica, the requests it held
    get 503 with Retry-After (never 500) and the next ones are answered by its replacement; the same with the API in
    the replica (serve.colocate), where Serve's proxy answers for the dead handler (lm.serve.proxy)."""
    from ray.serve.context import _get_global_client

    from lm.serve.deploy import start

    def running(app: str) -> set[int] | None:
        """The pids of the model deployment's replicas once the application is RUNNING (its update done) and they
        all are (none starting or stopping)."""
        details = _get_global_client().get_serve_details()["applications"][app]
        replicas = details["deployments"]["model"]["replicas"]
        states = {r["state"] for r in replicas}
        return {r["pid"] for r in replicas} if details["status"] == "RUNNING" and states == {"RUNNING"} else None

    def kill_one_under_load(replicas: int, moment: float, *extra: str) -> list[httpx.Response]:
        start(load_config(REPO / "configs/tiny.yaml", [*server["overrides"], f"serve.model={server['v1']}",
                                                        f"serve.autoscaling.min_replicas={replicas}",
                                                        f"serve.autoscaling.max_replicas={replicas}", *extra]))
        deadline, pids = time.monotonic() + 90, None
        while time.monotonic() < deadline and (pids is None or len(pids) != replicas):
            time.sleep(0.5)
            pids = running(server["cfg"].serve.app_name)
        assert pids is not None and len(pids) == replicas, pids
        stop, answers = threading.Event(), []
        # 8 prompts x n=2, 40 tokens each: every request keeps the replicas busy for a while
        body = {"model": "lmforge", "prompt": [f"P{i}:" for i in range(8)], "n": 2, "max_tokens": 40, "temperature": 1}

        def load() -> None:
            with httpx.Client(headers={"Authorization": f"Bearer {KEY}"}, timeout=120) as http:
                while not stop.is_set():
                    answers.append(http.post(f"{server['base']}/completions", json=body))

        threads = [threading.Thread(target=load) for _ in range(3)]
        for t in threads:
            t.start()
        time.sleep(moment)
        pids = running(server["cfg"].serve.app_name) or pids  # the replicas serving the load now
        os.kill(min(pids), signal.SIGKILL)
        time.sleep(6)
        stop.set()
        for t in threads:
            t.join()
        return answers

    seed = random.randrange(10**6)
    moment = random.Random(seed).uniform(1.0, 3.0)
    print(f"chaos seed {seed}: kill at {moment:.2f} s")
    statuses = Counter(r.status_code for r in kill_one_under_load(2, moment))
    assert set(statuses) == {200} and statuses[200] > 6, (seed, statuses)
    for extra in ([], ["serve.colocate=true", "serve.rag=false"]):
        for _ in range(3):  # until the kill catches requests on the replica (Serve may hold them all queued)
            answers = kill_one_under_load(1, moment, *extra)
            statuses = Counter(r.status_code for r in answers)
            assert set(statuses) <= {200, 503} and statuses[200] > 3, (seed, extra, statuses)
            if statuses[503]:
                break
        assert statuses[503], (seed, extra, "three kills, none caught a request on the replica")
        assert all(int(r.headers["retry-after"]) >= 1 and r.json()["error"]["code"] == "replica_unavailable"
                   for r in answers if r.status_code == 503)


def test_lm_serve_ask_deploys_answers_through_the_openai_client_and_stops(server):
    """What `make demo` runs (`lm serve --ask`); last in this module: it deletes the app."""
    from ray import serve

    from lm.serve.deploy import ask_once

    done = ask_once(server["cfg"], "KING:")
    assert done["object"] == "text_completion" and done["usage"]["completion_tokens"] > 0
    assert server["cfg"].serve.app_name not in serve.status().applications
