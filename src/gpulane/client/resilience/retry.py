"""How often and how patiently one call is retried: capped exponential backoff, full jitter.

Full jitter (a uniform pause up to the capped exponential) spreads the retries of many
clients that failed together, so they do not come back in step.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How often and how patiently one call is retried."""

    max_attempts: int = 4
    """Tries per call, the first included; 1 disables retries."""
    base_s: float = 0.1
    """Backoff before retry n is uniform in [0, min(cap_s, base_s * 2**(n-1))] (full jitter)."""
    cap_s: float = 5.0
    max_retry_after_s: float = 10.0
    """A Retry-After longer than this is not waited out: the call fails (or falls back) now."""
    retry_after_jitter: float = 0.2
    """A Retry-After is waited out, then up to this share of it more, at random: the clients a
    node refused in the same second (Retry-After is whole seconds) do not all come back in the
    same instant and meet a full queue again."""
    long_poll_min_s: float = 0.25
    """Least pause before repeating a long-poll (``GET .../result?wait=``): no tight loop."""

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if min(self.base_s, self.cap_s, self.max_retry_after_s, self.long_poll_min_s,
               self.retry_after_jitter) < 0:
            raise ValueError("retry delays must not be negative")

    def after(self, retry_after: float, rand: float) -> float:
        """The pause a Retry-After asks for: never sooner, spread over ``retry_after_jitter``
        of it later (``rand`` in [0, 1))."""
        return retry_after * (1.0 + self.retry_after_jitter * rand)

    def backoff(self, retry: int, rand: float) -> float:
        """Full-jitter delay before retry number ``retry`` (1-based), ``rand`` in [0, 1)."""
        return rand * min(self.cap_s, self.base_s * 2.0 ** (retry - 1))


NO_RETRY = RetryPolicy(max_attempts=1)
"""One try, no retries: what a client gets with ``retry=None``."""
