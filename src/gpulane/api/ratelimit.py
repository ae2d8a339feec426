"""Per-key token buckets: a key may make ``rate`` requests a second, ``burst`` of them at once.

Hand-written (a dozen lines) rather than a library: the guard needs the time until the next
token to say ``Retry-After``, and a clock it is handed so that tests move time themselves.
One bucket per key name, so the table holds at most as many entries as there are keys.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(slots=True)
class TokenBucket:
    """``tokens`` refill at ``rate`` a second up to ``burst``; a request takes one."""

    rate: float
    burst: float
    tokens: float
    stamp: float

    def take(self, now: float) -> float:
        """Take a token: 0.0 when granted, else the seconds until one is there."""
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate


def burst_of(rate: float, burst: int) -> float:
    """A burst of 0 means one second's worth of the rate (at least one request)."""
    return float(burst) if burst > 0 else max(1.0, float(math.ceil(rate)))


def retry_after_s(wait_s: float) -> int:
    """Retry-After in whole seconds, never 0 (a client told 0 would come back at once)."""
    return max(1, math.ceil(wait_s))


class RateLimiter:
    """Buckets by key name; a rate of 0 is no limit."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._buckets: dict[str, TokenBucket] = {}

    def check(self, name: str, rate: float, burst: int) -> float:
        """0.0 when ``name`` may go on, else the seconds until it may."""
        if rate <= 0:
            return 0.0
        now = self.clock()
        bucket = self._buckets.get(name)
        if bucket is None or bucket.rate != rate:
            size = burst_of(rate, burst)
            bucket = self._buckets[name] = TokenBucket(rate, size, size, now)
        return bucket.take(now)

    def __len__(self) -> int:
        return len(self._buckets)
