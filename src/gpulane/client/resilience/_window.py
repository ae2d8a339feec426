"""Counts over a sliding time window, shared by the retry budget and the circuit breaker."""

from __future__ import annotations

from collections.abc import Callable

Clock = Callable[[], float]
"""Seconds on some monotonic clock; injectable so tests drive time by hand."""


class Ring:
    """Event counts per time bucket over the last ``n`` buckets; totals kept incrementally."""

    __slots__ = ("_head", "counts", "n", "totals", "width")

    def __init__(self, n: int, width: float, fields: int) -> None:
        self.n = n
        self.width = width
        self.counts = [[0] * fields for _ in range(n)]
        self.totals = [0] * fields
        self._head: int | None = None  # absolute number of the newest bucket

    def advance(self, now: float) -> None:
        bucket = int(now // self.width)
        head = self._head
        if head is None or bucket - head >= self.n:
            if head is not None:
                self.clear()
            self._head = bucket
            return
        if bucket <= head:  # same bucket, or the clock stepped back: stay put
            return
        for b in range(head + 1, bucket + 1):
            slot = self.counts[b % self.n]
            for f, value in enumerate(slot):
                if value:
                    self.totals[f] -= value
                    slot[f] = 0
        self._head = bucket

    def add(self, now: float, field: int, amount: int = 1) -> None:
        self.advance(now)
        assert self._head is not None
        self.counts[self._head % self.n][field] += amount
        self.totals[field] += amount

    def clear(self) -> None:
        for slot in self.counts:
            for f in range(len(slot)):
                slot[f] = 0
        for f in range(len(self.totals)):
            self.totals[f] = 0
