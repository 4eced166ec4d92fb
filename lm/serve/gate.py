"""The ingress's gate (pure ASGI middleware), the one place for who may call and how much: the API key, the
declared body size and the key's limits are checked before FastAPI reads or validates a body, so a client
without a valid key learns nothing about the request schema (401 first), an oversized body is refused (413)
before it is read, and a key over its limits gets 429 with Retry-After (lm.serve.limits).

Each replica's ingress calls :meth:`Gate.configure` with its keys' grants (digest → name, role, limits: this
replica's share) and the body limit (a replica is a process: the settings are the process's). Routes under
``/v1/`` are gated; ``/healthz`` and the OpenAPI schema are not. A route reports the tokens a request used
with :func:`report_usage`; the gate counts them against the key when the response has ended.
"""

from __future__ import annotations

import math
import time
from typing import Any, ClassVar

from starlette.requests import Request
from starlette.responses import JSONResponse

from lm.serve.auth import Grant, identify
from lm.serve.limits import Limiter
from lm.serve.schemas import error_body

USAGE_TOKENS = "lmforge_usage_tokens"  # the request-state entry a route fills with its tokens used


def report_usage(request: Request, tokens: int) -> None:
    request.scope.setdefault("state", {})[USAGE_TOKENS] = tokens


class Gate:
    grants: ClassVar[dict[str, Grant]] = {}
    limiter: ClassVar[Limiter] = Limiter({})
    max_body_bytes: ClassVar[int | None] = None  # None: not configured yet (nothing is served then)

    def __init__(self, app: Any):
        self.app = app

    @classmethod
    def configure(cls, grants: dict[str, Grant], max_body_bytes: int) -> None:
        cls.grants, cls.max_body_bytes = grants, max_body_bytes
        cls.limiter = Limiter({key: grant.limits for key, grant in grants.items()})

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or "/v1/" not in scope["path"]:
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        key = identify(headers.get("authorization"), self.grants)
        refusal = self._refusal(key, headers)
        if refusal is not None:
            status, body, extra = refusal
            await JSONResponse(body, status_code=status, headers=extra)(scope, receive, send)
            return
        state = scope.setdefault("state", {})
        try:
            await self.app(scope, receive, send)
        finally:
            if key:
                self.limiter.release(key, int(state.get(USAGE_TOKENS, 0)), time.monotonic())

    def _refusal(self, key: str | None, headers: dict[str, str]) -> tuple[int, dict, dict | None] | None:
        """(status, body, headers) of a refused request; None: it may go on (and counts against its key)."""
        if key is None:
            return 401, error_body("missing or invalid API key (send Authorization: Bearer <key>)",
                                   type_="authentication_error", code="invalid_api_key"), None
        declared = headers.get("content-length", "")
        if declared and not declared.isdigit():
            return 400, error_body(f"Content-Length {declared[:40]!r} is not a number"), None
        if declared and self.max_body_bytes is not None and int(declared) > self.max_body_bytes:
            return 413, error_body(f"request body of {declared} bytes exceeds {self.max_body_bytes}",
                                   code="too_large"), None
        waited = self.limiter.admit(key, time.monotonic()) if key else None
        if waited is not None:
            seconds, limit = waited
            name = self.grants[key].name
            return 429, error_body(f"rate limit reached for key {name}: {limit}; retry after {seconds:.1f} s",
                                   type_="rate_limit_error", code="rate_limit_exceeded"), \
                {"Retry-After": str(max(1, math.ceil(seconds)))}
        return None
