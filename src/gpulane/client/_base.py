"""What ``Client`` and ``AsyncClient`` share: defaults, configuration, errors, fallbacks.

Both clients are thin I/O shells over :mod:`gpulane.client._core` (requests, answers, polling,
SSE) and :mod:`gpulane.client.resilience` (classification, retries, retry budget, circuit
breaker). Every HTTP exchange of either goes through its ``_send`` method: the one seam where
each attempt is admitted by the breaker, and failed attempts are retried or given up.

Defaults, all overridable per client:

* retries: :class:`RetryPolicy` - 4 attempts, full-jitter backoff from 0.1 s, Retry-After up
  to 10 s honoured; a retry budget (:class:`BudgetConfig`: 20 % of calls + 1/s) shared per URL;
* a circuit breaker per base URL (:class:`BreakerConfig`), shared by every client of that URL
  in the process. A client given its own ``transport`` cannot know where that leads (a mock,
  a Unix socket) and gets a breaker and budget of its own unless handed shared ones;
* a pool of keep-alive connections (:data:`DEFAULT_LIMITS`; idle ones are dropped before
  uvicorn's 5 s keep-alive timeout would close them under us), HTTP/2 when ``h2`` is installed
  (negotiated over TLS; plain http stays HTTP/1.1), and a timeout per phase.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import httpx

from gpulane.client import _core as core
from gpulane.client._http11 import Reply
from gpulane.client.resilience import (
    REGISTRY,
    BreakerConfig,
    BudgetConfig,
    Call,
    CircuitBreaker,
    Resilience,
    RetryBudget,
    RetryPolicy,
    classify_exception,
    parse_retry_after,
)
from gpulane.errors import APIError, ClientError, TransportError

JSON = dict[str, Any]
TaskList = list[JSON]

log = logging.getLogger("gpulane.client")

DEFAULT_TIMEOUT = httpx.Timeout(connect=3.0, read=15.0, write=15.0, pool=5.0)
"""Per phase. Long-polls get ``wait`` + 10 s of read time on top; retries multiply these, so
they are short: anything slow on purpose (waiting for a task) goes through ``wait``."""
DEFAULT_LIMITS = httpx.Limits(max_connections=100, max_keepalive_connections=32,
                              keepalive_expiry=4.0)
"""Keep-alive pool; idle connections go before uvicorn's 5 s keep-alive timeout closes them."""
DEFAULT_RETRY = RetryPolicy()
"""4 attempts, full-jitter backoff from 0.1 s, Retry-After up to 10 s honoured."""
DEFAULT_BREAKER = BreakerConfig()
"""Opens on half the requests of the last second failing (or half a second of failures)."""
DEFAULT_BUDGET = BudgetConfig()
"""Retries at most 20 % of calls plus 1/s, per URL."""

BreakerArg = BreakerConfig | CircuitBreaker | None
BudgetArg = BudgetConfig | RetryBudget | None
SyncFallback = Callable[[], Any]
AsyncFallback = Callable[[], Any | Awaitable[Any]]
F = TypeVar("F", bound=Callable[..., Any])


class ClientBase:
    """What both clients share: where to go, how to authenticate, how long to wait."""

    reconnect_backoff: tuple[float, ...] = core.RECONNECT_BACKOFF
    """Pauses between event-stream reconnects (tests set zeros)."""

    def __init__(self, url: str | None, token: str | None, timeout: httpx.Timeout | float,
                 own_transport: bool, retry: RetryPolicy | None, breaker: BreakerArg,
                 budget: BudgetArg) -> None:
        self.url = core.resolve_url(url)
        self._token = core.resolve_token(token)
        self._timeout = timeout if isinstance(timeout, httpx.Timeout) else httpx.Timeout(timeout)
        if isinstance(breaker, BreakerConfig):
            breaker = (REGISTRY.breaker(self.url, breaker) if not own_transport
                       else CircuitBreaker(self.url, breaker))
        if isinstance(budget, BudgetConfig):
            budget = (REGISTRY.budget(self.url, budget) if not own_transport
                      else RetryBudget(budget))
        self._resilience = Resilience(self.url, retry=retry, breaker=breaker, budget=budget)

    @property
    def breaker(self) -> CircuitBreaker | None:
        """This client's circuit breaker (shared with every client of the same URL)."""
        return self._resilience.breaker

    def stats(self) -> JSON:
        """Counters and latency of this client, and its breaker's state and transitions.

        ``calls`` are SDK requests, ``attempts`` the HTTP requests they made (retries
        included), ``rejected`` calls refused by an open breaker, ``fallbacks`` calls served by
        ``run(fallback=...)``; ``latency_ms`` has p50/p99 of recent calls (retries included,
        event streams not); ``breaker`` and ``budget`` are shared per URL.
        """
        return self._resilience.snapshot()

    def _begin(self, request: core.Request) -> Call:
        return self._resilience.begin(
            f"{request.method} {request.path}", idempotent=request.idempotent,
            slow_exempt=request.slow_by_design, long_poll=request.long_poll,
            timed=not request.stream, deadline=request.deadline)

    def _count_calls(self, calls: int) -> None:
        """``calls`` more SDK calls ride on the next request (a coalesced bulk): the retry
        budget, a share of the calls made, counts them, so one bulk standing for a thousand
        callers may be retried as one caller's request would be."""
        budget = self._resilience.budget
        if budget is not None:
            for _ in range(calls):
                budget.record_call()

    def _timeout_for(self, request: core.Request) -> httpx.Timeout:
        if request.hold_s is None or self._timeout.read is None:
            return self._timeout
        # The server holds a ?wait= answer; time out only well after it should have answered.
        read = max(self._timeout.read, request.hold_s + core.WAIT_SLACK)
        return httpx.Timeout(connect=self._timeout.connect, read=read,
                             write=self._timeout.write, pool=self._timeout.pool)

    def _build_kwargs(self, request: core.Request) -> dict[str, Any]:
        # Only what differs from the client's defaults: httpx merges each one per request.
        kwargs: dict[str, Any] = {}
        if request.params:
            kwargs["params"] = request.params
        if request.headers:
            kwargs["headers"] = request.headers
        if request.hold_s is not None:
            kwargs["timeout"] = self._timeout_for(request)
        if request.json is not None:
            kwargs["json"] = request.json
        if request.content is not None:
            kwargs["content"] = request.content
        return kwargs

    def _transport_error(self, request: core.Request, exc: Exception) -> TransportError:
        detail = str(exc) or type(exc).__name__
        return TransportError(f"{request.method} {self.url}{request.path}: "
                              f"{type(exc).__name__}: {detail}",
                              transient=classify_exception(exc).kind == "transient")

    def _api_error(self, response: httpx.Response | Reply, body: bytes) -> APIError:
        retry_after = parse_retry_after(response.headers.get("retry-after"), time.time())
        return core.api_error(response.status_code, body, response.reason_phrase, retry_after)

    def _fell_back(self, preset: str | None, exc: ClientError) -> str | None:
        """Why the fallback serves this call (counted), or None when ``exc`` must be raised."""
        reason = core.fallback_reason(exc)
        if reason is not None:
            self._resilience.stats.add("fallbacks")
            log.debug("run(%r) served by the fallback (%s): %s", preset, reason, exc)
        return reason

    def _submit_request(self, preset: str | None, input: Any, device: str = "auto",
                        priority: str | int = "normal", timeout_s: float | None = None,
                        content_type: str | None = None, idempotency_key: str | None = None,
                        wait: float | None = None, gpu: bool | None = None,
                        fallback: bool | None = None) -> core.Request:
        body = core.task_body(preset, input, device=device, priority=priority,
                              timeout_s=timeout_s, content_type=content_type,
                              fallback=fallback)
        return core.submit(body, idempotency_key, wait, gpu)

    @staticmethod
    def _server_fallback(fallback: F | bool | None, submit_kwargs: dict[str, Any]) -> F | None:
        """``run(fallback=True|False)`` is the server's fallback (a GPU or nothing), sent
        with the submit; a callable is the local one, returned (None for a bool)."""
        if isinstance(fallback, bool):
            submit_kwargs["fallback"] = fallback
            return None
        return fallback

    @staticmethod
    def _run_wait(timeout: float | None, submit_kwargs: dict[str, Any]) -> None:
        # One round trip serves a fast task: the submit itself waits for the outcome.
        if submit_kwargs.get("wait") is None:
            submit_kwargs["wait"] = (core.MAX_POLL_WAIT if timeout is None
                                     else min(timeout, core.MAX_POLL_WAIT))
