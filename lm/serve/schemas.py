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
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

CHAT_STOPS = ["\n\nUser:", "\n\nSystem:"]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(..., min_length=1)
    max_tokens: int | None = Field(None, ge=1, description="Tokens to generate at most.")
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int | None = Field(None, ge=1, description="lmforge extension: keep the k likeliest tokens.")
    n: int = Field(1, ge=1)
    stream: bool = False
    stop: str | list[str] | None = Field(None)
    seed: int | None = None
    user: str | None = None
    presence_penalty: float = Field(0.0, ge=0, le=0, description="Accepted for compatibility; only 0 is supported.")
    frequency_penalty: float = Field(0.0, ge=0, le=0, description="Accepted for compatibility; only 0 is supported.")

    def stop_list(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return [s for s in stops if s]


class CompletionRequest(_Request):
    prompt: str | list[str] = Field(..., description="A prompt or a list of prompts.")
    max_tokens: int | None = Field(16, ge=1)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=5, description="Return the chosen tokens' log-probabilities.")

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant"]
    content: str
    name: str | None = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool = False


class ChatRequest(_Request):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stream_options: StreamOptions | None = None
    logprobs: bool = False

    def token_budget(self, default: int) -> int:
        return self.max_completion_tokens or self.max_tokens or default


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str = Field(..., pattern=r"^(cmpl|chatcmpl)-[A-Za-z0-9]+$", description="The id of a completion.")
    rating: int | None = Field(None, ge=-1, le=1, description="-1 bad, 0 neutral, 1 good.")
    correction: str | None = Field(None, min_length=1, description="What the answer should have been.")

    def has_content(self) -> bool:
        return self.rating is not None or self.correction is not None


def chat_prompt(messages: list[ChatMessage]) -> str:
    """The ``plain`` chat template (see the module docstring)."""
    turns = [f"{m.role.capitalize()}: {m.content}" for m in messages]
    return "\n\n".join([*turns, "Assistant:"])


def new_id(kind: str) -> str:
    return f"{kind}-{uuid.uuid4().hex[:24]}"


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
                     logprobs: dict | None = None) -> dict:
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"text": text, "index": index, "logprobs": logprobs, "finish_reason": finish_reason}]}


def chat_response(rid: str, model: str, choices: list[dict], prompt_tokens: int, completion_tokens: int) -> dict:
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": choices, "usage": usage(prompt_tokens, completion_tokens)}


def chat_chunk(rid: str, model: str, index: int, delta: dict, finish_reason: str | None,
               usage_: dict | None = None) -> dict:
    chunk = {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
             "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}
    if usage_ is not None:
        chunk["choices"] = []
        chunk["usage"] = usage_
    return chunk
