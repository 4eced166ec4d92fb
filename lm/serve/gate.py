"""The ingress's gate (pure ASGI middleware), the one place for who may call, how much, and what was
answered: the API key, the declared body size and the key's limits are checked before FastAPI reads or
validates a body, so a client without a valid key learns nothing about the request schema (401 first), an
oversized body is refused (413) before it is read, and a key over its limits gets 429 with Retry-After
(lm.serve.limits). Every ``/v1/`` response is counted here, whatever its status (the gate's own refusals,
FastAPI's 400 / 404, the routes' 4xx and 503, a 500 from an exception): ``lmforge_requests`` and
``lmforge_request_latency_ms``, tagged with the route (:func:`route_of`) and the status.

Latency is the time from the gate receiving the request to the response starting (status and headers
sent): for a whole (non-streamed) response that is all of it; for a stream it is the time to its headers,
which go once the model has accepted the request (its head, lm.serve.failover), not the time it streams.

Each replica's ingress calls :meth:`Gate.configure` with its keys' grants (digest → name, role, limits: this
replica's share), the body limit and its metrics (a replica is a process: the settings are the process's).
Routes under ``/v1/`` are gated; ``/healthz`` and the OpenAPI schema are not. A route reports the tokens a
request used with :func:`report_usage`; the gate counts them against the key when the response has ended.
"""

from __future__ import annotations

import math
import time
from typing import Any, ClassVar, Protocol

from starlette.requests import Request
from starlette.responses import JSONResponse

from lm.serve.auth import Grant, identify
from lm.serve.limits import Limiter
from lm.serve.schemas import error_body

USAGE_TOKENS = "lmforge_usage_tokens"  # the request-state entry a route fills with its tokens used
ROUTES = {"/v1/completions": "completions", "/v1/chat/completions": "chat", "/v1/embeddings": "embeddings",
          "/v1/models": "models", "/v1/feedback": "feedback"}  # path -> the metrics' route tag
LATENCY_MS = [5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000]


def report_usage(request: Request, tokens: int) -> None:
    request.scope.setdefault("state", {})[USAGE_TOKENS] = tokens


def route_of(path: str) -> str:
    """The route tag of a gated path: its route's short name, ``console`` for the console's own calls
    (lm.serve.console), or ``other`` (an unknown path: a 404, and no new tag value per path a client makes up)."""
    gated = path[path.find("/v1/"):]
    return "console" if gated.startswith("/v1/console/") else ROUTES.get(gated.rstrip("/"), "other")


class RequestMetrics(Protocol):
    def record(self, route: str, status: int, latency_ms: float) -> None: ...


class NoMetrics:
    def record(self, route: str, status: int, latency_ms: float) -> None:
        pass


class ServeMetrics:
    """The request metrics in Ray's metrics (exported by each node in Prometheus' format); made in a replica."""

    def __init__(self):
        from ray.serve.metrics import Counter, Histogram

        self.requests = Counter("lmforge_requests", description="HTTP requests by route and status.",
                                tag_keys=("route", "status"))
        self.latency = Histogram("lmforge_request_latency_ms", boundaries=LATENCY_MS, tag_keys=("route", "status"),
                                 description="Time to the response's start (ms) by route and status; a stream's "
                                             "time to its headers.")

    def record(self, route: str, status: int, latency_ms: float) -> None:
        tags = {"route": route, "status": str(status)}
        self.requests.inc(tags=tags)
        self.latency.observe(latency_ms, tags=tags)


class Gate:
    grants: ClassVar[dict[str, Grant]] = {}
    limiter: ClassVar[Limiter] = Limiter({})
    max_body_bytes: ClassVar[int | None] = None  # None: not configured yet (nothing is served then)
    metrics: ClassVar[RequestMetrics] = NoMetrics()

    def __init__(self, app: Any):
        self.app = app

    @classmethod
    def configure(cls, grants: dict[str, Grant], max_body_bytes: int, metrics: RequestMetrics | None = None) -> None:
        cls.grants, cls.max_body_bytes, cls.metrics = grants, max_body_bytes, metrics or NoMetrics()
        cls.limiter = Limiter({key: grant.limits for key, grant in grants.items()})

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or "/v1/" not in scope["path"]:
            await self.app(scope, receive, send)
            return
        start, route, started = time.perf_counter(), route_of(scope["path"]), False

        async def measured_send(message: dict) -> None:  # the response's start: its status is known
            nonlocal started
            if message["type"] == "http.response.start" and not started:
                started = True
                self.metrics.record(route, message["status"], (time.perf_counter() - start) * 1000)
            await send(message)

        try:
            await self._gated(scope, receive, measured_send)
        except Exception:
            if not started:  # Starlette's outermost handler answers it: a 500
                self.metrics.record(route, 500, (time.perf_counter() - start) * 1000)
            raise

    async def _gated(self, scope: dict, receive: Any, send: Any) -> None:
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
