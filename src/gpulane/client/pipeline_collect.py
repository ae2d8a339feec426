"""The sync Client's shared results collector and its :class:`TaskFuture`.

Every task whose end some caller waits for (a coalesced ``run()``, an ``enqueue()``d future) is
collected with ``POST /v1/tasks/results?wait=`` polls shared by all of them: a few daemon
threads (started as they are needed, at most :data:`MAX_POLLS`), each taking every id not yet
being polled, so a thousand waiting tasks cost one held request, not a thousand.

A transient failure of a poll (the node restarting, the link dropping) does not end an
enqueued future: the task is in the store, so its poll is tried again after a pause. A
``run()`` caller gets the error, as its own long-poll would have raised it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from gpulane.client import _core as core
from gpulane.client._coalesce_async import RESULTS_IDS, results_request, unknown_task
from gpulane.errors import ClientError

JSON = dict[str, Any]
Call = Callable[[core.Request], JSON]

MAX_POLLS = 8
"""Results polls in flight at once; each holds a connection for up to :data:`POLL_WAIT_S`."""
POLL_WAIT_S = 10.0
"""``?wait=`` of one results poll: long enough to be idle while nothing ends, short enough that
a closed client's poll threads are gone soon after."""
RETRY_PAUSE_S = 0.25
"""Pause before an enqueued task's poll is tried again after a transient failure."""


class TaskFuture(Future[JSON]):
    """What :meth:`Client.enqueue` hands back: a task on its way (a ``concurrent.futures``
    future, so ``wait()`` and ``as_completed()`` take it).

    ``result(timeout)`` is the final task, or raises TaskFailedError (failed or cancelled) as
    ``run()`` does, or the submit's own error (APIError naming the field) when it was refused.
    It cannot be cancelled (the task is the server's once sent; ``Client.cancel(f.id)`` asks
    the server).
    """

    def __init__(self, get: Callable[[str], JSON]) -> None:
        super().__init__()
        self.set_running_or_notify_cancel()  # running: cancel() answers False
        self._get = get
        self._acked = threading.Event()
        self._ack: JSON | None = None
        self._refused: BaseException | None = None
        self._final: JSON | None = None

    @property
    def id(self) -> str:
        """The task's id; blocks until the submit is acknowledged and raises its error
        (APIError, TransportError) when it was not."""
        return str(self._acknowledgement(None)["id"])

    def acknowledged(self) -> bool:
        """True once the server has the task (its bulk answered with it)."""
        return self._acked.is_set() and self._ack is not None

    def task(self, timeout: float | None = None) -> JSON:
        """The task as it stands (``GET /v1/tasks/{id}``, or the final one once in hand);
        TimeoutError when ``timeout`` seconds pass before the acknowledgement."""
        task_id = str(self._acknowledgement(timeout)["id"])
        return self._final if self._final is not None else self._get(task_id)

    def _acknowledgement(self, timeout: float | None) -> JSON:
        if not self._acked.wait(timeout):
            raise TimeoutError(f"the submit was not acknowledged within {timeout} s")
        if self._ack is None:
            assert self._refused is not None
            raise self._refused
        return self._ack

    # --- set by the pipeline --------------------------------------------------------------

    def _acknowledge(self, task: JSON) -> None:
        self._ack = task
        self._acked.set()

    def _refuse(self, error: BaseException) -> None:
        self._refused = error
        self._acked.set()
        self._end_with(error)

    def _end(self, task: JSON) -> None:
        self._final = task
        if task.get("state") in core.FAILED_STATES:
            self._end_with(core_failed(task))
        elif not self.done():
            self.set_result(task)

    def _end_with(self, error: BaseException) -> None:
        if not self.done():
            self.set_exception(error)


def core_failed(task: JSON) -> BaseException:
    """The TaskFailedError ``run()`` would raise for ``task``."""
    try:
        core.run_outcome(task)
    except ClientError as exc:
        return exc
    raise AssertionError("not a failed task")  # pragma: no cover - callers check the state


def settle(future: Future[JSON], task: JSON | None, error: BaseException | None) -> None:
    """Hand a collected end (or its error) to a waiting future."""
    if future.done():
        return
    if isinstance(future, TaskFuture):
        if error is not None:
            future._end_with(error)
        else:
            future._end(task or {})
    elif error is not None:
        future.set_exception(error)
    else:
        future.set_result(task or {})


class Collector:
    """The ends wanted by one Client's callers, collected by shared results polls."""

    def __init__(self, call: Call, max_polls: int = MAX_POLLS) -> None:
        self._call = call
        self._max_polls = max_polls
        self._cond = threading.Condition()
        self._wanted: dict[str, list[Future[JSON]]] = {}
        self._fresh: list[str] = []
        self._threads = 0
        self._idle = 0
        self._closed = False

    def want(self, task_id: str, future: Future[JSON]) -> None:
        """Collect ``task_id``'s end into ``future``."""
        with self._cond:
            if self._closed:
                settle(future, None, closed_error())
                return
            futures = self._wanted.setdefault(task_id, [])
            if not futures:
                self._fresh.append(task_id)
            futures.append(future)
            if self._idle:
                self._cond.notify()
            elif self._threads < self._max_polls:
                self._threads += 1
                threading.Thread(target=self._loop, name="gpulane-results", daemon=True).start()

    def drop(self, task_id: str, future: Future[JSON]) -> None:
        """The caller behind ``future`` stopped waiting for ``task_id``."""
        with self._cond:
            futures = self._wanted.get(task_id)
            if futures is not None and future in futures:
                futures.remove(future)
                if not futures:
                    del self._wanted[task_id]

    def close(self) -> None:
        """Stop polling; every end still wanted gets a ClientError."""
        with self._cond:
            self._closed = True
            wanted, self._wanted, self._fresh = self._wanted, {}, []
            self._cond.notify_all()
        for futures in wanted.values():
            for future in futures:
                settle(future, None, closed_error())

    def _loop(self) -> None:
        try:
            while True:
                with self._cond:
                    while not self._fresh and not self._closed:
                        self._idle += 1
                        self._cond.wait()
                        self._idle -= 1
                    if self._closed:
                        return
                    ids, self._fresh = self._fresh[:RESULTS_IDS], self._fresh[RESULTS_IDS:]
                self._poll(ids)
        finally:
            with self._cond:
                self._threads -= 1

    def _poll(self, ids: list[str]) -> None:
        start = time.monotonic()
        try:
            answer = self._call(results_request(ids, POLL_WAIT_S))
            tasks = core.task_list(answer)
        except ClientError as exc:
            self._failed(ids, exc)
            return
        if not tasks and not answer.get("missing") and (
                time.monotonic() - start < POLL_WAIT_S / 2):
            with self._cond:  # answered early with nothing: a server not holding; no tight loop
                self._cond.wait(RETRY_PAUSE_S)
        for task in tasks:
            self._deliver(str(task.get("id")), task, None)
        for task_id in answer.get("missing") or ():
            self._deliver(str(task_id), None, unknown_task(str(task_id)))
        with self._cond:
            for task_id in ids:  # still pending: polled again while somebody waits
                futures = self._wanted.get(task_id)
                if futures and any(not f.done() for f in futures):
                    self._fresh.append(task_id)  # an id is polled or fresh, never both
                elif futures is not None:
                    del self._wanted[task_id]

    def _failed(self, ids: list[str], error: ClientError) -> None:
        """A poll failed: run() callers get the error; enqueued futures, when it may pass,
        are polled again after a pause (their tasks are in the store)."""
        again: list[str] = []
        with self._cond:
            for task_id in ids:
                futures = self._wanted.get(task_id, [])
                keep: list[Future[JSON]] = [
                    f for f in futures if isinstance(f, TaskFuture) and error.transient]
                for future in futures:
                    if future not in keep:
                        settle(future, None, error)
                if keep:
                    self._wanted[task_id] = keep
                    again.append(task_id)
                else:
                    self._wanted.pop(task_id, None)
            if again:
                self._cond.wait(RETRY_PAUSE_S)  # woken early only by close()
                if not self._closed:
                    self._fresh.extend(again)

    def _deliver(self, task_id: str, task: JSON | None, error: BaseException | None) -> None:
        with self._cond:
            futures = self._wanted.pop(task_id, [])
        for future in futures:
            settle(future, task, error)


def closed_error() -> ClientError:
    return ClientError("the client was closed before this task's answer came")
