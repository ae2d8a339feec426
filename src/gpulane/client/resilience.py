# Hand-written: no well-kept lib has a failure-rate window breaker with half-open probes, sync+async
"""What keeps the SDK trustworthy on a bad network: classification, retries, budget, breaker.

Everything here is a sans-IO state machine: no sockets, no sleeping, and the clock and the
random source are injectable, so the unit tests drive it deterministically and ``Client`` and
``AsyncClient`` share every decision. Each client turns one request into a :class:`Call` and
loops::

    call = resilience.begin(...)
    try:
        while True:
            call.admit()                  # CircuitOpenError when the breaker refuses
            try: response = send_once()
            except ClientError as exc:
                delay = call.failed(exc)  # None: give up (re-raise); else sleep and go again
            else:
                call.succeeded(); return response
            sleep(delay)
    except BaseException:
        call.abandon()                    # cancelled mid-call: hand back a half-open probe
        raise

The pieces:

* :func:`classify` - transient errors (no answer, 408, 429, 502, 503, 504) are retried and
  count against the circuit; permanent ones (other 4xx) are neither; other 5xx count against
  the circuit but are not retried.
* :class:`RetryPolicy` - capped exponential backoff with full jitter, honouring Retry-After.
* :class:`RetryBudget` - retries may be at most ``ratio`` of the calls in a sliding window plus
  ``min_per_s``, so a dead server sees about the app's own call rate, not a multiple.
* :class:`CircuitBreaker` - closed / open / half-open on a time-based sliding window of recent
  HTTP requests: failure rate and slow-call rate thresholds, a minimum number of calls, an
  open interval and a few half-open probes. One per base URL per process (:data:`REGISTRY`).
  ``min_calls`` failures in a row with no success between them for ``streak_s`` (0.5 s) open
  it too: that catches failures too slow or sparse to dominate the window (a dead server's
  come slower than its successes did, since retries back off; timeouts; a quiet app).

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
import random
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any

import httpx

from gpulane.errors import (
    ANSWER_CODES,
    TRANSIENT_STATUSES,
    APIError,
    CircuitOpenError,
    ClientError,
    TransportError,
)

log = logging.getLogger("gpulane.client")

Clock = Callable[[], float]


# --- classification ----------------------------------------------------------------------


class Outcome(enum.Enum):
    """How one HTTP request counts in the breaker's window."""

    SUCCESS = "success"  # the server answered (2xx-4xx): alive, as far as the circuit cares
    FAILURE = "failure"  # no answer, a transient status or a 5xx: counts against the circuit
    IGNORED = "ignored"  # says nothing about the server (our own pool ran dry, a bad URL)


@dataclass(frozen=True, slots=True)
class Verdict:
    """What to make of one failed attempt."""

    kind: str  # "transient", "permanent", "server_error" or "local"
    retry: bool
    outcome: Outcome


_TRANSIENT = Verdict("transient", True, Outcome.FAILURE)
_TRANSIENT_UNSAFE = Verdict("transient", False, Outcome.FAILURE)
_PERMANENT = Verdict("permanent", False, Outcome.SUCCESS)
_SERVER_ERROR = Verdict("server_error", False, Outcome.FAILURE)
_LOCAL = Verdict("local", False, Outcome.IGNORED)

# Errors after which the request surely never reached the server: safe to repeat any request.
_NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout)
# Errors where the server may or may not have seen the request: safe for idempotent requests.
_MAYBE_SENT = (httpx.ReadTimeout, httpx.WriteTimeout, httpx.NetworkError,
               httpx.RemoteProtocolError, httpx.ProxyError)


def classify_status(status: int) -> Verdict:
    """408, 429, 502, 503, 504 are transient; other 5xx count against the circuit but are not
    retried (they may well be deterministic); other 4xx are the caller's fault: permanent."""
    if status in TRANSIENT_STATUSES:
        return _TRANSIENT
    if status >= 500:
        return _SERVER_ERROR
    return _PERMANENT


def classify_exception(exc: BaseException, idempotent: bool = True) -> Verdict:
    """Connection refused or reset, DNS failure and timeouts are transient; the local pool
    running dry (PoolTimeout) and malformed requests say nothing about the server."""
    if isinstance(exc, httpx.PoolTimeout):
        return _LOCAL
    if isinstance(exc, _NOT_SENT):
        return _TRANSIENT
    if isinstance(exc, _MAYBE_SENT):
        return _TRANSIENT if idempotent else _TRANSIENT_UNSAFE
    return _LOCAL


def classify(error: ClientError, idempotent: bool = True) -> Verdict:
    """The verdict for an error one attempt raised."""
    if isinstance(error, APIError):
        if error.code in ANSWER_CODES:
            return _PERMANENT
        return classify_status(error.status)
    if isinstance(error, TransportError) and error.__cause__ is not None:
        return classify_exception(error.__cause__, idempotent)
    if isinstance(error, TransportError) and error.transient:
        return _TRANSIENT if idempotent else _TRANSIENT_UNSAFE
    return _LOCAL


def parse_retry_after(value: str | None, now_wall: float) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date); None if absent/bad."""
    if not value:
        return None
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        try:
            seconds = parsedate_to_datetime(text).timestamp() - now_wall
        except (TypeError, ValueError, IndexError, OverflowError):
            return None
    if seconds != seconds:  # NaN
        return None
    return max(0.0, seconds)


# --- retry policy and budget ----------------------------------------------------------------


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


class _Ring:
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
        self._ring = _Ring(10, self.config.window_s / 10, 2)
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


# --- circuit breaker ----------------------------------------------------------------------


class State(enum.StrEnum):
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
        self._ring = _Ring(cfg.buckets, cfg.window_s / cfg.buckets, 3)
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


# --- the per-process registry -------------------------------------------------------------


class Registry:
    """Breakers and budgets shared per base URL (and configuration) across a process's clients,
    so that many clients to one dead host open together and share one retry budget."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._breakers: dict[tuple[str, BreakerConfig], CircuitBreaker] = {}
        self._budgets: dict[tuple[str, BudgetConfig], RetryBudget] = {}

    def breaker(self, url: str, config: BreakerConfig | None = None) -> CircuitBreaker:
        key = (url, config or BreakerConfig())
        with self._lock:
            found = self._breakers.get(key)
            if found is None:
                found = self._breakers[key] = CircuitBreaker(url, key[1])
            return found

    def budget(self, url: str, config: BudgetConfig | None = None) -> RetryBudget:
        key = (url, config or BudgetConfig())
        with self._lock:
            found = self._budgets.get(key)
            if found is None:
                found = self._budgets[key] = RetryBudget(key[1])
            return found

    def clear(self) -> None:
        with self._lock:
            self._breakers.clear()
            self._budgets.clear()


REGISTRY = Registry()


def shared_breaker(url: str, config: BreakerConfig | None = None) -> CircuitBreaker:
    """The process-wide breaker of a base URL (what every client of that URL uses)."""
    return REGISTRY.breaker(url.rstrip("/"), config)


# --- per-client statistics ----------------------------------------------------------------

LATENCY_SAMPLES = 2048


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


# --- one call, its attempts and its retries -----------------------------------------------


class Resilience:
    """One client's retry policy, its (usually shared) breaker and budget, and its stats."""

    def __init__(self, url: str, *, retry: RetryPolicy | None = None,
                 breaker: CircuitBreaker | None = None, budget: RetryBudget | None = None,
                 clock: Clock = time.monotonic, rng: Callable[[], float] | None = None) -> None:
        self.url = url
        self.retry = retry or NO_RETRY
        self.breaker = breaker
        self.budget = budget
        self.clock = clock
        self.rng = rng or random.Random().random
        self.stats = ClientStats()

    def begin(self, what: str, *, idempotent: bool = True, slow_exempt: bool = False,
              long_poll: bool = False, timed: bool = True,
              deadline: float | None = None) -> Call:
        """Start one call; ``what`` (e.g. ``GET /v1/tasks/x``) names it in logs and errors."""
        return Call(self, what, idempotent, slow_exempt, long_poll, timed, deadline)

    def snapshot(self) -> dict[str, Any]:
        out = self.stats.snapshot()
        out["url"] = self.url
        out["breaker"] = self.breaker.snapshot() if self.breaker is not None else None
        out["budget"] = self.budget.snapshot() if self.budget is not None else None
        return out


class Call:
    """The attempts of one SDK request. See the module docstring for the loop that drives it."""

    __slots__ = ("_deadline", "_denied", "_ended", "_idempotent", "_last", "_long_poll",
                 "_permit", "_res", "_retries", "_slow_exempt", "_start", "_t0", "_timed",
                 "attempts", "what")

    def __init__(self, res: Resilience, what: str, idempotent: bool, slow_exempt: bool,
                 long_poll: bool, timed: bool, deadline: float | None) -> None:
        self._res = res
        self.what = what
        self._idempotent = idempotent
        self._slow_exempt = slow_exempt
        self._long_poll = long_poll
        self._timed = timed
        self._deadline = deadline
        self._permit: Permit | None = None
        self._last: ClientError | None = None
        self._ended = False
        self.attempts = self._retries = self._denied = 0
        self._start = self._t0 = res.clock()
        if res.budget is not None:
            res.budget.record_call()

    def admit(self) -> None:
        """Before each attempt; raises CircuitOpenError (chained to the last error, if any)."""
        res = self._res
        if res.breaker is not None:
            permit = res.breaker.acquire()
            if permit is None:
                self._end("rejected")
                err = CircuitOpenError(res.url, res.breaker.retry_in(), self.what)
                err.attempts = self.attempts
                raise err from self._last
            self._permit = permit
        self.attempts += 1
        if self.attempts > 1:
            self._t0 = res.clock()

    def succeeded(self) -> None:
        """The attempt got an answer the caller will use."""
        res = self._res
        if self._permit is not None and res.breaker is not None:
            res.breaker.record(self._permit, Outcome.SUCCESS, res.clock() - self._t0,
                               self._slow_exempt)
            self._permit = None
        self._end("successes")

    def failed(self, error: ClientError) -> float | None:
        """The attempt raised ``error``: seconds to wait before the next one, or None to give
        up (the caller re-raises ``error``, whose ``attempts`` is set)."""
        res = self._res
        now = res.clock()
        verdict = classify(error, self._idempotent)
        if self._permit is not None and res.breaker is not None:
            res.breaker.record(self._permit, verdict.outcome, now - self._t0, self._slow_exempt)
            self._permit = None
        error.attempts = self.attempts
        self._last = error
        policy = res.retry
        if not verdict.retry or self.attempts >= policy.max_attempts:
            return self._give_up()
        delay = policy.backoff(self.attempts, res.rng())
        retry_after = error.retry_after if isinstance(error, APIError) else None
        if retry_after is not None:
            if retry_after > policy.max_retry_after_s:
                return self._give_up()
            delay = max(delay, retry_after)
        if self._long_poll:
            delay = max(delay, policy.long_poll_min_s)
        if self._deadline is not None and now + delay >= self._deadline:
            return self._give_up()
        if res.budget is not None and not res.budget.try_retry():
            self._denied += 1
            return self._give_up()
        self._retries += 1
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s: attempt %d failed (%s); retrying in %.3fs", self.what,
                      self.attempts, error, delay)
        return delay

    def abandon(self) -> None:
        """The call ended some other way (cancelled, interrupted, a bug): hand back the permit
        and count it. A no-op for a call that already ended."""
        if self._permit is not None and self._res.breaker is not None:
            self._res.breaker.release(self._permit)
            self._permit = None
        if not self._ended:
            self._end("cancelled")

    def _give_up(self) -> float | None:
        self._end("errors")
        return None

    def _end(self, outcome: str) -> None:
        self._ended = True
        res = self._res
        res.stats.finish(outcome, self.attempts, self._retries, self._denied,
                         res.clock() - self._start if self._timed else None)
