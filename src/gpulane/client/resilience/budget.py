"""The retry budget: retries may be at most ``ratio`` of the calls in a sliding window plus
``min_per_s``, so a dead server sees about the app's own call rate, not a multiple of it."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

from gpulane.client.resilience._window import Clock, Ring


@dataclass(frozen=True, slots=True)
class BudgetConfig:
    """Retries allowed: ``ratio`` of the calls in the last ``window_s`` plus ``min_per_s``."""

    ratio: float = 0.2
    min_per_s: float = 1.0
    window_s: float = 10.0

    def __post_init__(self) -> None:
        if self.ratio < 0 or self.min_per_s < 0 or self.window_s <= 0:
            raise ValueError("budget ratio and floor must be >= 0 and window_s > 0")


_CALLS, _RETRIES = 0, 1


class RetryBudget:
    """Caps retries to a fraction of calls, so retries cannot multiply load on a sick server.

    Thread-safe; shared per base URL like the breaker.
    """

    def __init__(self, config: BudgetConfig | None = None, clock: Clock = time.monotonic) -> None:
        self.config = config or BudgetConfig()
        self._clock = clock
        self._lock = threading.Lock()
        self._ring = Ring(10, self.config.window_s / 10, 2)
        self._floor = self.config.min_per_s * self.config.window_s

    def record_call(self) -> None:
        """A call (not a retry) started."""
        with self._lock:
            self._ring.add(self._clock(), _CALLS)

    def try_retry(self) -> bool:
        """Spend one retry if the budget allows it."""
        with self._lock:
            now = self._clock()
            ring = self._ring
            ring.advance(now)
            allowed = self.config.ratio * ring.totals[_CALLS] + self._floor
            if ring.totals[_RETRIES] + 1 > allowed:
                return False
            ring.add(now, _RETRIES)
            return True

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            self._ring.advance(self._clock())
            calls, retries = self._ring.totals
        allowed = self.config.ratio * calls + self._floor
        return {"window_s": self.config.window_s, "calls": calls, "retries": retries,
                "retries_left": max(0, int(allowed - retries))}
