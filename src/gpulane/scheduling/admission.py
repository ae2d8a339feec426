"""Admission: whether a preset's queue may take more work, and when to come back if not.

Each preset's queue holds at most its ``max_queued`` (else the node's). A submit that would
pass it is refused with ``429 queue_full`` and a ``Retry-After`` that says when the queue will
have drained enough for it: the excess over the limit divided by the preset's measured drain
rate. The rate is tasks claimed per second, an exponentially weighted moving average of the
store's claim counter sampled at most once per ``SAMPLE_S``, so reading it costs nothing per
submit. While nothing has been measured (a node just started) Retry-After is
``UNMEASURED_RETRY_S``; a queue that is not draining at all gets ``RETRY_AFTER_MAX_S``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from gpulane.errors import TooManyRequestsError

SAMPLE_S = 1.0
"""Shortest time between two readings of a preset's claim counter: shorter ones are noise."""
TAU_S = 10.0
"""Time constant of the drain rate's moving average: a reading 10 s old weighs 1/e as much
as a fresh one, so the rate follows a change of pace within a few tens of seconds."""
UNMEASURED_RETRY_S = 5
"""Retry-After while a preset's drain rate has not been measured yet (under SAMPLE_S since
the first reading): a guess short enough not to idle a client that could go on."""
RETRY_AFTER_MAX_S = 60
"""Longest Retry-After given: past a minute the estimate means little, and a client should
look again rather than sleep on it."""


class QueueCounts(Protocol):
    """One preset's counters as the store keeps them (store.base.QueueStats)."""

    @property
    def queued(self) -> int: ...
    @property
    def claimed_total(self) -> int: ...


@dataclass(slots=True)
class _Meter:
    """One preset's drain rate: the last reading of its claim counter and the average."""

    at: float
    claimed: int
    rate: float | None = None


class Admission:
    """Queue limits and drain rates for every preset of one node."""

    def __init__(self, default_max: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.default_max = default_max
        self.clock = clock
        self._meters: dict[str, _Meter] = {}
        self._observed_at = -math.inf

    def observe(self, stats: Mapping[str, QueueCounts]) -> None:
        """Take a reading of every preset's claim counter (cheap; call it as often as you
        like: readings closer than SAMPLE_S are skipped)."""
        now = self.clock()
        if now - self._observed_at < SAMPLE_S:
            return  # every meter was read less than SAMPLE_S ago: nothing to do
        self._observed_at = now
        for preset, counts in stats.items():
            meter = self._meters.get(preset)
            if meter is None:
                self._meters[preset] = _Meter(now, counts.claimed_total)
                continue
            dt = now - meter.at
            if dt < SAMPLE_S:
                continue
            # A counter that went back (the store was reopened) starts a fresh reading.
            drained = max(counts.claimed_total - meter.claimed, 0)
            rate = drained / dt
            weight = 1.0 - math.exp(-dt / TAU_S)
            meter.rate = rate if meter.rate is None else meter.rate + weight * (rate - meter.rate)
            meter.at, meter.claimed = now, counts.claimed_total

    def drain_per_s(self, preset: str) -> float | None:
        """Tasks of ``preset`` claimed per second lately; None before a measurement."""
        meter = self._meters.get(preset)
        return None if meter is None else meter.rate

    def limit(self, own: int | None) -> int:
        """A preset's queue limit: its own max_queued, else the node's."""
        return own if own is not None else self.default_max

    def refusal(self, preset: str, own_max: int | None, queued: int, adding: int,
                where: str = "") -> TooManyRequestsError | None:
        """The 429 queue_full for ``adding`` more tasks of ``preset`` when its queue would
        pass its limit; None when they fit."""
        limit = self.limit(own_max)
        if queued + adding <= limit:
            return None
        rate = self.drain_per_s(preset)
        after = self.retry_after_s(queued + adding - limit, rate)
        pace = ("its drain rate is not measured yet" if rate is None
                else f"it drains {rate:.3g} tasks/s")
        return TooManyRequestsError(
            "queue_full", f"preset {preset!r} has {queued} task(s) queued, its limit is "
            f"{limit} and this request adds {adding}: retry after {after} s ({pace}), send "
            "fewer tasks at once, or raise max_queued",
            field=f"{where}preset", headers={"Retry-After": str(after)},
            extra={"queued": queued, "max_queued": limit, "adding": adding,
                   "drain_per_s": None if rate is None else round(rate, 3)})

    @staticmethod
    def retry_after_s(excess: int, rate: float | None) -> int:
        """Whole seconds until ``excess`` tasks have drained at ``rate`` (1 to the max)."""
        if rate is None:
            return UNMEASURED_RETRY_S
        if rate <= 0:
            return RETRY_AFTER_MAX_S
        return max(1, min(RETRY_AFTER_MAX_S, math.ceil(excess / rate)))

    def view(self, preset: str, own_max: int | None, queued: int) -> dict[str, Any]:
        """One preset's queue as the status view shows it."""
        rate = self.drain_per_s(preset)
        return {"queued": queued, "max_queued": self.limit(own_max),
                "drain_per_s": None if rate is None else round(rate, 3)}
