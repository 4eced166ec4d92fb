"""The serving pieces around the request pipeline, without Ray: the gate's request metrics (every status,
by route), the per-route adapters (lm.serve.routes), the decode loop's typed messages (lm.serve.messages)."""

import pickle
import queue
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.responses import StreamingResponse
from fastapi.testclient import TestClient
from pydantic import BaseModel

from lm.config import load_config
from lm.config.serve import KeyLimits
from lm.serve import errors, messages, schemas
from lm.serve.auth import Grant, digest
from lm.serve.engine import GenRequest, StepOutput
from lm.serve.errors import BadRequest
from lm.serve.gate import Gate, route_of
from lm.serve.routes import ChatRoute, CompletionRoute
from lm.serve.scheduler import decode_loop

REPO = Path(__file__).parents[2]
KEY, LIMITED = "sk-test-0123456789abcdef", "sk-once-0123456789abcdef"


class Recorded:
    def __init__(self):
        self.seen: list[tuple[str, int]] = []

    def record(self, route: str, status: int, latency_ms: float) -> None:
        assert latency_ms >= 0
        self.seen.append((route, status))


class Body(BaseModel):
    model: str


@pytest.fixture
def gated():
    """A FastAPI app behind the Gate, as lm.serve.app installs it, with its metrics recorded here."""
    api = FastAPI()
    api.add_middleware(Gate)
    errors.install(api)

    @api.post("/v1/completions")
    async def completions(body: Body):
        if body.model != "lmforge":
            raise BadRequest(404, "no such model", param="model")
        return {"ok": True}

    @api.post("/v1/chat/completions")
    async def chat(body: Body):
        return StreamingResponse(iter(["data: [DONE]\n\n"]), media_type="text/event-stream")

    @api.get("/v1/models")
    async def boom():
        raise RuntimeError("a bug")

    saved = Gate.grants, Gate.limiter, Gate.max_body_bytes, Gate.metrics
    recorded = Recorded()
    grants = {digest(KEY): Grant(name="test", role="user", limits=KeyLimits()),
              digest(LIMITED): Grant(name="once", role="user", limits=KeyLimits(requests_per_minute=1))}
    Gate.configure(grants, 200, recorded)
    yield TestClient(api, raise_server_exceptions=False), recorded
    Gate.grants, Gate.limiter, Gate.max_body_bytes, Gate.metrics = saved


def test_the_gate_records_every_status_by_route(gated):
    client, recorded = gated
    auth = {"Authorization": f"Bearer {KEY}"}
    answers = [client.post("/v1/completions", json={"model": "lmforge"}).status_code,  # no key: the gate's 401
               client.post("/v1/completions", json={"model": "lmforge"}, headers=auth).status_code,
               client.post("/v1/completions", json={"model": 5}, headers=auth).status_code,  # FastAPI's 400
               client.post("/v1/completions", json={"model": "gpt-9"}, headers=auth).status_code,  # the route's
               client.post("/v1/completions", content="x" * 300, headers=auth).status_code,  # declared size
               client.post("/v1/chat/completions", json={"model": "x"}, headers=auth).status_code,  # a stream
               client.post("/v1/nowhere", json={}, headers=auth).status_code,  # FastAPI's 404
               client.get("/v1/models", headers=auth).status_code,  # an exception: 500
               client.get("/v1/models", headers={"Authorization": f"Bearer {LIMITED}"}).status_code,
               client.get("/v1/models", headers={"Authorization": f"Bearer {LIMITED}"}).status_code]  # 429
    assert answers == [401, 200, 400, 404, 413, 200, 404, 500, 500, 429]
    assert recorded.seen == [("completions", 401), ("completions", 200), ("completions", 400),
                             ("completions", 404), ("completions", 413), ("chat", 200), ("other", 404),
                             ("models", 500), ("models", 500), ("models", 429)]
    client.get("/openapi.json")  # ungated paths are not counted
    assert len(recorded.seen) == 10


def test_route_tags_are_the_known_routes_or_other():
    assert route_of("/v1/chat/completions") == "chat" and route_of("/v1/completions/") == "completions"
    assert route_of("/api/v1/embeddings") == "embeddings" and route_of("/v1/made-up/path") == "other"


def cfg():
    return load_config(REPO / "configs/tiny.yaml", [])


def head(prompt_tokens: int, **extra) -> dict:
    return {"prompt_tokens": prompt_tokens, "version": "v1", **extra}


def test_the_completion_route_builds_one_request_per_prompt_and_choice_and_shapes_echo():
    body = schemas.CompletionRequest(model="lmforge", prompt=[[4], [5, 6]], n=2, seed=7, max_tokens=3, echo=True)
    route = CompletionRoute(cfg(), body)
    requests = route.requests()
    assert [(r["prompt"], r["seed"], r["max_tokens"]) for r in requests] == [
        ([4], 7, 3), ([4], 8, 3), ([5, 6], 7, 3), ([5, 6], 8, 3)]
    wholes = [{**head(2), "text": t, "token_ids": [1], "finish_reason": "length"} for t in "abcd"]
    for i, text in enumerate(["A:", "A:", "xy", "xy"]):  # token-id prompts come back as text
        wholes[i]["prompt_text"] = text
    route.start(wholes)
    assert route.rid.startswith("cmpl-") and route.prompt_tokens() == 4
    response = route.response(4)
    assert [c["text"] for c in response["choices"]] == ["A:a", "A:b", "xyc", "xyd"]
    assert route.headers() == {"x-lmforge-cache": "miss"}
    assert route.capture(["a", "b", "c", "d"])["prompts"] == ["A:", "xy"]
    # streamed: the echo comes first (without logprobs, in an opening chunk of its own)
    assert [c["choices"][0]["text"] for c in route.opening()] == ["A:", "A:", "xy", "xy"]
    chunk = route.chunk(1, {"text": "b", "token_ids": [1], "finish_reason": None})
    assert chunk["choices"][0] == {**chunk["choices"][0], "index": 1, "text": "b"}


def test_the_chat_route_templates_the_prompt_and_shapes_messages():
    body = schemas.ChatRequest(model="lmforge", messages=[{"role": "user", "content": "Hi"}], max_tokens=2,
                               response_format={"type": "json_object"})
    route = ChatRoute(cfg(), body)
    (request,) = route.requests()
    assert "Hi" in request["prompt"] and set(schemas.CHAT_STOPS) <= set(request["stop"])
    assert request["response_format"] == body.format()
    route.start([{**head(5), "text": " {} ", "token_ids": [1, 2], "finish_reason": "stop"}])
    response = route.response(2)
    assert response["choices"][0]["message"] == {"role": "assistant", "content": "{}"}
    assert response["usage"]["prompt_tokens"] == 5 and route.rid.startswith("chatcmpl-")
    assert route.opening()[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert route.capture(["{}"]) == {"type": "chat", "id": route.rid, "model_version": "v1",
                                     "prompts": [request["prompt"]], "completions": ["{}"],
                                     "temperature": body.temperature, "seed": None}
    with pytest.raises(BadRequest, match="does not exist"):
        ChatRoute(cfg(), body.model_copy(update={"model": "gpt-9"})).requests()


@pytest.mark.parametrize("message", [
    messages.Add(3, GenRequest([1, 2], 4, temperature=0.5, seed=1), 2, whole=True), messages.Cancel(3),
    messages.Stop(), messages.Load(1, "s3://b/model"), messages.Unload(1),
    messages.Out([(3, StepOutput("a", [1], None, None))], 2), messages.Loaded(1, ("{}", {"d_model": 8})),
    messages.Stopped()])
def test_messages_round_trip_through_pickle(message):
    again = pickle.loads(pickle.dumps(message))
    assert type(again) is type(message) and again == message


def test_a_loaded_error_crosses_processes():
    again = pickle.loads(pickle.dumps(messages.Loaded(2, error=FileNotFoundError("no model"))))
    assert again.result is None and isinstance(again.error, FileNotFoundError) and str(again.error) == "no model"


def test_the_decode_loop_hands_other_messages_on_and_stops_on_stop():
    inbox, taken = queue.SimpleQueue(), []
    for message in (messages.Load(1, "m"), messages.Cancel(9), messages.Unload(1), messages.Stop(),
                    messages.Unload(2)):
        inbox.put(message)
    settings = {"max_batch_size": 4, "wait_s": 0.0, "join_ratio": 0.0, "join_max_wait_steps": 0}
    decode_loop(inbox.get, inbox.empty, lambda *_: None, settings, engine_of=lambda e: e, on_message=taken.append)
    assert taken == [messages.Load(1, "m"), messages.Unload(1)]
