"""Per-key limits in one process: requests and tokens per minute over a sliding window, and requests in
flight at once (lm.config.serve.KeyLimits). Pure bookkeeping (the caller passes the clock); lm.serve.gate
asks :meth:`Limiter.admit` before a request and calls :meth:`Limiter.release` when its response has ended.

Tokens are counted when a request ends (its usage: prompt + completion), so a key may go over its token
limit by the requests already in flight; its next requests then wait until the window has room again.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from lm.config.serve import KeyLimits

WINDOW_S = 60.0
BUSY_RETRY_S = 1.0  # Retry-After when a key has max_concurrent requests in flight


@dataclass
class _Usage:
    starts: deque[float] = field(default_factory=deque)                # request start times in the window
    tokens: deque[tuple[float, int]] = field(default_factory=deque)    # (end time, tokens) in the window
    token_sum: int = 0
    in_flight: int = 0

    def forget_before(self, horizon: float) -> None:
        while self.starts and self.starts[0] <= horizon:
            self.starts.popleft()
        while self.tokens and self.tokens[0][0] <= horizon:
            self.token_sum -= self.tokens.popleft()[1]


class Limiter:
    def __init__(self, limits: dict[str, KeyLimits]):
        self.limits = limits
        self.usage: dict[str, _Usage] = {key: _Usage() for key in limits}

    def admit(self, key: str, now: float) -> tuple[float, str] | None:
        """None: the request may start (it is counted from now on); else (seconds to wait, which limit)."""
        limits, usage = self.limits.get(key), self.usage.get(key)
        if limits is None or usage is None:
            return None
        usage.forget_before(now - WINDOW_S)
        if limits.max_concurrent is not None and usage.in_flight >= limits.max_concurrent:
            return BUSY_RETRY_S, f"{limits.max_concurrent} concurrent requests"
        rpm = limits.requests_per_minute
        if rpm is not None and len(usage.starts) >= rpm:
            return usage.starts[len(usage.starts) - rpm] + WINDOW_S - now, f"{rpm} requests per minute"
        tpm = limits.tokens_per_minute
        if tpm is not None and usage.token_sum >= tpm:
            return self._tokens_free_at(usage, tpm) - now, f"{tpm} tokens per minute"
        usage.starts.append(now)
        usage.in_flight += 1
        return None

    def release(self, key: str, tokens: int, now: float) -> None:
        """A request admitted by :meth:`admit` has ended, having used ``tokens``."""
        usage = self.usage.get(key)
        if usage is None or key not in self.limits:
            return
        usage.in_flight -= 1
        if tokens > 0:
            usage.tokens.append((now, tokens))
            usage.token_sum += tokens

    @staticmethod
    def _tokens_free_at(usage: _Usage, limit: int) -> float:
        """When enough of the window's tokens expire for the sum to fall below ``limit``."""
        left = usage.token_sum
        for ended, tokens in usage.tokens:
            left -= tokens
            if left < limit:
                return ended + WINDOW_S
        return usage.tokens[-1][0] + WINDOW_S
