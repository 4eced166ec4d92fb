"""A model replica that dies under a request, as the ingress sees it (lm.serve.app with a separate model
deployment). Until the client has received anything, sending the request again is safe: a whole
(non-streamed) request, or a stream before its first chunk, is sent again (Serve's router has dropped the
dead replica, so it goes to another) up to ``serve.failover_retries`` times; then, or with a single model
replica (nothing to fail over to), the route answers 503 with Retry-After (lm.serve.errors.Unavailable).

A stream whose replica dies after its first chunk cannot be retried (the client has part of it): it ends
with an error event in OpenAI's shape and no ``[DONE]``. With ``serve.colocate`` the handler itself dies
with the replica: Serve's HTTP proxy answers the requests it held, with lm.serve.proxy's 503.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from ray.exceptions import RayActorError, RayTaskError

from lm.serve.errors import Unavailable
from lm.serve.schemas import error_body

T = TypeVar("T")
BACKOFF_S = 0.2  # before attempt k (k >= 1): k x this, while Serve's router and controller catch up


def replica_died(err: BaseException) -> bool:
    """ActorDiedError / ActorUnavailableError (both RayActorError), also when a task error wraps one."""
    return isinstance(err, RayActorError) or (isinstance(err, RayTaskError)
                                              and isinstance(getattr(err, "cause", None), RayActorError))


class Failover:
    def __init__(self, retries: int, retry_after_s: int):
        self.retries, self.retry_after_s = retries, retry_after_s

    async def call(self, attempt: Callable[[], Awaitable[T]]) -> T:
        """``attempt()``'s result, made again while the replica answering it dies (then 503)."""
        for tried in range(self.retries + 1):
            if tried:
                await asyncio.sleep(BACKOFF_S * tried)
            try:
                return await attempt()
            except Exception as err:
                if not replica_died(err):
                    raise
        raise Unavailable(f"the model replica serving this request went away ({self.retries} retries); "
                          "try again shortly", self.retry_after_s)

    async def open(self, start: Callable[[], Any]) -> tuple[Any, dict]:
        """A model stream and its first chunk (the head), started again while its replica dies first."""
        async def first() -> tuple[Any, dict]:
            stream = start()
            return stream, await stream.__anext__()

        return await self.call(first)


async def guarded(chunks: AsyncIterator[str]) -> AsyncIterator[str]:
    """Server-sent events that end with an OpenAI-shaped error event if the model replica dies mid-stream."""
    try:
        async for chunk in chunks:
            yield chunk
    except Exception as err:
        if not replica_died(err):
            raise
        body = error_body("the model replica serving this stream went away; send the request again",
                          type_="service_unavailable", code="replica_unavailable")
        yield f"data: {json.dumps(body)}\n\n"
