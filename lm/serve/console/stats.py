"""The serving numbers the console's operators' view shows, aggregated by the ingress replica itself from
what its Prometheus metrics get: every request the gate records (``lmforge_requests`` and
``lmforge_request_latency_ms``, by route and status, lm.serve.gate), the tokens each answer generated and
its response-cache lookups (a deterministic request is looked up, lm.serve.cache; ``lmforge_cache_lookups``).

    stats = LiveStats()
    Gate.configure(grants, max_body, Tee(ServeMetrics(), stats))   # the gate records into both
    stats.answered(completion_tokens, model_requests, heads)       # an answer has ended
    stats.snapshot()                                               # what GET /v1/console/stats returns

Pure bookkeeping in one process (each ingress replica keeps its own; no Ray).
"""

from __future__ import annotations

import threading
import time
from collections import Counter, deque
from typing import Any

from lm.serve.cache import ResponseCache

WINDOW_S = 60.0  # tokens per second over the last minute
LATENCY_SAMPLES = 2000  # per route: the latency percentiles are over its latest requests


def percentile(values: list[float], pct: int) -> float | None:
    """The ``pct``-th percentile (1..100) of ``values`` by the nearest rank; None when there are none."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, -(-pct * len(ordered) // 100) - 1)]  # rank ceil(pct/100 * n)


class LiveStats:
    """Requests by route and status, latency percentiles per route, tokens/s, cache hit rate (one replica)."""

    def __init__(self, clock=time.monotonic):
        self.clock, self.started = clock, clock()
        self.requests: Counter[tuple[str, int]] = Counter()
        self.latency: dict[str, deque[float]] = {}
        self.tokens: deque[tuple[float, int]] = deque()
        self.total_tokens = self.hits = self.misses = 0
        self._lock = threading.Lock()

    def record(self, route: str, status: int, latency_ms: float) -> None:
        """lm.serve.gate's RequestMetrics: one answered request."""
        with self._lock:
            self.requests[(route, int(status))] += 1
            self.latency.setdefault(route, deque(maxlen=LATENCY_SAMPLES)).append(latency_ms)

    def answered(self, completion_tokens: int, requests: list[dict], heads: list[dict]) -> None:
        """A generation answer has ended: its tokens, and a cache lookup per deterministic model request
        (a hit when the model answered it from the cache)."""
        now = self.clock()
        with self._lock:
            if completion_tokens:
                self.tokens.append((now, completion_tokens))
                self.total_tokens += completion_tokens
            for request, head in zip(requests, heads, strict=False):
                if ResponseCache.deterministic(request):
                    hit = bool(head.get("cached"))
                    self.hits, self.misses = self.hits + hit, self.misses + (not hit)

    def snapshot(self) -> dict[str, Any]:
        now = self.clock()
        with self._lock:
            while self.tokens and self.tokens[0][0] <= now - WINDOW_S:
                self.tokens.popleft()
            window = min(WINDOW_S, max(now - self.started, 1e-9))
            lookups = self.hits + self.misses
            hit_rate = self.hits / lookups if lookups else None
            routes = sorted({route for route, _ in self.requests})
            return {
                "uptime_s": now - self.started,
                "requests": [{"route": r, "status": s, "count": n} for (r, s), n in sorted(self.requests.items())],
                "latency_ms": {r: {f"p{q}": percentile(list(self.latency.get(r, ())), q) for q in (50, 90, 99)}
                               | {"samples": len(self.latency.get(r, ()))} for r in routes},
                "tokens_per_s": sum(n for _, n in self.tokens) / window,
                "tokens_total": self.total_tokens,
                "cache": {"hits": self.hits, "misses": self.misses, "hit_rate": hit_rate},
            }


class Tee:
    """Several RequestMetrics as one (the gate records into Ray's metrics and into :class:`LiveStats`)."""

    def __init__(self, *sinks):
        self.sinks = sinks

    def record(self, route: str, status: int, latency_ms: float) -> None:
        for sink in self.sinks:
            sink.record(route, status, latency_ms)
