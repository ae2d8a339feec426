"""Every fallback this node decided, by reason: counts since start and rates over the last
1 and 15 minutes, for ``GET /v1/status`` (and the metrics after it).

A rate is fallbacks per minute over its window. Fallbacks are counted per reason in buckets of
BUCKET_S, kept only as long as the longest window needs them, so the log stays small and a
view stays cheap whatever the load: at most 900 / BUCKET_S buckets per reason (a node without
a GPU records a no_gpu fallback for every auto task it takes, thousands a second in bulk).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable

from gpulane.model import TaskSpec

WINDOWS_S = {"1m": 60.0, "15m": 900.0}
"""The rate windows ``view`` reports, by name."""
BUCKET_S = 1.0
"""Fallbacks within this span share one count: a window's edge is this precise."""


class FallbackLog:
    """Fallbacks by reason (model.FallbackReason), per node."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._recent: dict[str, deque[list[float]]] = {}  # reason -> [[bucket start, n]]
        self.totals: dict[str, int] = {}
        self.by_preset: dict[tuple[str, str], int] = {}  # (preset, reason) -> count

    def record(self, reason: str, preset: str, n: int = 1) -> None:
        """``n`` tasks of ``preset`` fell back for ``reason`` just now."""
        if n <= 0:
            return
        now = self._clock()
        self.totals[reason] = self.totals.get(reason, 0) + n
        self.by_preset[(preset, reason)] = self.by_preset.get((preset, reason), 0) + n
        recent = self._recent.setdefault(reason, deque())
        start = now - now % BUCKET_S
        if recent and recent[-1][0] == start:
            recent[-1][1] += n
        else:
            recent.append([start, n])
        self._trim(recent, now)

    def submitted(self, specs: Iterable[TaskSpec]) -> None:
        """New tasks were queued: those the router sent to the CPU at submit count."""
        for spec in specs:
            if spec.fallback_reason is not None:
                self.record(spec.fallback_reason, spec.preset)

    def _trim(self, recent: deque[list[float]], now: float) -> None:
        horizon = now - max(WINDOWS_S.values())
        while recent and recent[0][0] < horizon:
            recent.popleft()

    def view(self) -> dict[str, object]:
        """``{"total": n, "reasons": {reason: {"count", "per_min": {"1m", "15m"}}}}``."""
        now = self._clock()
        reasons: dict[str, object] = {}
        for reason, count in sorted(self.totals.items()):
            recent = self._recent.get(reason, deque())
            self._trim(recent, now)
            rates = {name: round(sum(n for at, n in recent if at >= now - span) / (span / 60),
                                 3)
                     for name, span in WINDOWS_S.items()}
            reasons[reason] = {
                "count": count, "per_min": rates,
                "presets": {p: n for (p, r), n in sorted(self.by_preset.items())
                            if r == reason}}
        return {"total": sum(self.totals.values()), "reasons": reasons}
