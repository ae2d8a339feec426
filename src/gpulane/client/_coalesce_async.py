"""AsyncClient's coalescing: many coroutines' submits in one bulk request, their ends in one.

Coroutines that call ``run()`` or ``submit()`` in the same turn of the event loop (64 callers
woken by one answer call again together) share one ``POST /v1/tasks/bulk`` (``?wait=`` for
``run()``, so a group of quick tasks is one round trip); what is not final by then is
collected with ``POST /v1/tasks/results?wait=`` polls shared by every caller waiting. A lone
caller waits for nothing: it finds nobody else in its turn and goes out exactly as before
(``solo``), one loop turn later. ``enqueue()`` items are gathered the same way, without
holding the bulk answer.

Each caller keeps its own answer: a bulk answered 4xx (one bad item refuses the whole
transaction) is sent again item by item, each with its own Idempotency-Key, so each caller
gets its own task or error; a transport error after the retries goes to every item of the
request that failed. Nothing here times a caller out: ``run()``'s deadline is the caller's.
"""

from __future__ import annotations

import asyncio
import logging
import re
import weakref
from collections.abc import Awaitable, Callable, Generator, Sequence
from dataclasses import dataclass, field
from typing import Any

from gpulane.client import _core as core
from gpulane.errors import APIError, ClientError

log = logging.getLogger("gpulane.client")

JSON = dict[str, Any]
Call = Callable[[core.Request], Awaitable[JSON]]

RUN_HOLD_S = 0.5
"""Longest ``?wait=`` of a coalesced run()'s bulk: a quick group ends in one round trip, and a
quick task never waits behind a slow one of its group longer than this (the rest is collected
with ``POST /v1/tasks/results``)."""
BULK_ITEMS = 1000
"""Tasks per bulk request (the server takes 10,000; a smaller body is answered sooner)."""
RESULTS_IDS = 1000
"""Ids per ``POST /v1/tasks/results`` (the server's most)."""
MAX_POLLS = 8
"""Results polls in flight at once; each holds a connection for up to its wait."""
POLL_FAILURES = 3
"""Results polls in a row that may fail transiently (after their own retries) before their
callers get the error: a poll stands for many callers, and their tasks are the server's."""
PEEL_ROUNDS = 3
"""Bad items taken out of a refused bulk one at a time, the rest sent again as a bulk, before
the remaining items are sent singly."""
_ITEM_FIELD = re.compile(r"tasks\[(\d+)\]")
RESEND_STATUSES = frozenset({400, 404, 409, 413, 422})
"""A bulk refused with one of these may owe it to one item (a bad body, an unknown preset, a
key reused for another body, too big as a whole): it is sent again item by item. Others (401,
403, 408, 429) would refuse every item alike, and are every caller's answer."""


# --- sans-IO: requests and answers (the sync Client's pipeline shares them) -------------


def bulk_request(requests: Sequence[core.Request], hold_s: float | None) -> core.Request:
    """``POST /v1/tasks/bulk`` for single submits (their bodies, keys and ``?gpu=``, which
    must be the same for all); ``?wait=hold_s`` when given."""
    tasks = [{**r.json, "idempotency_key": r.headers["Idempotency-Key"]} for r in requests]
    request = core.submit_many(tasks)
    request.params = {k: v for k, v in requests[0].params.items() if k == "gpu"}
    if hold_s is not None:
        request.params["wait"] = f"{hold_s:.3f}"
        request.hold_s = hold_s
    return request


def results_request(ids: Sequence[str], wait: float) -> core.Request:
    """``POST /v1/tasks/results?wait=``: the tasks of ``ids`` that are final (read-only)."""
    return core.Request("POST", "/v1/tasks/results", params={"wait": f"{wait:.3f}"},
                        json={"ids": list(ids)}, hold_s=wait)


def unknown_task(task_id: str) -> APIError:
    """What a caller gets for an id the results answer names missing (as GET would 404)."""
    return APIError(404, "unknown_task", f"no task with id {task_id!r}", "id")


def resend_singly(error: ClientError) -> bool:
    """Whether a bulk refused with ``error`` is sent again item by item."""
    return isinstance(error, APIError) and error.status in RESEND_STATUSES


def bad_item(error: ClientError, count: int) -> int | None:
    """The index of the one item a bulk's 4xx names (``field`` ``tasks[i]...``), or None."""
    match = _ITEM_FIELD.match(error.field or "") if isinstance(error, APIError) else None
    index = int(match.group(1)) if match else -1
    return index if 0 <= index < count else None


def lane_key(request: core.Request) -> tuple[object, bool]:
    """Submits that may share a bulk: the same ``?gpu=``, all held (run) or none."""
    return request.params.get("gpu"), request.hold_s is not None


# --- the machinery ------------------------------------------------------------------------


@dataclass(eq=False)
class Item:
    """One caller's submit: its request, its acknowledgement and (run) its end."""

    request: core.Request
    ack: asyncio.Future[JSON]
    outcome: asyncio.Future[JSON]  # run: the final task; submit: the acknowledged one
    held: bool
    end: asyncio.Future[JSON] | None = None  # enqueue: the final task, once collected

    def acked(self, task: JSON) -> None:
        if not self.ack.done():
            self.ack.set_result(task)
        if not self.held and not self.outcome.done():
            self.outcome.set_result(task)

    def failed(self, error: BaseException) -> None:
        for fut in (self.ack, self.outcome, self.end):
            if fut is not None and not fut.done():
                fut.set_exception(error)
                fut.exception()  # retrieved: a caller that gave up leaves no warning


@dataclass(eq=False)
class _Lane:
    gathering: list[Item] | None = None


@dataclass(eq=False)
class Coalescer:
    """The lanes of one AsyncClient and its shared results collector."""

    call: Call
    _lanes: dict[tuple[object, bool], _Lane] = field(default_factory=dict)
    _background: set[asyncio.Task[None]] = field(default_factory=set)
    _wanted: dict[str, list[asyncio.Future[JSON]]] = field(default_factory=dict)
    _fresh: list[str] = field(default_factory=list)
    _polls: int = 0
    _unacked: set[asyncio.Future[JSON]] = field(default_factory=set)
    # Enqueued tasks' ends nobody awaits yet; dropped with the caller's future.
    _parked: weakref.WeakValueDictionary[str, asyncio.Future[JSON]] = field(
        default_factory=weakref.WeakValueDictionary)
    _collect_all: bool = False
    _kicked: bool = False
    _closed: bool = False
    _poll_failures: int = 0
    count_calls: Callable[[int], None] | None = None  # a bulk speaks for this many calls

    def item(self, request: core.Request) -> Item:
        loop = asyncio.get_running_loop()
        item = Item(request, loop.create_future(), loop.create_future(),
                    request.hold_s is not None)
        self._unacked.add(item.ack)
        item.ack.add_done_callback(self._unacked.discard)
        return item

    async def submit(self, request: core.Request,
                     solo: Callable[[], Awaitable[JSON]]) -> tuple[Item, JSON | None]:
        """Send ``request`` (a single submit) with the others of this loop turn. Returns its
        item and, when it went alone, ``solo()``'s answer (else await ``item.outcome``)."""
        lane = self._lanes.setdefault(lane_key(request), _Lane())
        item = self.item(request)
        if lane.gathering is not None:
            lane.gathering.append(item)
            return item, None
        lane.gathering = [item]
        try:
            await asyncio.sleep(0)  # the callers woken in this turn join
        except BaseException:
            items, lane.gathering = lane.gathering, None
            items.remove(item)
            item.failed(ClientError("cancelled before it was sent"))
            if items:
                self.spawn(self._send(items))
            raise
        items, lane.gathering = lane.gathering, None
        if len(items) == 1:
            try:
                answer = await solo()
            except BaseException as exc:
                item.failed(exc if isinstance(exc, Exception) else ClientError("cancelled"))
                raise
            item.acked(answer)
            return item, answer
        self.spawn(self._send(items))
        return item, None

    def enqueue(self, request: core.Request) -> Item:
        """Queue an unheld submit, sent with the others enqueued in this loop turn."""
        lane = self._lanes.setdefault(lane_key(request), _Lane())
        item = self.item(request)
        item.end = item.ack.get_loop().create_future()
        if lane.gathering is None:
            lane.gathering = []
            self.spawn(self._flush(lane))
        lane.gathering.append(item)
        return item

    async def flush(self) -> None:
        """Returns once every submit queued so far is acknowledged (or failed)."""
        if self._unacked:
            await asyncio.wait(list(self._unacked))

    def collect(self, task_id: str, end: asyncio.Future[JSON]) -> None:
        """An enqueued task's end is awaited: from now on every enqueued task's end is
        collected as it is acknowledged (they end in about the order they were queued, and
        one results poll brings many), those acknowledged before included."""
        if not self._collect_all:
            self._collect_all = True
            parked = list(self._parked.items())
            self._parked.clear()
            for other_id, other_end in parked:
                if other_end is not end:
                    self.want(other_id, other_end)
        if not end.done() and end not in self._wanted.get(task_id, ()):
            self.want(task_id, end)

    def want(self, task_id: str, future: asyncio.Future[JSON]) -> None:
        """Collect ``task_id``'s end into ``future`` (with every other id wanted)."""
        if self._closed:
            if not future.done():
                future.set_exception(_closed_error())
                future.exception()  # retrieved: the caller awaits it, or has gone
            return
        futures = self._wanted.setdefault(task_id, [])
        if not futures:
            self._fresh.append(task_id)
        futures.append(future)
        if not self._kicked:  # once the caller's whole answer is read: one poll for all
            self._kicked = True
            asyncio.get_running_loop().call_soon(self._poll_more)

    def drop(self, task_id: str, future: asyncio.Future[JSON]) -> None:
        """The caller behind ``future`` stopped waiting for ``task_id``."""
        futures = self._wanted.get(task_id)
        if futures is not None and future in futures:
            futures.remove(future)
            if not futures:
                del self._wanted[task_id]

    def spawn(self, coro: Awaitable[None]) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._reap)

    def _reap(self, task: asyncio.Task[None]) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            # Its callers got the error already (a closed client's RuntimeError, say).
            log.debug("AsyncClient background send ended: %r", task.exception())

    async def aclose(self) -> None:
        """Wait until what was enqueued is acknowledged or refused (as the sync Client's close
        does), then stop collecting: futures still waiting for an end get ClientError."""
        await self.flush()
        self._closed = True
        tasks = list(self._background)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        closed = _closed_error()
        for futures in self._wanted.values():
            for fut in futures:
                if not fut.done():
                    fut.set_exception(closed)
                    fut.exception()
        self._wanted.clear()
        self._fresh.clear()

    # --- sending --------------------------------------------------------------------------

    async def _flush(self, lane: _Lane) -> None:
        await asyncio.sleep(0)  # every enqueue of this loop turn is in
        items, lane.gathering = lane.gathering or [], None
        await self._send(items)

    async def _send(self, items: list[Item]) -> None:
        parts = [items[i:i + BULK_ITEMS] for i in range(0, len(items), BULK_ITEMS)]
        await asyncio.gather(*(self._send_part(part) for part in parts))

    async def _send_part(self, items: list[Item], peel: int = PEEL_ROUNDS) -> None:
        try:
            if len(items) == 1:
                await self._send_one(items[0])
                return
            holds = [i.request.hold_s for i in items if i.request.hold_s is not None]
            hold = min([RUN_HOLD_S, *holds]) if holds else None
            try:
                if self.count_calls is not None:
                    self.count_calls(len(items) - 1)
                answer = await self.call(bulk_request([i.request for i in items], hold))
                tasks = core.task_list(answer)
                if len(tasks) != len(items):
                    raise APIError(200, "bad_response", f"the bulk answer has {len(tasks)} "
                                   f"tasks for {len(items)} sent", body=answer)
            except ClientError as exc:
                if not resend_singly(exc):
                    raise
                bad = bad_item(exc, len(items)) if peel else None
                if bad is None:
                    await asyncio.gather(*(self._send_one(item) for item in items))
                else:  # the item the error names gets its own answer; the rest go together
                    rest = items[:bad] + items[bad + 1:]
                    await asyncio.gather(self._send_one(items[bad]),
                                         self._send_part(rest, peel - 1))
                return
            for item, task in zip(items, tasks, strict=True):
                self._landed(item, task)
        except ClientError as exc:
            for item in items:
                item.failed(exc)
        except BaseException:
            for item in items:
                item.failed(ClientError("the client was closed before this task was sent"))
            raise

    async def _send_one(self, item: Item) -> None:
        request = item.request
        if request.hold_s is not None and request.hold_s > RUN_HOLD_S:
            request.params["wait"] = f"{RUN_HOLD_S:.3f}"
            request.hold_s = RUN_HOLD_S
        try:
            task = await self.call(request)
        except ClientError as exc:
            item.failed(exc)
            return
        self._landed(item, task)

    def _landed(self, item: Item, task: JSON) -> None:
        item.acked(task)
        if item.end is not None:
            if core.is_final(task):
                item.end.set_result(task)
            elif self._collect_all:
                self.want(str(task["id"]), item.end)
            else:
                self._parked[str(task["id"])] = item.end
            return
        if not item.held or item.outcome.done():
            return
        if core.is_final(task):
            item.outcome.set_result(task)
        else:
            self.want(str(task["id"]), item.outcome)

    # --- collecting -----------------------------------------------------------------------

    def _poll_more(self) -> None:
        self._kicked = False
        while not self._closed and self._fresh and self._polls < MAX_POLLS:
            ids, self._fresh = self._fresh[:RESULTS_IDS], self._fresh[RESULTS_IDS:]
            self._polls += 1
            self.spawn(self._poll(ids))

    async def _poll(self, ids: list[str]) -> None:
        try:
            answer = await self.call(results_request(ids, core.MAX_POLL_WAIT))
            tasks = core.task_list(answer)
        except ClientError as exc:
            self._poll_failures += 1
            if exc.transient and self._poll_failures < POLL_FAILURES:
                # The tasks are the server's already: ask again after a pause, rather than
                # fail every caller waiting for one of them.
                await asyncio.sleep(0.1 * 2 ** self._poll_failures)
                self._fresh.extend(i for i in ids if i in self._wanted)
            else:
                for task_id in ids:
                    self._deliver(task_id, None, exc)
        else:
            self._poll_failures = 0
            for task in tasks:
                self._deliver(str(task.get("id")), task, None)
            for task_id in answer.get("missing") or ():
                self._deliver(str(task_id), None, unknown_task(str(task_id)))
            for task_id in ids:  # still pending: polled again, while somebody waits
                futures = self._wanted.get(task_id)
                if futures is not None and any(not f.done() for f in futures):
                    self._fresh.append(task_id)
                elif futures is not None:
                    del self._wanted[task_id]
        finally:
            self._polls -= 1
        self._poll_more()

    def _deliver(self, task_id: str, task: JSON | None, error: Exception | None) -> None:
        for fut in self._wanted.pop(task_id, ()):
            if fut.done():
                continue
            if error is not None:
                fut.set_exception(error)
                fut.exception()
            else:
                fut.set_result(task or {})


def _closed_error() -> ClientError:
    return ClientError("the client was closed before this task's end was collected")


class AsyncTaskFuture:
    """What :meth:`AsyncClient.enqueue` hands back: a task on its way. ``await future`` is
    ``await future.result()``.

    ``id`` is the task's id once the submit is acknowledged (None before);
    ``await future.acknowledgement()`` waits for it (raising the submit's error).
    """

    def __init__(self, coalescer: Coalescer, item: Item,
                 get: Callable[[str], Awaitable[JSON]]) -> None:
        assert item.end is not None
        self._coalescer, self._item, self._end, self._get = coalescer, item, item.end, get

    @property
    def id(self) -> str | None:
        ack = self._item.ack
        return str(ack.result()["id"]) if self.acknowledged() else None

    def acknowledged(self) -> bool:
        """True once the server has the task (a 202 came back for it)."""
        ack = self._item.ack
        return ack.done() and not ack.cancelled() and ack.exception() is None

    def done(self) -> bool:
        """True once the task's end (or the submit's error) is in hand."""
        return self._end.done()

    async def acknowledgement(self) -> str:
        """The task's id once the server has it; raises the submit's error (APIError,
        TransportError)."""
        task = await asyncio.shield(self._item.ack)
        return str(task["id"])

    async def task(self, timeout: float | None = None) -> JSON:
        """The task as it stands (``GET /v1/tasks/{id}``), once acknowledged; TimeoutError
        when ``timeout`` seconds pass before the acknowledgement."""
        async with asyncio.timeout(timeout):
            task_id = await self.acknowledgement()
        if self._end.done() and not self._end.exception():
            return self._end.result()
        return await self._get(task_id)

    async def result(self, timeout: float | None = None) -> JSON:
        """The final task; TaskFailedError when it failed or was cancelled (as ``run()``),
        TimeoutError when ``timeout`` seconds pass first (the task goes on)."""
        async with asyncio.timeout(timeout):
            task_id = await self.acknowledgement()
            if not self._end.done():
                self._coalescer.collect(task_id, self._end)
            task = await asyncio.shield(self._end)
        return core.run_outcome(task)

    def __await__(self) -> Generator[Any, None, JSON]:
        return self.result().__await__()
