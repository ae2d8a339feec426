"""``Client`` (blocking) and ``AsyncClient`` (asyncio) for the gpulane HTTP API.

Both are thin I/O shells over :mod:`gpulane.client._core` (requests, answers, polling, SSE) and
:mod:`gpulane.client.resilience` (classification, retries, retry budget, circuit breaker).
Every HTTP exchange of either goes through its ``_send`` method: the one seam where each
attempt is admitted by the breaker, and failed attempts are retried or given up.

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

import asyncio
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from types import TracebackType
from typing import Any, Self

import httpx
import orjson

from gpulane.client import _core as core
from gpulane.client._http11 import Http11Pool, Reply
from gpulane.client.leases import (
    AsyncGpuLease,
    GpuLease,
    PreemptCallback,
    acquire_request,
)
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
DEFAULT_RETRY = RetryPolicy()
DEFAULT_BREAKER = BreakerConfig()
DEFAULT_BUDGET = BudgetConfig()

BreakerArg = BreakerConfig | CircuitBreaker | None
BudgetArg = BudgetConfig | RetryBudget | None
SyncFallback = Callable[[], Any]
AsyncFallback = Callable[[], Any | Awaitable[Any]]


class _Base:
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
        return kwargs

    def _transport_error(self, request: core.Request, exc: Exception) -> TransportError:
        detail = str(exc) or type(exc).__name__
        return TransportError(f"{request.method} {self.url}{request.path}: "
                              f"{type(exc).__name__}: {detail}",
                              transient=classify_exception(exc).kind == "transient")

    def _api_error(self, response: httpx.Response | Reply, body: bytes) -> APIError:
        retry_after = parse_retry_after(response.headers.get("retry-after"), time.time())
        return core.api_error(response.status_code, body, response.reason_phrase, retry_after)

    def _fell_back(self, preset: str, exc: ClientError) -> str | None:
        """Why the fallback serves this call (counted), or None when ``exc`` must be raised."""
        reason = core.fallback_reason(exc)
        if reason is not None:
            self._resilience.stats.add("fallbacks")
            log.debug("run(%r) served by the fallback (%s): %s", preset, reason, exc)
        return reason

    def _submit_request(self, preset: str, input: Any, device: str = "auto",
                        priority: str | int = "normal", timeout_s: float | None = None,
                        content_type: str | None = None, idempotency_key: str | None = None,
                        wait: float | None = None) -> core.Request:
        body = core.task_body(preset, input, device=device, priority=priority,
                              timeout_s=timeout_s, content_type=content_type)
        return core.submit(body, idempotency_key, wait)

    @staticmethod
    def _run_wait(timeout: float | None, submit_kwargs: dict[str, Any]) -> None:
        # One round trip serves a fast task: the submit itself waits for the outcome.
        if submit_kwargs.get("wait") is None:
            submit_kwargs["wait"] = (core.MAX_POLL_WAIT if timeout is None
                                     else min(timeout, core.MAX_POLL_WAIT))


class Client(_Base):
    """Blocking client. One pooled keep-alive connection set; use as a context manager.

    Thread-safe: one client may serve many threads (and should: it is one pool).
    """

    _sleep: Callable[[float], None] = staticmethod(time.sleep)

    def __init__(self, url: str | None = None, token: str | None = None, *,
                 timeout: httpx.Timeout | float = DEFAULT_TIMEOUT,
                 transport: httpx.BaseTransport | None = None, http2: bool | None = None,
                 limits: httpx.Limits = DEFAULT_LIMITS,
                 retry: RetryPolicy | None = DEFAULT_RETRY,
                 breaker: BreakerArg = DEFAULT_BREAKER,
                 budget: BudgetArg = DEFAULT_BUDGET) -> None:
        super().__init__(url, token, timeout, transport is not None, retry, breaker, budget)
        self._http = httpx.Client(base_url=self.url, headers=core.base_headers(self._token),
                                  timeout=self._timeout, transport=transport, limits=limits,
                                  http2=bool(http2) and core.h2_available())
        # Plain calls take the lean HTTP/1.1 pool unless the caller chose the transport or
        # HTTP/2; event streams always go through httpx.
        self._fast = (Http11Pool(self.url, core.base_headers(self._token), self._timeout,
                                 max_idle=limits.max_keepalive_connections or 32,
                                 keepalive_expiry=limits.keepalive_expiry)
                      if transport is None and not http2 else None)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        if self._fast is not None:
            self._fast.close()
        self._http.close()

    def _send(self, request: core.Request) -> httpx.Response | Reply:
        """Do one HTTP exchange, retried and guarded by the breaker. Raises TransportError (no
        answer; CircuitOpenError when not even tried) or APIError (error status).

        A streamed response comes back unread and must be closed by the caller.
        """
        call = self._begin(request)
        try:
            while True:
                call.admit()
                try:
                    response = self._send_once(request)
                except ClientError as exc:
                    delay = call.failed(exc)
                    if delay is None:
                        raise
                else:
                    call.succeeded()
                    return response
                if delay > 0:
                    self._sleep(delay)
        except BaseException:
            call.abandon()  # cancelled or interrupted: hand back a half-open probe's place
            raise

    def _send_once(self, request: core.Request) -> httpx.Response | Reply:
        if self._fast is not None and not request.stream:
            return self._send_fast(self._fast, request)
        http_request = self._http.build_request(request.method, request.path,
                                                **self._build_kwargs(request))
        try:
            response = self._http.send(http_request, stream=request.stream)
        except httpx.RequestError as exc:
            raise self._transport_error(request, exc) from exc
        if core.is_error_status(response.status_code):
            try:
                body = response.read()
            except httpx.RequestError:
                body = b""
            finally:
                response.close()
            raise self._api_error(response, body)
        return response

    def _send_fast(self, pool: Http11Pool, request: core.Request) -> Reply:
        body = None if request.json is None else orjson.dumps(
            request.json, option=orjson.OPT_NON_STR_KEYS)
        try:
            reply = pool.request(request.method, request.path, request.params, body,
                                 request.headers, self._timeout_for(request).read)
        except httpx.RequestError as exc:
            raise self._transport_error(request, exc) from exc
        if core.is_error_status(reply.status_code):
            raise self._api_error(reply, reply.content)
        return reply

    def _call(self, request: core.Request) -> JSON:
        response = self._send(request)
        return core.parse_json(response.status_code, response.content)

    def submit(self, preset: str, input: Any, *, device: str = "auto",
               priority: str | int = "normal", timeout_s: float | None = None,
               content_type: str | None = None, idempotency_key: str | None = None,
               wait: float | None = None) -> JSON:
        """Submit one task; ``wait`` lets the server hold the answer until it is final."""
        return self._call(self._submit_request(preset, input, device, priority, timeout_s,
                                               content_type, idempotency_key, wait))

    def submit_many(self, items: TaskList) -> TaskList:
        """Submit several tasks in one request; each gets an idempotency key if it has none."""
        return core.task_list(self._call(core.submit_many(items)))

    def get(self, task_id: str) -> JSON:
        return self._call(core.get(task_id))

    def list(self, state: str | None = None, preset: str | None = None, limit: int = 50,
             cursor: str | None = None) -> JSON:
        """One page: ``{"tasks": [...], "next_cursor": str | None}``."""
        return self._call(core.list_tasks(state, preset, limit, cursor))

    def cancel(self, task_id: str) -> JSON:
        return self._call(core.cancel(task_id))

    def result(self, task_id: str, wait: float = 30.0) -> JSON:
        """Long-poll until the task is final or ``wait`` seconds pass; the task either way."""
        return self._poll(core.LongPoll(task_id, time.monotonic() + wait))

    def _poll(self, poll: core.LongPoll) -> JSON:
        while True:
            start = time.monotonic()
            request = poll.request(start)
            task = self._call(request)
            now = time.monotonic()
            pause = poll.after(task, request.hold_s or 0.0, now - start, now)
            if pause is None:
                return task
            if pause:
                time.sleep(pause)

    def run(self, preset: str, input: Any, *, timeout: float | None = None,
            fallback: SyncFallback | None = None, **submit_kwargs: Any) -> JSON:
        """Submit and wait for the outcome; raise TaskFailedError if it failed or was cancelled.

        If ``timeout`` seconds pass first, the task is returned as it stands (not final).
        ``fallback`` (no arguments: the app's own local path) is called instead when the
        breaker is open or a transient error outlasts the retries; its return value comes back
        as the ``output`` of a task-shaped dict with ``id`` None and a ``fallback`` entry. A task
        already submitted when the server went away may still run there.
        """
        try:
            return self._run(preset, input, timeout, submit_kwargs)
        except ClientError as exc:
            reason = None if fallback is None else self._fell_back(preset, exc)
            if fallback is None or reason is None:
                raise
            output = fallback()
            if inspect.isawaitable(output):
                if inspect.iscoroutine(output):
                    output.close()
                raise TypeError("Client.run got an async fallback: use AsyncClient") from exc
            return core.fallback_task(preset, input, output, reason, exc)

    def _run(self, preset: str, input: Any, timeout: float | None,
             submit_kwargs: dict[str, Any]) -> JSON:
        deadline = None if timeout is None else time.monotonic() + timeout
        self._run_wait(timeout, submit_kwargs)
        request = self._submit_request(preset, input, **submit_kwargs)
        request.deadline = deadline
        task = self._call(request)
        if not core.is_final(task):
            task = self._poll(core.LongPoll(str(task["id"]), deadline))
        return core.run_outcome(task)

    def events(self, task_id: str, last_event_id: int | None = None) -> Iterator[JSON]:
        """Yield the task's events; a dropped connection resumes with Last-Event-ID."""
        stream = core.EventStream(task_id, last_event_id, self.reconnect_backoff)
        while True:
            request = stream.request()
            try:
                response = self._send(request)
                assert isinstance(response, httpx.Response)  # streams always go through httpx
                stream.connected = True
                try:
                    for line in response.iter_lines():
                        event = stream.feed(line)
                        if event is not None:
                            yield event
                            if stream.done:
                                return
                finally:
                    response.close()
                return  # the server ended the stream cleanly
            except httpx.RequestError as exc:
                error = self._transport_error(request, exc)
                error.__cause__ = exc
            except TransportError as exc:
                error = exc
            delay = stream.dropped()
            if delay is None:
                raise error
            time.sleep(delay)

    def gpu(self, vram: str | int | None = None, *, gpus: int = 0,
            priority: str | int = "normal", holder: str = "gpulane-sdk", ttl_s: float = 30.0,
            wait_s: float = 600.0, grace_s: float = 10.0, preemptible: bool = True,
            device: int | None = None, on_preempt: PreemptCallback | None = None) -> GpuLease:
        """Hold a GPU lease for a ``with`` block: ``with client.gpu(vram="4GiB") as lease:``."""
        return GpuLease(self, acquire_request(vram, gpus, priority, holder, ttl_s, wait_s,
                                              grace_s, preemptible, device), on_preempt)

    def presets(self) -> JSON:
        return self._call(core.simple_get("/v1/presets"))

    def gpus(self) -> JSON:
        return self._call(core.simple_get("/v1/gpus"))

    def workers(self) -> JSON:
        return self._call(core.simple_get("/v1/workers"))

    def health(self) -> JSON:
        response = self._send(core.simple_get("/healthz"))
        return core.health(response.status_code, response.content)


class AsyncClient(_Base):
    """asyncio twin of :class:`Client`; use as ``async with``."""

    _sleep: Callable[[float], Awaitable[None]] = staticmethod(asyncio.sleep)

    def __init__(self, url: str | None = None, token: str | None = None, *,
                 timeout: httpx.Timeout | float = DEFAULT_TIMEOUT,
                 transport: httpx.AsyncBaseTransport | None = None, http2: bool | None = None,
                 limits: httpx.Limits = DEFAULT_LIMITS,
                 retry: RetryPolicy | None = DEFAULT_RETRY,
                 breaker: BreakerArg = DEFAULT_BREAKER,
                 budget: BudgetArg = DEFAULT_BUDGET) -> None:
        super().__init__(url, token, timeout, transport is not None, retry, breaker, budget)
        self._http = httpx.AsyncClient(base_url=self.url, headers=core.base_headers(self._token),
                                       timeout=self._timeout, transport=transport, limits=limits,
                                       http2=core.h2_available() if http2 is None else http2)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    async def close(self) -> None:
        await self._http.aclose()

    async def _send(self, request: core.Request) -> httpx.Response:
        """Do one HTTP exchange, retried and guarded by the breaker. Raises TransportError (no
        answer; CircuitOpenError when not even tried) or APIError (error status).

        A streamed response comes back unread and must be closed by the caller.
        """
        call = self._begin(request)
        try:
            while True:
                call.admit()
                try:
                    response = await self._send_once(request)
                except ClientError as exc:
                    delay = call.failed(exc)
                    if delay is None:
                        raise
                else:
                    call.succeeded()
                    return response
                if delay > 0:
                    await self._sleep(delay)
        except BaseException:
            call.abandon()  # cancelled or interrupted: hand back a half-open probe's place
            raise

    async def _send_once(self, request: core.Request) -> httpx.Response:
        http_request = self._http.build_request(request.method, request.path,
                                                **self._build_kwargs(request))
        try:
            response = await self._http.send(http_request, stream=request.stream)
        except httpx.RequestError as exc:
            raise self._transport_error(request, exc) from exc
        if core.is_error_status(response.status_code):
            try:
                body = await response.aread()
            except httpx.RequestError:
                body = b""
            finally:
                await response.aclose()
            raise self._api_error(response, body)
        return response

    async def _call(self, request: core.Request) -> JSON:
        response = await self._send(request)
        return core.parse_json(response.status_code, response.content)

    async def submit(self, preset: str, input: Any, *, device: str = "auto",
                     priority: str | int = "normal", timeout_s: float | None = None,
                     content_type: str | None = None, idempotency_key: str | None = None,
                     wait: float | None = None) -> JSON:
        """Submit one task; ``wait`` lets the server hold the answer until it is final."""
        return await self._call(self._submit_request(preset, input, device, priority, timeout_s,
                                                     content_type, idempotency_key, wait))

    async def submit_many(self, items: TaskList) -> TaskList:
        """Submit several tasks in one request; each gets an idempotency key if it has none."""
        return core.task_list(await self._call(core.submit_many(items)))

    async def get(self, task_id: str) -> JSON:
        return await self._call(core.get(task_id))

    async def list(self, state: str | None = None, preset: str | None = None, limit: int = 50,
                   cursor: str | None = None) -> JSON:
        """One page: ``{"tasks": [...], "next_cursor": str | None}``."""
        return await self._call(core.list_tasks(state, preset, limit, cursor))

    async def cancel(self, task_id: str) -> JSON:
        return await self._call(core.cancel(task_id))

    async def result(self, task_id: str, wait: float = 30.0) -> JSON:
        """Long-poll until the task is final or ``wait`` seconds pass; the task either way."""
        return await self._poll(core.LongPoll(task_id, time.monotonic() + wait))

    async def _poll(self, poll: core.LongPoll) -> JSON:
        while True:
            start = time.monotonic()
            request = poll.request(start)
            task = await self._call(request)
            now = time.monotonic()
            pause = poll.after(task, request.hold_s or 0.0, now - start, now)
            if pause is None:
                return task
            if pause:
                await asyncio.sleep(pause)

    # `timeout` mirrors Client.run and bounds server-side waiting, not this coroutine.
    async def run(self, preset: str, input: Any, *,
                  timeout: float | None = None, fallback: AsyncFallback | None = None,
                  **submit_kwargs: Any) -> JSON:
        """Submit and wait for the outcome; raise TaskFailedError if it failed or was cancelled.

        If ``timeout`` seconds pass first, the task is returned as it stands (not final).
        ``fallback`` is as for :meth:`Client.run`, and may be a plain function or return an
        awaitable (an ``async def``); a plain one runs on the event loop, so hand heavy CPU
        work to a thread inside it.
        """
        try:
            return await self._run(preset, input, timeout, submit_kwargs)
        except ClientError as exc:
            reason = None if fallback is None else self._fell_back(preset, exc)
            if fallback is None or reason is None:
                raise
            output = fallback()
            if inspect.isawaitable(output):
                output = await output
            return core.fallback_task(preset, input, output, reason, exc)

    async def _run(self, preset: str, input: Any, timeout: float | None,
                   submit_kwargs: dict[str, Any]) -> JSON:
        deadline = None if timeout is None else time.monotonic() + timeout
        self._run_wait(timeout, submit_kwargs)
        request = self._submit_request(preset, input, **submit_kwargs)
        request.deadline = deadline
        task = await self._call(request)
        if not core.is_final(task):
            task = await self._poll(core.LongPoll(str(task["id"]), deadline))
        return core.run_outcome(task)

    async def events(self, task_id: str,
                     last_event_id: int | None = None) -> AsyncIterator[JSON]:
        """Yield the task's events; a dropped connection resumes with Last-Event-ID."""
        stream = core.EventStream(task_id, last_event_id, self.reconnect_backoff)
        while True:
            request = stream.request()
            try:
                response = await self._send(request)
                stream.connected = True
                try:
                    async for line in response.aiter_lines():
                        event = stream.feed(line)
                        if event is not None:
                            yield event
                            if stream.done:
                                return
                finally:
                    await response.aclose()
                return  # the server ended the stream cleanly
            except httpx.RequestError as exc:
                error = self._transport_error(request, exc)
                error.__cause__ = exc
            except TransportError as exc:
                error = exc
            delay = stream.dropped()
            if delay is None:
                raise error
            await asyncio.sleep(delay)

    def gpu(self, vram: str | int | None = None, *, gpus: int = 0,
            priority: str | int = "normal", holder: str = "gpulane-sdk", ttl_s: float = 30.0,
            wait_s: float = 600.0, grace_s: float = 10.0, preemptible: bool = True,
            device: int | None = None,
            on_preempt: PreemptCallback | None = None) -> AsyncGpuLease:
        """``async with client.gpu(vram="4GiB", priority="background") as lease:``; renews in
        the background, releases on exit, calls on_preempt or raises LeasePreempted."""
        return AsyncGpuLease(self, acquire_request(vram, gpus, priority, holder, ttl_s, wait_s,
                                                   grace_s, preemptible, device), on_preempt)

    async def presets(self) -> JSON:
        return await self._call(core.simple_get("/v1/presets"))

    async def gpus(self) -> JSON:
        return await self._call(core.simple_get("/v1/gpus"))

    async def workers(self) -> JSON:
        return await self._call(core.simple_get("/v1/workers"))

    async def health(self) -> JSON:
        response = await self._send(core.simple_get("/healthz"))
        return core.health(response.status_code, response.content)
