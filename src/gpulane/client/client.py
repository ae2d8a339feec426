"""``Client``: the blocking SDK client, over a lean HTTP/1.1 pool or httpx.

The shared configuration, error mapping and fallbacks are in :mod:`gpulane.client._base`;
:class:`gpulane.client.async_client.AsyncClient` is its asyncio twin.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable, Iterator
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
    BreakerArg,
    BudgetArg,
    ClientBase,
    SyncFallback,
    TaskList,
)
from gpulane.client._http11 import Http11Pool, Reply
from gpulane.client.leases import GpuLease, PreemptCallback, acquire_request
from gpulane.client.pipeline import Pipeline
from gpulane.client.pipeline_collect import TaskFuture
from gpulane.client.resilience import RetryPolicy
from gpulane.client.uploads import Source, upload_request
from gpulane.errors import ClientError, TransportError


class Client(ClientBase):
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
                 budget: BudgetArg = DEFAULT_BUDGET, coalesce: bool = True) -> None:
        super().__init__(url, token, timeout, transport is not None, retry, breaker, budget)
        # Threads calling run()/submit() while others' are in flight share bulk requests
        # (coalesce=False: each its own); enqueue() always goes through the pipeline.
        self._coalesce = coalesce
        self._pipeline = Pipeline(self._call)
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
        """Flush what was enqueued (every submit acknowledged or refused), stop the SDK's
        threads, close the connections. Enqueued futures not ended by then get ClientError."""
        self._pipeline.close()
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
        if self._fast is not None and not request.stream and request.content is None:
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

    def submit(self, preset: str | None = None, input: Any = None, *, device: str = "auto",
               priority: str | int = "normal", timeout_s: float | None = None,
               content_type: str | None = None, idempotency_key: str | None = None,
               wait: float | None = None, gpu: bool | None = None,
               fallback: bool | None = None) -> JSON:
        """Submit one task; ``wait`` lets the server hold the answer until it is final.
        Without ``preset`` the server routes it by ``content_type`` (:meth:`routes`).
        ``gpu=True|False`` is ``device="gpu"|"cpu"`` (sent as ``?gpu=``); ``fallback=False``:
        a GPU or nothing. Without ``wait``, threads submitting while others' submits are in
        flight share one bulk request (each still gets its own task or error)."""
        request = self._submit_request(preset, input, device, priority, timeout_s,
                                       content_type, idempotency_key, wait, gpu, fallback)
        if not self._coalesce or wait is not None:
            return self._call(request)
        item, answer = self._pipeline.shared(request, lambda: self._call(request))
        if item is not None:
            return self._pipeline.outcome(item, None, self.get)
        assert answer is not None
        return answer

    def enqueue(self, preset: str | None = None, input: Any = None, *, device: str = "auto",
                priority: str | int = "normal", timeout_s: float | None = None,
                content_type: str | None = None, idempotency_key: str | None = None,
                gpu: bool | None = None, fallback: bool | None = None) -> TaskFuture:
        """Queue a submit and return at once: the calls made within about a millisecond
        (and all made while a bulk is in flight) go out as one ``POST /v1/tasks/bulk``.
        ``future.id`` waits for the acknowledgement; ``future.result(timeout)`` is the final
        task (TaskFailedError as :meth:`run`), collected in shared ``POST /v1/tasks/results``
        polls; :meth:`flush` waits for every acknowledgement."""
        request = self._submit_request(preset, input, device, priority, timeout_s,
                                       content_type, idempotency_key, None, gpu, fallback)
        future = TaskFuture(self.get)
        self._pipeline.enqueue(request, future)
        return future

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every submit enqueued so far is acknowledged (or refused: its future
        says how); False when ``timeout`` seconds passed first."""
        return self._pipeline.flush(timeout)

    def upload(self, source: Source, content_type: str | None = None,
               name: str | None = None) -> JSON:
        """Upload bytes or a file (streamed from disk) with ``POST /v1/files``; its record,
        whose ``id`` a task's input names it by: ``{"file": upload["id"]}``."""
        return self._call(upload_request(source, content_type, name))

    def submit_many(self, items: TaskList, *, gpu: bool | None = None) -> TaskList:
        """Submit several tasks in one request; each gets an idempotency key if it has none.
        Items are task bodies (``device``, ``fallback``, ``content_type`` each their own);
        ``gpu`` applies to every one."""
        return core.task_list(self._call(core.submit_many(items, gpu)))

    def get(self, task_id: str) -> JSON:
        return self._call(core.get(task_id))

    def list(self, state: str | None = None, preset: str | None = None, limit: int = 50,
             cursor: str | None = None) -> JSON:
        """One page: ``{"tasks": [...], "next_cursor": str | None}``."""
        return self._call(core.list_tasks(state, preset, limit, cursor))

    def cancel(self, task_id: str) -> JSON:
        return self._call(core.cancel(task_id))

    def retry(self, task_id: str) -> JSON:
        """Queue a failed or cancelled task (a dead letter) again with fresh attempts; an
        APIError 409 ``not_retryable`` for a task in another state."""
        return self._call(core.retry(task_id))

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

    def run(self, preset: str | None = None, input: Any = None, *,
            timeout: float | None = None, fallback: SyncFallback | bool | None = None,
            **submit_kwargs: Any) -> JSON:
        """Submit and wait for the outcome; raise TaskFailedError if it failed or was cancelled.

        If ``timeout`` seconds pass first, the task is returned as it stands (not final).
        ``fallback`` (no arguments: the app's own local path) is called instead when the
        breaker is open or a transient error outlasts the retries; its return value comes back
        as the ``output`` of a task-shaped dict with ``id`` None and a ``fallback`` entry. A task
        already submitted when the server went away may still run there. ``fallback=True`` or
        ``False`` is the server's instead, as for :meth:`submit` (False: a GPU or nothing).
        """
        local = self._server_fallback(fallback, submit_kwargs)
        try:
            return self._run(preset, input, timeout, submit_kwargs)
        except ClientError as exc:
            reason = None if local is None else self._fell_back(preset, exc)
            if local is None or reason is None:
                raise
            output = local()
            if inspect.isawaitable(output):
                if inspect.iscoroutine(output):
                    output.close()
                raise TypeError("Client.run got an async fallback: use AsyncClient") from exc
            return core.fallback_task(preset, input, output, reason, exc)

    def _run(self, preset: str | None, input: Any, timeout: float | None,
             submit_kwargs: dict[str, Any]) -> JSON:
        deadline = None if timeout is None else time.monotonic() + timeout
        self._run_wait(timeout, submit_kwargs)
        request = self._submit_request(preset, input, **submit_kwargs)
        request.deadline = deadline
        if not self._coalesce:
            return core.run_outcome(self._run_alone(request, deadline))
        item, task = self._pipeline.shared(request, lambda: self._run_alone(request, deadline))
        if item is not None:
            task = self._pipeline.outcome(item, deadline, self.get)
        assert task is not None
        return core.run_outcome(task)

    def _run_alone(self, request: core.Request, deadline: float | None) -> JSON:
        task = self._call(request)
        if not core.is_final(task):
            task = self._poll(core.LongPoll(str(task["id"]), deadline))
        return task

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
            device: int | None = None, on_preempt: PreemptCallback | None = None,
            node: str | None = None) -> GpuLease:
        """Hold a GPU lease for a ``with`` block: ``with client.gpu(vram="4GiB") as lease:``;
        ``node`` names the fleet's node whose GPUs to lease."""
        request = acquire_request(vram, gpus, priority, holder, ttl_s, wait_s, grace_s,
                                  preemptible, device, node)
        return GpuLease(self._call, request, on_preempt)

    def presets(self) -> JSON:
        return self._call(core.simple_get("/v1/presets"))

    def routes(self) -> JSON:
        """The server's content-type routes: ``{"routes": [{"content_type", "preset"}]}``,
        most specific first."""
        return self._call(core.simple_get("/v1/routes"))

    def gpus(self) -> JSON:
        return self._call(core.simple_get("/v1/gpus"))

    def workers(self) -> JSON:
        return self._call(core.simple_get("/v1/workers"))

    def leases(self) -> JSON:
        """The leases that are waiting or held, in the whole fleet (never their tokens)."""
        return self._call(core.simple_get("/v1/leases"))

    def status(self) -> JSON:
        """The node: draining or not, each preset's queue, max_queued and drain rate."""
        return self._call(core.simple_get("/v1/status"))

    def nodes(self) -> JSON:
        """Every live node of the fleet: name, url, heartbeat age, devices, warm, running."""
        return self._call(core.simple_get("/v1/nodes"))

    def drain(self, node: str | None = None, *, exit: bool = False,
              grace_s: float | None = None) -> JSON:
        """Admin: the node (this one, or the fleet's ``node``) stops starting queued work and
        refuses submits (503) until ``resume()``; running work finishes. With ``exit`` it
        then exits (running work gets ``grace_s``, the rest is requeued unspent). Its status
        view as it stands after."""
        return self._call(core.admin("drain", core.drain_body(node, exit, grace_s)))

    def resume(self, node: str | None = None) -> JSON:
        """Admin: take and start tasks again after a drain."""
        return self._call(core.admin("resume", core.drain_body(node)))

    def health(self) -> JSON:
        response = self._send(core.simple_get("/healthz"))
        return core.health(response.status_code, response.content)
