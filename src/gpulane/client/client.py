"""``Client`` (blocking) and ``AsyncClient`` (asyncio) for the gpulane HTTP API.

Both are thin I/O shells over :mod:`gpulane.client._core`; every HTTP exchange of either
goes through its ``_send`` method, the one seam the resilience layer wraps.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from types import TracebackType
from typing import Any, Self

import httpx

from gpulane.client import _core as core
from gpulane.errors import TransportError

JSON = dict[str, Any]
TaskList = list[JSON]

DEFAULT_TIMEOUT = httpx.Timeout(connect=5.0, read=60.0, write=30.0, pool=5.0)


class _Base:
    """What both clients share: where to go, how to authenticate, how long to wait."""

    reconnect_backoff: tuple[float, ...] = core.RECONNECT_BACKOFF
    """Pauses between event-stream reconnects (tests set zeros)."""

    def __init__(self, url: str | None, token: str | None, timeout: httpx.Timeout) -> None:
        self.url = core.resolve_url(url)
        self._token = core.resolve_token(token)
        self._timeout = timeout

    def _timeout_for(self, request: core.Request) -> httpx.Timeout:
        if request.hold_s is None or self._timeout.read is None:
            return self._timeout
        # The server holds a ?wait= answer; time out only well after it should have answered.
        read = max(self._timeout.read, request.hold_s + core.WAIT_SLACK)
        return httpx.Timeout(connect=self._timeout.connect, read=read,
                             write=self._timeout.write, pool=self._timeout.pool)

    def _build_kwargs(self, request: core.Request) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"params": request.params or None, "headers": request.headers,
                                  "timeout": self._timeout_for(request)}
        if request.json is not None:
            kwargs["json"] = request.json
        return kwargs

    def _transport_error(self, request: core.Request, exc: Exception) -> TransportError:
        detail = str(exc) or type(exc).__name__
        return TransportError(f"{request.method} {self.url}{request.path}: "
                              f"{type(exc).__name__}: {detail}")

    def _submit_request(self, preset: str, input: Any, device: str, priority: str | int,
                        timeout_s: float | None, content_type: str | None,
                        idempotency_key: str | None, wait: float | None) -> core.Request:
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
    """Blocking client. One pooled keep-alive connection set; use as a context manager."""

    def __init__(self, url: str | None = None, token: str | None = None, *,
                 timeout: httpx.Timeout = DEFAULT_TIMEOUT,
                 transport: httpx.BaseTransport | None = None, http2: bool = False) -> None:
        super().__init__(url, token, timeout)
        self._http = httpx.Client(base_url=self.url, headers=core.base_headers(self._token),
                                  timeout=timeout, transport=transport, http2=http2)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _send(self, request: core.Request) -> httpx.Response:
        """Do one HTTP exchange. Raises TransportError (no answer) or APIError (error status).

        A streamed response comes back unread and must be closed by the caller.
        """
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
            raise core.api_error(response.status_code, body, response.reason_phrase)
        return response

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
            **submit_kwargs: Any) -> JSON:
        """Submit and wait for the outcome; raise TaskFailedError if it failed or was cancelled.

        If ``timeout`` seconds pass first, the task is returned as it stands (not final).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        self._run_wait(timeout, submit_kwargs)
        task = self.submit(preset, input, **submit_kwargs)
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

    def __init__(self, url: str | None = None, token: str | None = None, *,
                 timeout: httpx.Timeout = DEFAULT_TIMEOUT,
                 transport: httpx.AsyncBaseTransport | None = None, http2: bool = False) -> None:
        super().__init__(url, token, timeout)
        self._http = httpx.AsyncClient(base_url=self.url, headers=core.base_headers(self._token),
                                       timeout=timeout, transport=transport, http2=http2)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    async def close(self) -> None:
        await self._http.aclose()

    async def _send(self, request: core.Request) -> httpx.Response:
        """Do one HTTP exchange. Raises TransportError (no answer) or APIError (error status).

        A streamed response comes back unread and must be closed by the caller.
        """
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
            raise core.api_error(response.status_code, body, response.reason_phrase)
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
                  timeout: float | None = None,
                  **submit_kwargs: Any) -> JSON:
        """Submit and wait for the outcome; raise TaskFailedError if it failed or was cancelled.

        If ``timeout`` seconds pass first, the task is returned as it stands (not final).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        self._run_wait(timeout, submit_kwargs)
        task = await self.submit(preset, input, **submit_kwargs)
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

    async def presets(self) -> JSON:
        return await self._call(core.simple_get("/v1/presets"))

    async def gpus(self) -> JSON:
        return await self._call(core.simple_get("/v1/gpus"))

    async def workers(self) -> JSON:
        return await self._call(core.simple_get("/v1/workers"))

    async def health(self) -> JSON:
        response = await self._send(core.simple_get("/healthz"))
        return core.health(response.status_code, response.content)
