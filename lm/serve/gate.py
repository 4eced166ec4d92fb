"""The ingress's gate (pure ASGI middleware): the API key and the declared body size are checked before
FastAPI reads or validates a body, so a client without a valid key learns nothing about the request schema
(401 first) and an oversized body is refused (413) before it is read. The one place for such checks.

Each replica's ingress calls :meth:`Gate.configure` with its key digests and limit (a replica is a process:
the settings are the process's). Routes under ``/v1/`` are gated; ``/healthz`` and the OpenAPI schema are
not. The route handlers check the key and the body's real size again (a chunked body declares no length).
"""

from __future__ import annotations

from typing import Any, ClassVar

from starlette.responses import JSONResponse

from lm.serve.auth import authorized
from lm.serve.schemas import error_body


class Gate:
    digests: ClassVar[frozenset[str]] = frozenset()
    max_body_bytes: ClassVar[int | None] = None  # None: not configured yet (nothing is served then)

    def __init__(self, app: Any):
        self.app = app

    @classmethod
    def configure(cls, digests: frozenset[str], max_body_bytes: int) -> None:
        cls.digests, cls.max_body_bytes = digests, max_body_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        refusal = self._refusal(scope) if scope["type"] == "http" and "/v1/" in scope["path"] else None
        if refusal is None:
            await self.app(scope, receive, send)
        else:
            await JSONResponse(refusal[1], status_code=refusal[0])(scope, receive, send)

    def _refusal(self, scope: dict) -> tuple[int, dict] | None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if not authorized(headers.get("authorization"), self.digests):
            return 401, error_body("missing or invalid API key (send Authorization: Bearer <key>)",
                                   type_="authentication_error", code="invalid_api_key")
        declared = headers.get("content-length", "")
        if declared and not declared.isdigit():
            return 400, error_body(f"Content-Length {declared[:40]!r} is not a number")
        if declared and self.max_body_bytes is not None and int(declared) > self.max_body_bytes:
            return 413, error_body(f"request body of {declared} bytes exceeds {self.max_body_bytes}", code="too_large")
        return None
