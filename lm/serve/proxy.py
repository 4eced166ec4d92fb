"""A middleware for Ray Serve's HTTP proxy (Ray's process in front of every replica): a request whose replica
died before it answered gets 503 in OpenAI's error shape with Retry-After. Without it the proxy answers such
a request with a bare plain-text 500 (it maps a dead replica to 500 and sends nothing): what a client of
``serve.colocate`` saw when a replica holding the API died, and of the ingress when its node went away.

The proxy loads it through ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=lm.serve.proxy:middlewares`` in its
environment: lm.cluster.worker_env sets it for the Ray processes a job starts (Serve's controller and proxies
included, when that job starts Serve); on a cluster started elsewhere set it on the nodes. Light on purpose
(Starlette only): the proxy imports nothing else of lmforge.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from starlette.middleware import Middleware

log = logging.getLogger("ray.serve")
RETRY_AFTER_S = 5
_BODY = json.dumps({"error": {"message": "the replica serving this request went away; try again shortly",
                              "type": "service_unavailable", "param": None, "code": "replica_unavailable"}}).encode()


class AnswerWhenReplicaDies:
    """Pure ASGI: an HTTP request the app below ended (or failed) without starting a response gets the 503."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def watched(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, watched)
        except Exception:
            if started:
                raise
            log.warning("a request failed before its response started; answering 503", exc_info=True)
        if not started:
            headers = [(b"content-type", b"application/json"), (b"content-length", str(len(_BODY)).encode()),
                       (b"retry-after", str(RETRY_AFTER_S).encode())]
            await send({"type": "http.response.start", "status": 503, "headers": headers})
            await send({"type": "http.response.body", "body": _BODY})


def middlewares() -> list[Middleware]:
    return [Middleware(AnswerWhenReplicaDies)]
