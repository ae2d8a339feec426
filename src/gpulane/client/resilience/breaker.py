# Hand-written: no well-kept lib has a failure-rate window breaker with half-open probes, sync+async
"""The circuit breaker: closed / open / half-open on a time-based sliding window.

It counts recent HTTP requests: failure rate and slow-call rate thresholds, a minimum number
of calls, an open interval and a few half-open probes. ``min_calls`` failures in a row with no
success between them for ``streak_s`` (0.5 s) open it too: that catches failures too slow or
sparse to dominate the window (a dead server's come slower than its successes did, since
retries back off; timeouts; a quiet app).

Why these defaults: the window is 1 s with a 50 % threshold, and the streak rule wants half a
second of nothing but failures, so an outage shorter than about half a second (a blip, a
reset connection pool) is ridden out by retries and never opens the breaker, a steady 5 % of
errors is far below the threshold, and a dead server opens it in about half a second under
any steady load. ``min_calls`` (5) exceeds ``max_attempts`` (4), so one call's own retries can
never open it alone.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from gpulane.client.resilience._window import Clock, Ring
from gpulane.client.resilience.classify import Outcome

log = logging.getLogger("gpulane.client")


class State(enum.StrEnum):
    """Where a breaker stands: passing requests, refusing them, or letting probes through."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass(frozen=True, slots=True)
class BreakerConfig:
    """When the breaker opens, how long it stays open and how it tests the way back."""

    window_s: float = 1.0
    """The sliding window of recent HTTP requests the rates are computed on."""
    buckets: int = 10
    min_calls: int = 5
    """Requests the window must hold before the breaker may open."""
    streak_s: float = 0.5
    """``min_calls`` failures in a row with no success for this long also open the breaker:
    a dead server's failures come slower than successes did (retries back off), and a quiet
    app's or a timeout's never fill the window."""
    failure_rate: float = 0.5
    """Open when at least this share of the window failed (transient errors and 5xx)."""
    slow_call_s: float = 5.0
    """A request slower than this is slow (long-polls and event streams never are)."""
    slow_rate: float = 0.8
    """Open when at least this share of the window was slow."""
    open_s: float = 5.0
    """How long the breaker stays open before it lets probes through."""
    half_open_probes: int = 3
    """Probes let through at once when half-open; this many successes close the breaker."""

    def __post_init__(self) -> None:
        if self.window_s <= 0 or self.buckets < 1 or self.open_s < 0:
            raise ValueError("window_s and buckets must be positive, open_s >= 0")
        if self.min_calls < 1 or self.half_open_probes < 1:
            raise ValueError("min_calls and half_open_probes must be at least 1")
        if not (0 < self.failure_rate <= 1 and 0 < self.slow_rate <= 1):
            raise ValueError("failure_rate and slow_rate must be in (0, 1]")


class Permit:
    """Leave to make one HTTP request; handed back through ``record`` or ``release``."""

    __slots__ = ("generation", "probe", "started")

    def __init__(self, generation: int, probe: bool, started: float) -> None:
        self.generation = generation
        self.probe = probe
        self.started = started


_REQ, _FAIL, _SLOW = 0, 1, 2
MAX_TRANSITIONS = 32
"""Transitions a breaker keeps for ``snapshot()``: enough to read an incident, bounded."""


class CircuitBreaker:
    """A failure-rate circuit breaker on a time-based sliding window. Thread-safe.

    * closed: every request passes; each outcome lands in the window. When the window holds at
      least ``min_calls`` requests and the failure (or slow-call) rate reaches its threshold,
      or ``min_calls`` failures came in a row with no success for ``streak_s``, it opens.
    * open: requests are refused at once (``acquire`` returns None) for ``open_s`` seconds.
    * half-open: up to ``half_open_probes`` requests at a time pass as probes; that many
      successes close the breaker, any failure (or slow probe) opens it again. A probe that
      never reports (a caller that vanished) stops holding its place after
      ``max(open_s, slow_call_s)``.

    Each transition is logged (``gpulane.client``; WARNING when it opens) and kept in
    ``transitions`` with its reason.
    """

    def __init__(self, name: str = "", config: BreakerConfig | None = None,
                 clock: Clock = time.monotonic, wall: Clock = time.time) -> None:
        self.name = name
        self.config = config or BreakerConfig()
        self._clock = clock
        self._wall = wall
        self._lock = threading.Lock()
        cfg = self.config
        self._ring = Ring(cfg.buckets, cfg.window_s / cfg.buckets, 3)
        self._state = State.CLOSED
        self._generation = 0
        self._opened_at = 0.0
        self._probes: dict[int, float] = {}  # id(permit) -> start, probes in flight
        self._streak = 0  # failures since the last success, while closed
        self._streak_start = 0.0
        self._probe_successes = 0
        self._rejected = 0
        self._counts = {State.CLOSED: 0, State.OPEN: 0, State.HALF_OPEN: 0}
        self.transitions: deque[dict[str, Any]] = deque(maxlen=MAX_TRANSITIONS)

    @property
    def state(self) -> State:
        """The current state; an open breaker whose interval has passed reads half-open."""
        with self._lock:
            self._maybe_half_open(self._clock())
            return self._state

    def acquire(self) -> Permit | None:
        """A permit for one request, or None when the breaker refuses it."""
        with self._lock:
            now = self._clock()
            state = self._state
            if state is State.CLOSED:
                return Permit(self._generation, False, now)
            if state is State.OPEN and not self._maybe_half_open(now):
                self._rejected += 1
                return None
            # Half-open: let a few probes through; forget probes that never came back.
            stale = now - max(self.config.open_s, self.config.slow_call_s)
            for key in [k for k, t in self._probes.items() if t < stale]:
                del self._probes[key]
            if len(self._probes) >= self.config.half_open_probes:
                self._rejected += 1
                return None
            permit = Permit(self._generation, True, now)
            self._probes[id(permit)] = now
            return permit

    def retry_in(self) -> float:
        """Seconds until an open breaker lets probes through (0 when it is not open)."""
        with self._lock:
            if self._state is not State.OPEN:
                return 0.0
            return max(0.0, self._opened_at + self.config.open_s - self._clock())

    def record(self, permit: Permit, outcome: Outcome, duration: float,
               slow_exempt: bool = False) -> None:
        """The result of a request made under ``permit``."""
        if outcome is Outcome.IGNORED:
            self.release(permit)
            return
        failed = outcome is Outcome.FAILURE
        slow = not slow_exempt and duration > self.config.slow_call_s
        with self._lock:
            now = self._clock()
            if permit.generation != self._generation:
                return  # admitted under an earlier state: it says nothing about this one
            if self._state is State.CLOSED:
                ring = self._ring
                ring.add(now, _REQ)
                if failed:
                    ring.add(now, _FAIL)
                    if not self._streak:
                        self._streak_start = now
                    self._streak += 1
                else:
                    self._streak = 0
                if slow:
                    ring.add(now, _SLOW)
                if failed or slow:
                    self._check_window(now)
            elif self._state is State.HALF_OPEN and permit.probe:
                self._probes.pop(id(permit), None)
                if failed or slow:
                    self._to(State.OPEN, now, "a half-open probe "
                             + ("failed" if failed else f"took {duration:.2f}s"))
                else:
                    self._probe_successes += 1
                    if self._probe_successes >= self.config.half_open_probes:
                        self._to(State.CLOSED, now,
                                 f"{self._probe_successes} half-open probes succeeded")

    def release(self, permit: Permit) -> None:
        """Give back a permit whose request says nothing (cancelled, or failed locally)."""
        if permit.probe:
            with self._lock:
                self._probes.pop(id(permit), None)

    def force_open(self, reason: str = "forced") -> None:
        with self._lock:
            self._to(State.OPEN, self._clock(), reason)

    def reset(self) -> None:
        """Back to closed with an empty window (tests, or an operator who knows better)."""
        with self._lock:
            if self._state is not State.CLOSED:
                self._to(State.CLOSED, self._clock(), "reset")
            self._ring.clear()

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            now = self._clock()
            self._maybe_half_open(now)
            self._ring.advance(now)
            calls, failures, slow = self._ring.totals
            retry_in = (max(0.0, self._opened_at + self.config.open_s - now)
                        if self._state is State.OPEN else 0.0)
            return {
                "name": self.name,
                "state": self._state.value,
                "window": {"seconds": self.config.window_s, "calls": calls,
                           "failures": failures, "slow": slow,
                           "failure_rate": round(failures / calls, 4) if calls else 0.0},
                "opened": self._counts[State.OPEN],
                "half_opened": self._counts[State.HALF_OPEN],
                "closed": self._counts[State.CLOSED],
                "rejected": self._rejected,
                "retry_in_s": round(retry_in, 3),
                "transitions": list(self.transitions),
            }

    # -- under the lock ---------------------------------------------------------------------

    def _check_window(self, now: float) -> None:
        cfg = self.config
        calls, failures, slow = self._ring.totals
        if self._streak >= cfg.min_calls and now - self._streak_start >= cfg.streak_s:
            self._to(State.OPEN, now, f"{self._streak} requests in a row failed over "
                     f"{now - self._streak_start:.1f}s")
            return
        if calls < cfg.min_calls:
            return
        if failures >= cfg.failure_rate * calls:
            self._to(State.OPEN, now, f"{failures} of the last {calls} requests failed "
                     f"(threshold {cfg.failure_rate:.0%} over {cfg.window_s:g}s)")
        elif slow >= cfg.slow_rate * calls:
            self._to(State.OPEN, now, f"{slow} of the last {calls} requests took over "
                     f"{cfg.slow_call_s:g}s (threshold {cfg.slow_rate:.0%})")

    def _maybe_half_open(self, now: float) -> bool:
        if self._state is State.OPEN and now - self._opened_at >= self.config.open_s:
            self._to(State.HALF_OPEN, now, f"open for {self.config.open_s:g}s")
        return self._state is not State.OPEN

    def _to(self, state: State, now: float, reason: str) -> None:
        previous = self._state
        self._state = state
        self._generation += 1
        self._counts[state] += 1
        self._probes.clear()
        self._probe_successes = 0
        self._streak = 0
        if state is State.OPEN:
            self._opened_at = now
        self._ring.clear()
        self.transitions.append({"at": self._wall(), "monotonic": now, "from": previous.value,
                                 "to": state.value, "reason": reason})
        level = logging.WARNING if state is State.OPEN else logging.INFO
        log.log(level, "circuit breaker for %s: %s -> %s (%s)", self.name or "?",
                previous.value, state.value, reason)
