"""``AsyncClient``: the asyncio twin of :class:`gpulane.client.client.Client`, over a lean
asyncio HTTP/1.1 pool (:mod:`gpulane.client._http11_async`) or httpx.

The shared configuration, error mapping and fallbacks are in :mod:`gpulane.client._base`.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from types import TracebackType
from typing import Any, Self

import httpx
import orjson

from gpulane.client import _core as core
from gpulane.client._base import (
    DEFAULT_BREAKER,
    DEFAULT_BUDGET,
    DEFAULT_LIMITS,
    DEFAULT_RETRY,
    DEFAULT_TIMEOUT,
    JSON,
    AsyncFallback,
    BreakerArg,
    BudgetArg,
    ClientBase,
    TaskList,
)
from gpulane.client._coalesce_async import AsyncTaskFuture, Coalescer, Item
from gpulane.client._http11 import Reply
from gpulane.client._http11_async import AsyncHttp11Pool
from gpulane.client.leases import AsyncGpuLease, PreemptCallback, acquire_request
from gpulane.client.resilience import RetryPolicy
from gpulane.client.uploads import Source, upload_request
from gpulane.errors import ClientError, TransportError


class AsyncClient(ClientBase):
    """asyncio twin of :class:`Client`; use as ``async with``."""

    _sleep: Callable[[float], Awaitable[None]] = staticmethod(asyncio.sleep)

    def __init__(self, url: str | None = None, token: str | None = None, *,
                 timeout: httpx.Timeout | float = DEFAULT_TIMEOUT,
                 transport: httpx.AsyncBaseTransport | None = None, http2: bool | None = None,
                 limits: httpx.Limits = DEFAULT_LIMITS,
                 retry: RetryPolicy | None = DEFAULT_RETRY,
                 breaker: BreakerArg = DEFAULT_BREAKER,
                 budget: BudgetArg = DEFAULT_BUDGET, coalesce: bool = True) -> None:
        super().__init__(url, token, timeout, transport is not None, retry, breaker, budget)
        # Concurrent run()/submit() callers share bulk requests (coalesce=False: each its own);
        # enqueue() always goes through it.
        self._coalesce = coalesce
        self._coalescer = Coalescer(self._call, count_calls=self._count_calls)
        self._http = httpx.AsyncClient(base_url=self.url, headers=core.base_headers(self._token),
                                       timeout=self._timeout, transport=transport, limits=limits,
                                       http2=core.h2_available() if http2 is None else http2)
        # Plain calls take the lean HTTP/1.1 pool unless the caller chose the transport or
        # HTTP/2; event streams and uploads always go through httpx.
        self._fast = (AsyncHttp11Pool(self.url, core.base_headers(self._token), self._timeout,
                                      max_connections=limits.max_connections,
                                      max_idle=limits.max_keepalive_connections or 32,
                                      keepalive_expiry=limits.keepalive_expiry)
                      if transport is None and not http2 else None)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    async def close(self) -> None:
        await self._coalescer.aclose()
        if self._fast is not None:
            await self._fast.aclose()
        await self._http.aclose()

    async def _send(self, request: core.Request) -> httpx.Response | Reply:
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

    async def _send_once(self, request: core.Request) -> httpx.Response | Reply:
        if self._fast is not None and not request.stream and request.content is None:
            return await self._send_fast(self._fast, request)
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

    async def _send_fast(self, pool: AsyncHttp11Pool, request: core.Request) -> Reply:
        body = None if request.json is None else orjson.dumps(
            request.json, option=orjson.OPT_NON_STR_KEYS)
        try:
            reply = await pool.request(request.method, request.path, request.params, body,
                                       request.headers, self._timeout_for(request).read,
                                       request.idempotent)
        except httpx.RequestError as exc:
            raise self._transport_error(request, exc) from exc
        if core.is_error_status(reply.status_code):
            raise self._api_error(reply, reply.content)
        return reply

    async def _call(self, request: core.Request) -> JSON:
        response = await self._send(request)
        return core.parse_json(response.status_code, response.content)

    async def submit(self, preset: str | None = None, input: Any = None, *,
                     device: str = "auto", priority: str | int = "normal",
                     timeout_s: float | None = None, content_type: str | None = None,
                     idempotency_key: str | None = None, wait: float | None = None,
                     gpu: bool | None = None, fallback: bool | None = None) -> JSON:
        """Submit one task; ``wait`` lets the server hold the answer until it is final.
        Without ``wait``, coroutines submitting in the same loop turn share one bulk request
        (each still gets its own task or error)."""
        request = self._submit_request(preset, input, device, priority, timeout_s,
                                       content_type, idempotency_key, wait, gpu, fallback)
        if not self._coalesce or wait is not None:
            return await self._call(request)
        item, answer = await self._coalescer.submit(request, lambda: self._call(request))
        return answer if answer is not None else await item.outcome

    def enqueue(self, preset: str | None = None, input: Any = None, *, device: str = "auto",
                priority: str | int = "normal", timeout_s: float | None = None,
                content_type: str | None = None, idempotency_key: str | None = None,
                gpu: bool | None = None, fallback: bool | None = None) -> AsyncTaskFuture:
        """Queue a submit and return at once (call it on the event loop): the submits
        enqueued in one loop turn go out as one bulk request. ``await future`` (or
        ``future.result(timeout)``) gives the final task, collected with the others' in
        shared ``POST /v1/tasks/results`` polls; :meth:`flush` waits for the
        acknowledgements."""
        request = self._submit_request(preset, input, device, priority, timeout_s,
                                       content_type, idempotency_key, None, gpu, fallback)
        return AsyncTaskFuture(self._coalescer, self._coalescer.enqueue(request), self.get)

    async def flush(self) -> None:
        """Wait until every submit enqueued so far is acknowledged (or failed: its future
        says how)."""
        await self._coalescer.flush()

    async def upload(self, source: Source, content_type: str | None = None,
                     name: str | None = None) -> JSON:
        """Upload bytes or a file (streamed from disk off the event loop) with ``POST
        /v1/files``; its record, whose ``id`` a task's input names it by."""
        return await self._call(upload_request(source, content_type, name, asynchronous=True))

    async def submit_many(self, items: TaskList, *, gpu: bool | None = None) -> TaskList:
        """Submit several tasks in one request; each gets an idempotency key if it has none;
        ``gpu`` applies to every one (see :meth:`Client.submit_many`)."""
        return core.task_list(await self._call(core.submit_many(items, gpu)))

    async def get(self, task_id: str) -> JSON:
        return await self._call(core.get(task_id))

    async def list(self, state: str | None = None, preset: str | None = None, limit: int = 50,
                   cursor: str | None = None) -> JSON:
        """One page: ``{"tasks": [...], "next_cursor": str | None}``."""
        return await self._call(core.list_tasks(state, preset, limit, cursor))

    async def cancel(self, task_id: str) -> JSON:
        return await self._call(core.cancel(task_id))

    async def retry(self, task_id: str) -> JSON:
        """Queue a failed or cancelled task (a dead letter) again with fresh attempts; an
        APIError 409 ``not_retryable`` for a task in another state."""
        return await self._call(core.retry(task_id))

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
    async def run(self, preset: str | None = None, input: Any = None, *,
                  timeout: float | None = None, fallback: AsyncFallback | bool | None = None,
                  **submit_kwargs: Any) -> JSON:
        """Submit and wait for the outcome; raise TaskFailedError if it failed or was cancelled.

        If ``timeout`` seconds pass first, the task is returned as it stands (not final).
        ``fallback`` is as for :meth:`Client.run`, and may be a plain function or return an
        awaitable (an ``async def``); a plain one runs on the event loop, so hand heavy CPU
        work to a thread inside it. ``True`` or ``False`` is the server's fallback instead.
        """
        local = self._server_fallback(fallback, submit_kwargs)
        try:
            return await self._run(preset, input, timeout, submit_kwargs)
        except ClientError as exc:
            reason = None if local is None else self._fell_back(preset, exc)
            if local is None or reason is None:
                raise
            output = local()
            if inspect.isawaitable(output):
                output = await output
            return core.fallback_task(preset, input, output, reason, exc)

    async def _run(self, preset: str | None, input: Any, timeout: float | None,
                   submit_kwargs: dict[str, Any]) -> JSON:
        deadline = None if timeout is None else time.monotonic() + timeout
        self._run_wait(timeout, submit_kwargs)
        request = self._submit_request(preset, input, **submit_kwargs)
        request.deadline = deadline
        if not self._coalesce:
            return core.run_outcome(await self._run_alone(request, deadline))
        item, task = await self._coalescer.submit(
            request, lambda: self._run_alone(request, deadline))
        if task is None:
            task = await self._outcome(item, deadline)
        return core.run_outcome(task)

    async def _run_alone(self, request: core.Request, deadline: float | None) -> JSON:
        task = await self._call(request)
        if not core.is_final(task):
            task = await self._poll(core.LongPoll(str(task["id"]), deadline))
        return task

    async def _outcome(self, item: Item, deadline: float | None) -> JSON:
        """A coalesced run()'s end; past ``deadline``, the task as it stands."""
        if deadline is None:
            return await item.outcome
        with contextlib.suppress(TimeoutError):  # past it: the task as it stands, below
            async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                return await asyncio.shield(item.outcome)
        task_id = str((await item.ack)["id"])
        self._coalescer.drop(task_id, item.outcome)
        return await self.get(task_id)

    async def events(self, task_id: str,
                     last_event_id: int | None = None) -> AsyncIterator[JSON]:
        """Yield the task's events; a dropped connection resumes with Last-Event-ID."""
        stream = core.EventStream(task_id, last_event_id, self.reconnect_backoff)
        while True:
            request = stream.request()
            try:
                response = await self._send(request)
                assert isinstance(response, httpx.Response)  # streams always go through httpx
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
            device: int | None = None, on_preempt: PreemptCallback | None = None,
            node: str | None = None) -> AsyncGpuLease:
        """``async with client.gpu(vram="4GiB", priority="background") as lease:``; renews in
        the background, releases on exit, calls on_preempt or raises LeasePreempted. ``node``
        names the fleet's node whose GPUs to lease (else any that can serve it)."""
        request = acquire_request(vram, gpus, priority, holder, ttl_s, wait_s, grace_s,
                                  preemptible, device, node)
        return AsyncGpuLease(self._call, request, on_preempt)

    async def presets(self) -> JSON:
        return await self._call(core.simple_get("/v1/presets"))

    async def routes(self) -> JSON:
        """The server's content-type routes, most specific first (see :meth:`Client.routes`)."""
        return await self._call(core.simple_get("/v1/routes"))

    async def gpus(self) -> JSON:
        return await self._call(core.simple_get("/v1/gpus"))

    async def workers(self) -> JSON:
        return await self._call(core.simple_get("/v1/workers"))

    async def leases(self) -> JSON:
        """The leases that are waiting or held, in the whole fleet (never their tokens)."""
        return await self._call(core.simple_get("/v1/leases"))

    async def status(self) -> JSON:
        """The node: draining or not, each preset's queue, max_queued and drain rate."""
        return await self._call(core.simple_get("/v1/status"))

    async def nodes(self) -> JSON:
        """Every live node of the fleet: name, url, heartbeat age, devices, warm, running."""
        return await self._call(core.simple_get("/v1/nodes"))

    async def drain(self, node: str | None = None, *, exit: bool = False,
                    grace_s: float | None = None) -> JSON:
        """Admin: the node (this one, or the fleet's ``node``) stops starting queued work and
        refuses submits (503) until ``resume()``; with ``exit`` it then exits (see
        Client.drain). Its status view as it stands after."""
        return await self._call(core.admin("drain", core.drain_body(node, exit, grace_s)))

    async def resume(self, node: str | None = None) -> JSON:
        """Admin: take and start tasks again after a drain."""
        return await self._call(core.admin("resume", core.drain_body(node)))

    async def health(self) -> JSON:
        response = await self._send(core.simple_get("/healthz"))
        return core.health(response.status_code, response.content)
