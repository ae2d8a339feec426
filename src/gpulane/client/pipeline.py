"""The sync Client's pipelined submitter: many threads' submits in one bulk request.

Three paths share it:

* ``enqueue()``: the submit is queued and a :class:`TaskFuture` handed back at once. A sender
  thread gathers what is enqueued within :data:`GATHER_S` of the first (and everything
  enqueued while its bulk is in flight) into one ``POST /v1/tasks/bulk`` of at most
  :data:`BULK_ITEMS`; a future is acknowledged when that bulk answers with its task.
* ``run()`` and ``submit()`` from many threads: a caller that finds nothing of its kind in
  flight goes out alone, exactly as before (no added wait; a sequential loop is never
  coalesced). One that arrives while requests are in flight queues, and a sender sends every
  queued caller's submit as one bulk (``?wait=`` for ``run()``, so a group of quick tasks is
  one round trip).
* what is not final when its bulk answers is collected by shared results polls
  (:mod:`gpulane.client.pipeline_collect`).

Each caller keeps its own answer: every item carries its own Idempotency-Key (a retried bulk
never makes a task twice), and a bulk answered 4xx is sent again without the item its error
names, or item by item, so one bad item never fails the others. The sans-IO rules are
:mod:`gpulane.client._coalesce_async`'s, shared with the AsyncClient.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from gpulane.client import _core as core
from gpulane.client._coalesce_async import (
    PEEL_ROUNDS,
    RUN_HOLD_S,
    bad_item,
    bulk_request,
    lane_key,
    resend_singly,
)
from gpulane.client.pipeline_collect import Collector, TaskFuture, closed_error, settle
from gpulane.errors import APIError, ClientError

JSON = dict[str, Any]
Call = Callable[[core.Request], JSON]

BULK_ITEMS = 500
"""Tasks per bulk request: a smaller body is answered sooner, and the next one is gathering."""
GATHER_S = 0.001
"""How long an enqueue sender waits after the first item of a burst for the rest of it."""
SENDERS = 2
"""Bulk requests in flight at once per kind of coalesced run()/submit() call."""


@dataclass(eq=False)
class Item:
    """One caller's submit: its request, its acknowledgement and what the caller gets."""

    request: core.Request
    held: bool  # run(): ``outcome`` is the final task; else the acknowledged one
    outcome: Future[JSON]  # a TaskFuture for enqueue()
    acked: threading.Event = field(default_factory=threading.Event)
    task: JSON | None = None

    def acknowledge(self, task: JSON) -> None:
        self.task = task
        if isinstance(self.outcome, TaskFuture):
            self.outcome._acknowledge(task)
        self.acked.set()

    def fail(self, error: BaseException) -> None:
        if isinstance(self.outcome, TaskFuture):
            self.outcome._refuse(error)
        else:
            settle(self.outcome, None, error)
        self.acked.set()


@dataclass(eq=False)
class _Lane:
    """One kind of submit that may share a bulk (same ``?gpu=``, held or not, enqueued or
    not): its queued items, its requests in flight, its sender threads."""

    cond: threading.Condition
    gather_s: float
    max_senders: int
    pending: list[Item] = field(default_factory=list)
    busy: int = 0  # requests in flight: a lone caller's or a bulk
    senders: int = 0
    idle: int = 0


class Pipeline:
    """The lanes and the collector of one Client. ``call`` is the client's guarded exchange."""

    def __init__(self, call: Call) -> None:
        self._call = call
        self.collector = Collector(call)
        self._lock = threading.Lock()
        self._lanes: dict[tuple[object, ...], _Lane] = {}
        self._unacked: set[Item] = set()
        self._closed = False

    # --- the callers' side ----------------------------------------------------------------

    def enqueue(self, request: core.Request, future: TaskFuture) -> None:
        """Queue an unheld submit for the next bulk; ``future`` is acknowledged and ended."""
        self._queue(self._lane(request, True), Item(request, False, future))

    def shared(self, request: core.Request,
               alone: Callable[[], JSON]) -> tuple[Item | None, JSON | None]:
        """A run()/submit(): ``alone()``'s answer when nothing of its kind is in flight, else
        its item once queued (the caller waits with :meth:`outcome`)."""
        lane = self._lane(request, False)
        with lane.cond:
            solo = lane.busy == 0 and not lane.pending
            if solo:
                lane.busy += 1
        if solo:
            try:
                return None, alone()
            finally:
                with lane.cond:
                    lane.busy -= 1
        item = Item(request, request.hold_s is not None, Future())
        self._queue(lane, item)
        return item, None

    def outcome(self, item: Item, deadline: float | None, get: Callable[[str], JSON]) -> JSON:
        """A queued caller's answer; past ``deadline`` (run), the task as it stands."""
        with contextlib.suppress(TimeoutError):  # past it: the task as it stands, below
            return item.outcome.result(None if deadline is None
                                       else max(0.0, deadline - time.monotonic()))
        lane = self._lane(item.request, False)
        with lane.cond:
            unsent = item in lane.pending
            if unsent:
                lane.pending.remove(item)
        if unsent:  # never sent: go now, without holding the answer
            with self._lock:
                self._unacked.discard(item)
            item.request.params["wait"] = "0"
            item.request.hold_s = 0.0
            try:
                task = self._call(item.request)
            except ClientError as exc:
                item.fail(exc)
                raise
            item.acknowledge(task)
            return task
        item.acked.wait()  # its bulk is held no longer than this caller's own wait
        if item.outcome.done() or item.task is None:
            return item.outcome.result()
        self.collector.drop(str(item.task["id"]), item.outcome)
        return get(str(item.task["id"]))

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every submit queued so far is acknowledged (or refused); False when
        ``timeout`` passed first."""
        with self._lock:
            items = list(self._unacked)
        end = None if timeout is None else time.monotonic() + timeout
        for item in items:
            left = None if end is None else max(0.0, end - time.monotonic())
            if not item.acked.wait(left):
                return False
        return True

    def close(self) -> None:
        """Flush, then stop the sender and poll threads; ends still wanted get ClientError."""
        self.flush()
        with self._lock:
            self._closed = True
            lanes = list(self._lanes.values())
        for lane in lanes:
            with lane.cond:
                left, lane.pending = lane.pending, []
                lane.cond.notify_all()
            for item in left:
                item.fail(closed_error())
            with self._lock:
                self._unacked.difference_update(left)
        self.collector.close()

    # --- lanes and senders ----------------------------------------------------------------

    def _lane(self, request: core.Request, enqueued: bool) -> _Lane:
        key = (*lane_key(request), enqueued)
        lane = self._lanes.get(key)
        if lane is None:
            with self._lock:
                lane = self._lanes.setdefault(key, _Lane(
                    threading.Condition(), GATHER_S if enqueued else 0.0,
                    1 if enqueued else SENDERS))  # one enqueue sender keeps their order
        return lane

    def _queue(self, lane: _Lane, item: Item) -> None:
        with self._lock:
            if self._closed:
                item.fail(ClientError("the client is closed: make a new one to submit"))
                return
            self._unacked.add(item)
        with lane.cond:
            lane.pending.append(item)
            if lane.idle:
                lane.cond.notify()
            elif lane.senders < lane.max_senders:
                lane.senders += 1
                threading.Thread(target=self._sender, args=(lane,), name="gpulane-submit",
                                 daemon=True).start()

    def _sender(self, lane: _Lane) -> None:
        while True:
            with lane.cond:
                while not lane.pending and not self._closed:
                    lane.idle += 1
                    lane.cond.wait()
                    lane.idle -= 1
                if self._closed and not lane.pending:
                    lane.senders -= 1
                    return
                if lane.gather_s and len(lane.pending) < BULK_ITEMS:
                    lane.cond.wait(lane.gather_s)  # the rest of the burst joins
                items, lane.pending = lane.pending[:BULK_ITEMS], lane.pending[BULK_ITEMS:]
                lane.busy += 1
            try:
                self._send_part(items)
            finally:
                with lane.cond:
                    lane.busy -= 1
                with self._lock:
                    self._unacked.difference_update(items)

    def _send_part(self, items: list[Item], peel: int = PEEL_ROUNDS) -> None:
        try:
            if len(items) == 1:
                self._send_one(items[0])
                return
            holds = [i.request.hold_s for i in items if i.request.hold_s is not None]
            hold = min([RUN_HOLD_S, *holds]) if holds else None
            try:
                answer = self._call(bulk_request([i.request for i in items], hold))
                tasks = core.task_list(answer)
                if len(tasks) != len(items):
                    raise APIError(200, "bad_response", f"the bulk answer has {len(tasks)} "
                                   f"tasks for {len(items)} sent", body=answer)
            except ClientError as exc:
                if not resend_singly(exc):
                    raise
                bad = bad_item(exc, len(items)) if peel else None
                if bad is None:
                    for item in items:
                        self._send_one(item)
                else:  # the item its error names gets its own answer; the rest go together
                    self._send_one(items[bad])
                    self._send_part(items[:bad] + items[bad + 1:], peel - 1)
                return
            for item, task in zip(items, tasks, strict=True):
                self._landed(item, task)
        except ClientError as exc:
            for item in items:
                if not item.acked.is_set():
                    item.fail(exc)
        except BaseException as exc:
            for item in items:
                if not item.acked.is_set():
                    item.fail(ClientError(f"the submit was not sent: {exc!r}"))
            raise

    def _send_one(self, item: Item) -> None:
        request = item.request
        if request.hold_s is not None and request.hold_s > RUN_HOLD_S:
            request.params["wait"] = f"{RUN_HOLD_S:.3f}"
            request.hold_s = RUN_HOLD_S
        try:
            task = self._call(request)
        except ClientError as exc:
            item.fail(exc)
            return
        self._landed(item, task)

    def _landed(self, item: Item, task: JSON) -> None:
        item.acknowledge(task)
        if isinstance(item.outcome, TaskFuture) or item.held:
            if core.is_final(task):
                settle(item.outcome, task, None)
            else:
                self.collector.want(str(task["id"]), item.outcome)
        else:
            settle(item.outcome, task, None)
