"""What one client counts: calls, attempts, outcomes, retries, fallbacks, recent latency."""

from __future__ import annotations

import threading
from collections import deque
from typing import Any

LATENCY_SAMPLES = 2048
"""Recent call latencies kept for p50/p99: enough for a stable p99, bounded memory."""


def _percentile(sorted_values: list[float], p: float) -> float:
    if not sorted_values:
        return 0.0
    k = (len(sorted_values) - 1) * p
    lo = int(k)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (k - lo)


class ClientStats:
    """Counters of one client, updated once per call when it ends (one lock per call).

    ``calls`` are finished SDK requests; each ends as one of ``successes``, ``errors`` (of which
    ``rejected``: refused by an open breaker, nothing sent) or ``cancelled``. ``attempts`` are
    the HTTP requests they sent, ``retries`` the attempts after a first, ``retries_denied`` the
    retries the budget refused.
    """

    FIELDS = ("calls", "attempts", "successes", "errors", "rejected", "cancelled", "retries",
              "retries_denied", "fallbacks")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counts = dict.fromkeys(self.FIELDS, 0)
        self._latency: deque[float] = deque(maxlen=LATENCY_SAMPLES)

    def add(self, field: str, amount: int = 1) -> None:
        with self._lock:
            self.counts[field] += amount

    def finish(self, outcome: str, attempts: int, retries: int, denied: int,
               seconds: float | None) -> None:
        """One call ended as ``outcome`` after ``seconds`` (None: not timed, e.g. a stream)."""
        with self._lock:
            counts = self.counts
            counts["calls"] += 1
            counts[outcome] += 1
            counts["attempts"] += attempts
            counts["retries"] += retries
            counts["retries_denied"] += denied
            if outcome == "rejected":
                counts["errors"] += 1
            if seconds is not None:
                self._latency.append(seconds)

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            out: dict[str, Any] = dict(self.counts)
            samples = sorted(self._latency)
        out["latency_ms"] = {"samples": len(samples),
                             "p50": round(_percentile(samples, 0.50) * 1000, 3),
                             "p99": round(_percentile(samples, 0.99) * 1000, 3)}
        return out
