"""The API's OpenAPI schema as the server answers (``GET /openapi.json``; lm.serve.app serves
:func:`openapi_schema`, re-exported by lm.serve.schemas): every status of every route with its error body
(lm.serve.schemas.AUTH_ERRORS, REQUEST_ERRORS) and never FastAPI's 422, the key requirement (a bearer API key
on every ``/v1/`` route), each route's 200 body (:data:`RESPONSES`) and, for ``stream: true``, its server-sent
events, and integer bounds written exactly. Generated clients and API fuzzers (tests/integration/test_serve.py
runs schemathesis against it) read what the server does. No Ray.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Out(BaseModel):
    """A response body as documented (the OpenAPI schema's 200s: RESPONSES); lm.serve.schemas' builders write them."""

    model_config = ConfigDict(extra="forbid")


class Usage(_Out):
    prompt_tokens: int
    completion_tokens: int = Field(0, description="Absent for embeddings.")
    total_tokens: int


class Source(_Out):
    id: str
    doc: str
    source: str
    score: float
    text: str


class Choice(_Out):
    index: int
    finish_reason: Literal["stop", "length"]
    sources: list[Source] | None = Field(None, description="The passages put into the prompt (rag requests).")


class TokenLogprobs(_Out):
    tokens: list[str]
    token_logprobs: list[float | None] = Field(description="Per token, its logprob; with echo the prompt's tokens "
                                               "come first, and its first one has none (null).")
    top_logprobs: list[dict[str, float] | None] = Field(description="Per token, its logprobs likeliest tokens and "
                                                        "itself (null for an echoed prompt's first token).")
    text_offset: list[int]


class CompletionChoice(Choice):
    text: str
    logprobs: TokenLogprobs | None


class AssistantMessage(_Out):
    role: Literal["assistant"]
    content: str


class TopLogprob(_Out):
    token: str
    logprob: float
    bytes: list[int] = Field(description="The token's UTF-8 bytes.")


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(description="The top_logprobs likeliest tokens, likeliest first.")


class ChatLogprobs(_Out):
    content: list[TokenLogprob]
    refusal: None


class ChatChoice(Choice):
    message: AssistantMessage
    logprobs: ChatLogprobs | None = Field(description="With logprobs: the chosen tokens' log-probabilities.")


class Completion(_Out):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    system_fingerprint: str = Field(description="The model version that answered.")


class ChatCompletion(Completion):
    object: Literal["chat.completion"]
    choices: list[ChatChoice]


class Embedding(_Out):
    object: Literal["embedding"]
    index: int
    embedding: list[float] | str = Field(description="The vector, or (base64) its little-endian float32 bytes.")


class EmbeddingList(_Out):
    id: str = Field(description="The response record's id (lmforge's; `lm lineage` starts from it).")
    system_fingerprint: str = Field(description="The model version that answered.")
    object: Literal["list"]
    model: str
    usage: Usage
    data: list[Embedding]


class ModelCard(_Out):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(_Out):
    object: Literal["list"]
    data: list[ModelCard]


class FeedbackRecorded(_Out):
    id: str
    object: Literal["feedback"]
    recorded: bool


class Health(_Out):
    status: Literal["ok"]


RESPONSES = {"/healthz": Health, "/v1/models": ModelList, "/v1/completions": Completion,
             "/v1/chat/completions": ChatCompletion, "/v1/embeddings": EmbeddingList,
             "/v1/feedback": FeedbackRecorded}  # each route's 200 (JSON)


# ``stream: true``: server-sent events, each ``data:`` one JSON chunk and the last ``[DONE]``
_EVENTS = {"schema": {"type": "object", "required": ["data"], "properties": {"data": {"type": "string"}},
                      "description": "One server-sent event: a chunk as JSON, or [DONE] at the end."}}


def openapi_schema(app: Any) -> dict:
    """A FastAPI app's OpenAPI schema with the statuses the server answers (its routes' ``responses``):
    errors are 400s in OpenAI's shape, never FastAPI's 422, which it adds to every route with a body."""
    if app.openapi_schema is None:
        from fastapi.openapi.utils import get_openapi

        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        schema = _exact_bounds(schema)
        components = schema.setdefault("components", {})
        for path in schema["paths"].values():
            for operation in path.values():
                _document(operation, components.get("schemas", {}))
        _document_responses(schema)
        for name in ("HTTPValidationError", "ValidationError"):
            components.get("schemas", {}).pop(name, None)
        components["securitySchemes"] = {"apiKey": {"type": "http", "scheme": "bearer",
                                                    "description": "An API key (serve.api_keys, serve.api_keys_file)."}}
        app.openapi_schema = schema
    return app.openapi_schema


def _document_responses(schema: dict) -> None:
    """Each route's 200 body (RESPONSES) in the schema's components."""
    from pydantic.json_schema import models_json_schema

    refs, defs = models_json_schema([(model, "validation") for model in RESPONSES.values()],
                                    ref_template="#/components/schemas/{model}")
    schema["components"].setdefault("schemas", {}).update(defs["$defs"])
    for path, model in RESPONSES.items():
        for operation in schema["paths"].get(path, {}).values():
            operation["responses"]["200"]["content"]["application/json"]["schema"] = refs[(model, "validation")]


def _exact_bounds(node: Any) -> Any:
    """The schema with its integral bounds as integers: FastAPI writes each bound as a double, whose decimal
    text is not the bound past 2**53 (2**63 becomes 9.223372036854776e+18, read as 9223372036854776000)."""
    if isinstance(node, list):
        return [_exact_bounds(item) for item in node]
    if not isinstance(node, dict):
        return node
    return {key: int(value) if key in _BOUNDS and isinstance(value, float) and value.is_integer()
            else _exact_bounds(value) for key, value in node.items()}


_BOUNDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")


def _document(operation: dict, models: dict) -> None:
    """An operation's key requirement (the routes that answer 401), no 422, and its event stream (the routes
    whose body has ``stream``)."""
    responses = operation["responses"]
    responses.pop("422", None)
    if "401" in responses:
        operation["security"] = [{"apiKey": []}]
    body = operation.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema", {})
    if "stream" in models.get(body.get("$ref", "").rsplit("/", 1)[-1], {}).get("properties", {}):
        responses["200"].setdefault("content", {})["text/event-stream"] = _EVENTS
