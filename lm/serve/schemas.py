"""The OpenAI wire format: request models (validated by FastAPI), response and streaming-chunk builders,
the error shape, and the chat template. No Ray.

Requests reject unknown fields and wrong types (FastAPI turns a validation error into a 400 in
OpenAI's error shape through :func:`error_body`, naming the field). Limits that depend on the deployed
model or config (max_tokens, context length, n) are checked by the ingress (lm.serve.app).

Chat template ``plain``: each message becomes ``System: …`` / ``User: …`` / ``Assistant: …``, turns are
separated by a blank line, and the prompt ends with ``Assistant:``; generation stops at the next
``\\n\\nUser:`` or ``\\n\\nSystem:`` (added to the request's stop strings).
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator
from pydantic_core import PydanticCustomError

from lm import chat
from lm.serve.openapi import openapi_schema as openapi_schema  # lm.serve.app serves it

CHAT_STOPS = chat.CHAT_STOPS  # the template lives in lm.chat (shared with supervised fine-tuning)
# Request models: no unknown fields, and no coercion (``"yes"`` or ``1`` is no boolean, ``false`` or ``"3"`` no
# integer), so the server accepts exactly what the OpenAPI schema documents. As in JSON Schema, ``3.0`` is an
# integer (Int).
STRICT = ConfigDict(extra="forbid", strict=True)
MODEL = "The served model's id (GET /v1/models: serve.model_name, lmforge unless configured)."


def _integral(value: Any) -> Any:
    return int(value) if isinstance(value, float) and value.is_integer() else value


def Int(**bounds: int) -> Any:
    """An integer field's type within ``bounds`` (ge, lt, ...): ``3.0`` is 3, ``true`` and ``"3"`` are refused."""
    return Annotated[int, Field(**bounds), BeforeValidator(_integral)]


def one_of(field: str, shapes: str) -> Any:
    """A union field's validator: one error naming the field and its documented ``shapes`` (param ``field``),
    not one per member of the union (``prompt.list[constrained-str]``)."""
    def check(cls, value: Any, handler: Any) -> Any:
        try:
            return handler(value)
        except ValidationError:
            raise PydanticCustomError("shape", f"must be {shapes}") from None

    return field_validator(field, mode="wrap")(classmethod(check))


Text = Annotated[str, Field(min_length=1)]
Ids = Annotated[list[Int(ge=0)], Field(min_length=1)]


class RagOptions(BaseModel):
    model_config = STRICT

    top_k: Int(ge=1) | None = Field(None, description="Passages to retrieve (default: rag.top_k).")


class StreamOptions(BaseModel):
    model_config = STRICT

    include_usage: bool = False


TokenId = Annotated[str, Field(pattern=r"^[0-9]{1,9}$")]


class _Request(BaseModel):
    model_config = STRICT

    model: str = Field(..., min_length=1, description=MODEL, examples=["lmforge"])
    max_tokens: Int(ge=1) | None = Field(None, description="Tokens to generate at most.")
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: Int(ge=1, le=2**31 - 1) | None = Field(None, description="lmforge extension: keep the k likeliest tokens.")
    n: Int(ge=1) = 1
    stream: bool = False
    stop: str | Annotated[list[str], Field(max_length=4)] | None = Field(None, description="Up to 4 sequences.")
    _stop = one_of("stop", "a string or a list of at most 4")
    # bounded below 2**63, not at 2**63 - 1: FastAPI writes bounds as doubles, and 2**63 - 1 is none
    seed: Int(ge=-(2**63), lt=2**63) | None = Field(None, description="A 64-bit integer: the same seed and "
                                                    "prompt give the same text (choice j of n uses seed + j).")
    user: str | None = None
    presence_penalty: float = Field(0.0, ge=-2, le=2, description="Subtracted from the logit of every token "
                                    "generated so far in this choice (OpenAI's).")
    frequency_penalty: float = Field(0.0, ge=-2, le=2, description="Times the count of each token generated so "
                                     "far in this choice, subtracted from its logit (OpenAI's).")
    logit_bias: Annotated[dict[TokenId, Annotated[float, Field(ge=-100, le=100)]],
                          Field(json_schema_extra={"additionalProperties": False})] | None = Field(
        None, description="Token id (a decimal string) -> a bias in [-100, 100] added to its logit.")
    stream_options: StreamOptions | None = Field(None, description="With stream: include_usage sends a last "
                                                 "chunk with the usage and no choices.")
    template: str | None = Field(None, description="lmforge extension: a named prompt template (serve.templates) "
                                 "applied to the prompt (chat: to the last user message).")
    template_vars: dict[str, str] = Field(default_factory=dict, description="The template's other {fields}.")
    rag: bool | RagOptions = Field(False, description="lmforge extension: put the best passages of the retrieval "
                                   "index into the prompt (serve.rag); the response lists them as sources.")

    def rag_top_k(self, default: int) -> int | None:
        """Passages asked for (None: no retrieval)."""
        if isinstance(self.rag, RagOptions):
            return self.rag.top_k or default
        return default if self.rag else None

    def bias(self) -> dict[int, float] | None:
        return {int(t): b for t, b in self.logit_bias.items()} if self.logit_bias else None

    def usage_chunk(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def stop_list(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return [s for s in stops if s]


class CompletionRequest(_Request):
    prompt: str | Annotated[list[str], Field(min_length=1)] | Ids | Annotated[list[Ids], Field(min_length=1)] = Field(
        ..., description="A prompt or a non-empty list of prompts; a prompt is text or a token-id list.")
    _prompt = one_of("prompt", "a string, a token-id list, or a non-empty list of either")
    max_tokens: Int(ge=0) | None = Field(16, description="Tokens to generate at most; 0 with echo and logprobs "
                                         "scores the prompt alone (log-likelihood).")
    echo: bool = Field(False, description="Put the prompt in front of the text, and with logprobs its tokens' "
                       "log-probabilities (the first token's null) in front of the generated ones'.")
    logprobs: Int(ge=0, le=5) | None = Field(None, description="Return the chosen tokens' log-probabilities and "
                                             "the likeliest N of each (top_logprobs).")

    def prompts(self) -> list[str | list[int]]:
        if isinstance(self.prompt, str) or isinstance(self.prompt[0], int):
            return [self.prompt]
        return list(self.prompt)


class TextPart(BaseModel):
    model_config = STRICT

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = STRICT

    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart] = Field(..., description="Text, or a list of text parts (joined by newlines).")
    name: str | None = None

    @field_validator("content", mode="wrap")
    @classmethod
    def _parts(cls, value: Any, handler: Any) -> Any:
        try:
            return handler(value)
        except ValidationError:
            kinds = sorted({str(p.get("type")) for p in value if isinstance(p, dict) and p.get("type") != "text"}
                           if isinstance(value, list) else [])
            if kinds:
                raise PydanticCustomError("part", f"content parts of type {kinds} are not supported; "
                                          "only text parts") from None
            raise PydanticCustomError("shape", "must be a string or a list of text parts") from None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "\n".join(p.text for p in self.content)


class JsonSchemaFormat(BaseModel):
    model_config = STRICT

    name: str = Field(..., pattern=r"^[A-Za-z0-9_-]{1,64}$", description="The schema's name.")
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema", description="A JSON Schema the answer follows "
                                           "(absent: any JSON value); keywords the grammar engine does not "
                                           "support get a 400 naming them.")
    strict: bool | None = Field(None, description="Accepted; the schema is always enforced.")


class TextFormat(BaseModel):
    model_config = STRICT

    type: Literal["text"]


class JsonObjectFormat(BaseModel):
    model_config = STRICT

    type: Literal["json_object"]


class JsonSchemaResponseFormat(BaseModel):
    model_config = STRICT

    type: Literal["json_schema"]
    json_schema: JsonSchemaFormat


ResponseFormat = Annotated[TextFormat | JsonObjectFormat | JsonSchemaResponseFormat, Field(discriminator="type")]


class ChatRequest(_Request):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: Int(ge=1) | None = None
    logprobs: bool = Field(False, description="Return the chosen tokens' log-probabilities (choices[].logprobs).")
    top_logprobs: Int(ge=0, le=20) | None = Field(None, description="With logprobs: the likeliest tokens per token.")
    response_format: ResponseFormat | None = Field(None, description="Structured output: json_object or "
                                                   "json_schema answers are decoded under the schema's grammar "
                                                   "(finish_reason stop: the answer validates; stop strings do not "
                                                   "apply).")

    def token_budget(self, default: int) -> int:
        return self.max_completion_tokens or self.max_tokens or default

    def format(self) -> dict | None:
        """response_format for the model deployment (lm.serve.grammar.json_grammar); None for plain text."""
        fmt = self.response_format
        return None if fmt is None or fmt.type == "text" else fmt.model_dump(by_alias=True, exclude_none=True)


class EmbeddingRequest(BaseModel):
    model_config = STRICT

    model: str = Field(..., min_length=1, description=MODEL, examples=["lmforge"])
    input: Text | Annotated[list[Text], Field(min_length=1)] | Ids | Annotated[list[Ids], Field(min_length=1)] = Field(
        ..., description="Text(s) or token-id list(s), none empty.")
    _input = one_of("input", "a non-empty string or token-id list, or a non-empty list of them")
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Int(ge=1) | None = Field(None, description="Accepted only when it is the model's own width.")
    user: str | None = None

    def inputs(self) -> list:
        if isinstance(self.input, str) or (self.input and isinstance(self.input[0], int)):
            return [self.input]
        return list(self.input)


class FeedbackRequest(BaseModel):
    # a rating, a correction or both (documented; the ingress answers 400 otherwise)
    model_config = ConfigDict(**STRICT, json_schema_extra={"anyOf": [
        {"required": [field], "properties": {field: {"not": {"type": "null"}}}} for field in ("rating", "correction")]})

    id: str = Field(..., pattern=r"^(cmpl|chatcmpl)-[A-Za-z0-9]+$", description="The id of a completion.")
    rating: Int(ge=-1, le=1) | None = Field(None, description="-1 bad, 0 neutral, 1 good.")
    correction: str | None = Field(None, min_length=1, description="What the answer should have been.")

    def has_content(self) -> bool:
        return self.rating is not None or self.correction is not None


def chat_prompt(messages: list[ChatMessage]) -> str:
    """The ``plain`` chat template (see the module docstring; lm.chat renders it)."""
    return chat.chat_prompt([m.model_copy(update={"content": m.text()}) for m in messages])


def apply_template(templates: dict[str, str], name: str, prompt: str, variables: dict[str, str]) -> str:
    """The named template with ``prompt`` and ``variables`` filled in (ValueError naming what is wrong)."""
    from string import Formatter

    if name not in templates:
        raise ValueError(f"template {name!r} does not exist; this server has {sorted(templates) or 'none'}")
    fields = {f for _, f, _, _ in Formatter().parse(templates[name]) if f}
    if missing := sorted(fields - {"prompt"} - set(variables)):
        raise ValueError(f"template {name!r} needs template_vars {missing}")
    if extra := sorted(set(variables) - fields):
        raise ValueError(f"template {name!r} has no fields {extra}")
    return templates[name].format(**{**variables, "prompt": prompt})


def embedding_response(model: str, vectors: list[list[float]], encoding: str, prompt_tokens: int) -> dict:
    """OpenAI's embeddings list (``base64``: little-endian float32 bytes, as the openai client expects)."""
    import base64

    import numpy as np

    def encode(v: list[float]):
        return base64.b64encode(np.asarray(v, dtype="<f4").tobytes()).decode() if encoding == "base64" else v

    return {"object": "list", "model": model, "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
            "data": [{"object": "embedding", "index": i, "embedding": encode(v)} for i, v in enumerate(vectors)]}


def with_sources_choice(choice: dict, head: dict) -> dict:
    """A choice with the passages retrieval put into its prompt (``rag`` requests: the model's ``sources``)."""
    return {**choice, "sources": head["sources"]} if "sources" in head else choice


def with_sources(chunk: dict, head: dict) -> dict:
    chunk["choices"] = [with_sources_choice(c, head) for c in chunk["choices"]]
    return chunk


def new_id(kind: str) -> str:
    return f"{kind}-{uuid.uuid4().hex[:24]}"


class ErrorObject(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error shape: every 4xx and 5xx of the server (the OpenAPI schema documents it per status)."""

    error: ErrorObject


_RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait before sending the request again.", "required": True,
                                "schema": {"type": "integer", "minimum": 1}}}
# A route's ``responses`` (its documented statuses). AUTH_ERRORS: those of every /v1/ route (lm.serve.gate's
# 401 and 429, lm.serve.errors' 503); REQUEST_ERRORS: those of a route with a body besides.
AUTH_ERRORS = {401: {"model": ErrorResponse, "description": "Missing or invalid API key."},
               429: {"model": ErrorResponse, "headers": _RETRY_AFTER,
                     "description": "The key's rate or concurrency limit is reached (serve.key_limits)."},
               503: {"model": ErrorResponse, "headers": _RETRY_AFTER,
                     "description": "No model replica could answer (the one serving the request went away)."}}
REQUEST_ERRORS = {**AUTH_ERRORS, **{status: {"model": ErrorResponse, "description": why} for status, why in (
    (400, "Invalid request (names the param)."), (404, "Unknown model (or feedback capture off)."),
    (413, "Request body larger than serve.max_body_bytes."))}}


def error_body(message: str, *, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    """OpenAI's error object."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_response(rid: str, model: str, choices: list[dict], prompt_tokens: int, completion_tokens: int) -> dict:
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": choices, "usage": usage(prompt_tokens, completion_tokens)}


def completion_chunk(rid: str, model: str, index: int, text: str, finish_reason: str | None,
                     logprobs: dict | None = None, usage_: dict | None = None) -> dict:
    if usage_ is not None:  # stream_options.include_usage: the last chunk
        return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
                "choices": [], "usage": usage_}
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"text": text, "index": index, "logprobs": logprobs, "finish_reason": finish_reason}]}


def completion_logprobs(whole: dict) -> dict:
    """OpenAI's legacy logprobs of a completion (or chunk) from the model deployment: each token, its logprob,
    its ``logprobs`` likeliest (and itself) as token -> logprob, and its offset in the text."""
    offsets, seen = [], b""
    for raw in whole["token_bytes"]:  # characters before the token (one in pieces counts once whole)
        offsets.append(len(seen.decode(errors="ignore")))
        seen += bytes(raw)
    tops = []
    for token, lp, alts in zip(whole["tokens"], whole["logprobs"], whole["top_logprobs"], strict=True):
        if alts is None:  # an echoed prompt's first token: nothing before it to predict it from
            tops.append(None)
            continue
        top = {}
        for text, _, logprob in alts:
            top.setdefault(text, logprob)
        top.setdefault(token, lp)
        tops.append(top)
    return {"tokens": whole["tokens"], "token_logprobs": whole["logprobs"], "top_logprobs": tops,
            "text_offset": offsets}


def chat_logprobs(whole: dict) -> dict:
    """OpenAI's chat logprobs: per token its text, logprob, UTF-8 bytes and its ``top_logprobs`` likeliest."""
    def entry(token: str, raw: list[int], logprob: float) -> dict:
        return {"token": token, "logprob": logprob, "bytes": raw}

    return {"content": [{**entry(t, raw, lp), "top_logprobs": [entry(*alt) for alt in alts]}
                        for t, raw, lp, alts in zip(whole["tokens"], whole["token_bytes"], whole["logprobs"],
                                                    whole["top_logprobs"], strict=True)], "refusal": None}


def chat_response(rid: str, model: str, choices: list[dict], prompt_tokens: int, completion_tokens: int) -> dict:
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": choices, "usage": usage(prompt_tokens, completion_tokens)}


def chat_chunk(rid: str, model: str, index: int, delta: dict, finish_reason: str | None,
               usage_: dict | None = None, logprobs: dict | None = None) -> dict:
    chunk = {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
             "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}]}
    if usage_ is not None:
        chunk["choices"] = []
        chunk["usage"] = usage_
    return chunk
