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
    long_poll_min_s: float = 0.25
    """Least pause before repeating a long-poll (``GET .../result?wait=``): no tight loop."""

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if min(self.base_s, self.cap_s, self.max_retry_after_s, self.long_poll_min_s) < 0:
            raise ValueError("retry delays must not be negative")

    def backoff(self, retry: int, rand: float) -> float:
        """Full-jitter delay before retry number ``retry`` (1-based), ``rand`` in [0, 1)."""
        return rand * min(self.cap_s, self.base_s * 2.0 ** (retry - 1))


NO_RETRY = RetryPolicy(max_attempts=1)
"""One try, no retries: what a client gets with ``retry=None``."""
