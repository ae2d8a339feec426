"""One SDK call: its attempts, each admitted by the breaker, and its retries under the budget.

``Resilience`` holds one client's policy, breaker, budget and stats; ``Call`` is the sans-IO
state machine both clients drive in their one ``_send`` seam (see the package docstring).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from typing import Any

from gpulane.client.resilience._window import Clock
from gpulane.client.resilience.breaker import CircuitBreaker, Permit
from gpulane.client.resilience.budget import RetryBudget
from gpulane.client.resilience.classify import Outcome, classify
from gpulane.client.resilience.retry import NO_RETRY, RetryPolicy
from gpulane.client.resilience.stats import ClientStats
from gpulane.errors import APIError, CircuitOpenError, ClientError

log = logging.getLogger("gpulane.client")


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
    """The attempts of one SDK request. See the package docstring for the loop that drives it."""

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
            # The server said when: no sooner, and a little later at random (see the policy).
            delay = policy.after(retry_after, res.rng())
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
