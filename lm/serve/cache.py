"""An exact-match response cache for deterministic requests (bounded LRU, thread-safe, no Ray).

It owns the cache key (the model version + the whole request, canonical JSON, SHA-256) and the rule
that only deterministic requests are cached: temperature 0 (greedy), or a seed. A request with
temperature > 0 and no seed (temperature absent counts as OpenAI's default 1) gets no key, so it is
never looked up nor stored. The caller decides what goes into the request dict: every field that
changes the response (prompt or messages, max_tokens, stop, logprobs, n, stream...) must be in it;
fields that do not (``user``) may be left out to share entries.

    cache = ResponseCache(max_entries=1024)                 # 0 disables it (key() is then always None)
    key = cache.key(model_version, request.model_dump())
    if key is not None and (hit := cache.get(key)) is not None:
        return hit
    response = ...
    if key is not None:
        cache.put(key, response)
    cache.hits, cache.misses, cache.hit_rate

Values are deep-copied in and out, so a caller may change what it got without touching the cache.
"""

from __future__ import annotations

import copy
import hashlib
import json
import threading
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any


class ResponseCache:
    """At most ``max_entries`` responses, least recently used evicted first; one lock guards all."""

    def __init__(self, max_entries: int):
        if max_entries < 0:
            raise ValueError(f"max_entries must be >= 0 (0 disables the cache), got {max_entries}")
        self.max_entries = max_entries
        self._entries: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @property
    def enabled(self) -> bool:
        return self.max_entries > 0

    @staticmethod
    def deterministic(request: Mapping[str, Any]) -> bool:
        """Greedy (temperature 0) or seeded; a missing or null temperature is OpenAI's default 1."""
        temperature = request.get("temperature")
        return (temperature is not None and float(temperature) == 0.0) or request.get("seed") is not None

    def key(self, model_version: str, request: Mapping[str, Any]) -> str | None:
        """The cache key of ``request`` for ``model_version``; None if it must not be cached."""
        if not self.enabled or not self.deterministic(request):
            return None
        canonical = json.dumps({"model": model_version, "request": request}, sort_keys=True,
                               separators=(",", ":"), ensure_ascii=False, default=str)
        return hashlib.sha256(canonical.encode()).hexdigest()

    def get(self, key: str) -> Any | None:
        """The stored response (a copy), marked most recently used; None on a miss."""
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                self.hits += 1
                value = self._entries[key]
            else:
                self.misses += 1
                return None
        return copy.deepcopy(value)

    def put(self, key: str, value: Any) -> None:
        """Store a copy of ``value``; evict the least recently used entries beyond ``max_entries``."""
        if not self.enabled:
            return
        value = copy.deepcopy(value)
        with self._lock:
            self._entries[key] = value
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    @property
    def hit_rate(self) -> float:
        """hits / (hits + misses); 0.0 before any lookup."""
        with self._lock:
            lookups = self.hits + self.misses
            return self.hits / lookups if lookups else 0.0

    def stats(self) -> dict[str, float]:
        with self._lock:
            lookups = self.hits + self.misses
            return {"entries": len(self._entries), "max_entries": self.max_entries, "hits": self.hits,
                    "misses": self.misses, "hit_rate": self.hits / lookups if lookups else 0.0}

    def clear(self) -> None:
        """Drop every entry (e.g. when a new model version is deployed); counters stay."""
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)
