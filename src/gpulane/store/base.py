"""The Store protocol and the logic every backend shares.

A store keeps tasks, their events and idempotency keys, and wakes whoever waits on a task.
Backends (``sqlite.py``, later ``redis.py``) implement the primitives; the notifier, the ID
scheme and the idempotency rule live here so that every backend behaves the same, and the
conformance suite (tests/conformance) runs against each of them.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import orjson

from gpulane.errors import StaleTokenError
from gpulane.model import Event, Task, TaskSpec, TaskState


def new_task_id() -> str:
    """A 24-hex-digit id whose first 12 digits are milliseconds, so ids sort by creation time."""
    return f"{int(time.time() * 1000):012x}{os.urandom(6).hex()}"


def body_hash(body: Any) -> str:
    """Fingerprint of a submit body, to tell a retried submit from a different one."""
    return hashlib.sha256(orjson.dumps(body, option=orjson.OPT_SORT_KEYS)).hexdigest()


@dataclass(frozen=True, slots=True)
class QueueHead:
    """The next task of one preset's queue: what the scheduler compares across presets."""

    preset: str
    lane: str
    priority: int
    seq: int
    task_id: str


@dataclass(frozen=True, slots=True)
class NewEvent:
    """An event to append: its type and data; the store numbers it."""

    type: str
    data: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Finish:
    """One attempt's end, for :meth:`Store.finish_many`: a batch's tasks end together."""

    task_id: str
    token: int
    state: TaskState
    output: Any = None
    error: dict[str, Any] | None = None
    events: Sequence[NewEvent] = ()


class Store(Protocol):
    """What the node needs of a store. Every method is atomic."""

    notifier: Notifier

    async def open(self) -> None: ...
    async def close(self) -> None: ...

    async def submit(self, spec: TaskSpec) -> tuple[Task, bool]:
        """Add a queued task, or return the one its idempotency key already made (created=False).
        Raises ConflictError when the key was used with a different body."""

    async def submit_many(self, specs: Sequence[TaskSpec]) -> list[tuple[Task, bool]]: ...
    async def get(self, task_id: str) -> Task | None: ...

    async def list_tasks(self, state: TaskState | None = None, preset: str | None = None,
                         limit: int = 50, cursor: str | None = None
                         ) -> tuple[list[Task], str | None]:
        """Newest first; ``cursor`` is the previous page's ``next_cursor``."""

    async def queue_heads(self, lanes: Iterable[tuple[str, str]]) -> list[QueueHead]:
        """The head (highest priority, then oldest) of each non-empty (preset, lane) queue."""

    async def queued_count(self) -> int: ...

    async def age_queued(self, step_s: float, at: float | None = None) -> int:
        """Raise queued tasks' effective priority by 1 per ``step_s`` waited (ageing)."""

    async def claim(self, preset: str, lane: str, limit: int, node: str,
                    device: str) -> list[Task]:
        """Move up to ``limit`` queued tasks of (preset, lane) to running, highest priority
        first, bumping each one's attempts (its fencing token)."""

    async def append_events(self, task_id: str, events: Sequence[NewEvent]) -> list[Event]: ...
    async def events(self, task_id: str, after: int = 0, limit: int = 1000) -> list[Event]: ...

    async def finish(self, task_id: str, token: int, state: TaskState, output: Any = None,
                     error: dict[str, Any] | None = None,
                     events: Sequence[NewEvent] = ()) -> Task:
        """End the attempt holding ``token`` in a final state. StaleTokenError if it is not
        the task's current running attempt."""

    async def finish_many(self, items: Sequence[Finish]) -> list[Task | StaleTokenError]:
        """End many attempts in one transaction (a batch that finished together). Each
        item's answer is its final task, or the StaleTokenError that ``finish`` would raise;
        a stale item does not stop the others."""

    async def requeue(self, task_id: str, token: int, error: dict[str, Any] | None,
                      events: Sequence[NewEvent] = ()) -> Task:
        """Put a running attempt back in the queue (a retry, or a preempted task)."""

    async def cancel_queued(self, task_id: str) -> Task | None:
        """Cancel a task that is still queued; None if it was not queued any more."""

    async def recover(self, node: str) -> int:
        """Requeue the tasks a previous run of ``node`` left running; returns how many."""


class Notifier:
    """In-process wake-ups for waiters on a task (SSE streams, result long-polls).

    A waiter takes ``version(task_id)`` before reading the store, then ``wait`` for a version
    past it; that closes the race between reading and waiting. Result long-polls use
    ``until_final`` instead: they sleep through a task's intermediate changes (claimed,
    progress events) and get the final task handed to them, so they need no read of their own.
    """

    def __init__(self) -> None:
        self._versions: dict[str, int] = {}
        self._waiters: dict[str, list[asyncio.Future[None]]] = {}
        self._final_waiters: dict[str, list[asyncio.Future[Task | None]]] = {}

    def version(self, task_id: str) -> int:
        return self._versions.get(task_id, 0)

    def notify(self, task_id: str, task: Task | None = None) -> None:
        """The task changed. ``task`` is how it stands now, when the caller has it: a
        non-final one does not wake result waiters; without one, everyone wakes and re-reads."""
        self._versions[task_id] = self._versions.get(task_id, 0) + 1
        waiters = self._waiters.pop(task_id, None)
        if waiters:
            for fut in waiters:
                if not fut.done():
                    fut.set_result(None)
        if task is not None and not task.state.final:
            return
        final_waiters = self._final_waiters.pop(task_id, None)
        if final_waiters:
            for ffut in final_waiters:
                if not ffut.done():
                    ffut.set_result(task)

    def forget(self, task_id: str) -> None:
        """Drop a final task's version counter unless someone still waits on it."""
        if task_id not in self._waiters and task_id not in self._final_waiters:
            self._versions.pop(task_id, None)

    async def wait(self, task_id: str, seen_version: int, timeout: float) -> bool:
        """Wait until the task changes past ``seen_version`` or ``timeout`` passes."""
        if self._versions.get(task_id, 0) != seen_version:
            return True
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(task_id, []).append(fut)
        try:
            async with asyncio.timeout(timeout):
                await fut
            return True
        except TimeoutError:
            return False
        finally:
            _discard(self._waiters, task_id, fut)

    async def until_final(self, task_id: str, seen_version: int,
                          timeout: float) -> Task | bool:
        """Wait for the task's final state: the final task when a notify carried it, True
        when the caller must re-read (it changed before the wait, or a notify carried no
        task), False when ``timeout`` passed."""
        if self._versions.get(task_id, 0) != seen_version:
            return True
        fut: asyncio.Future[Task | None] = asyncio.get_running_loop().create_future()
        self._final_waiters.setdefault(task_id, []).append(fut)
        try:
            async with asyncio.timeout(timeout):
                task = await fut
            return True if task is None else task
        except TimeoutError:
            return False
        finally:
            _discard(self._final_waiters, task_id, fut)


def _discard(table: dict[str, list[Any]], task_id: str, fut: asyncio.Future[Any]) -> None:
    lst = table.get(task_id)
    if lst and fut in lst:
        lst.remove(fut)
        if not lst:
            del table[task_id]


async def wait_final(store: Store, task_id: str, timeout: float) -> Task | None:
    """The task once it is final, or as it stands when ``timeout`` passes (None if unknown)."""
    deadline = time.monotonic() + timeout
    while True:
        seen = store.notifier.version(task_id)
        task = await store.get(task_id)
        if task is None or task.state.final:
            return task
        left = deadline - time.monotonic()
        if left <= 0:
            return task
        got = await store.notifier.until_final(task_id, seen, left)
        if isinstance(got, Task):
            return got
        if got is False:
            return await store.get(task_id)


def open_store(url: str, synchronous: str = "NORMAL") -> Store:
    """Build the store a URL names: ``sqlite:///path`` (embedded) or ``redis://`` (fleet)."""
    from gpulane.errors import ConfigError

    if url.startswith("sqlite://"):
        from gpulane.store.sqlite import SqliteStore

        # SQLAlchemy's convention: sqlite:///relative/path, sqlite:////absolute/path.
        path = url.removeprefix("sqlite:///") if url.startswith("sqlite:///") else ""
        return SqliteStore(path or ":memory:", synchronous=synchronous)
    raise ConfigError(
        f"store={url!r} is not supported yet: use sqlite:///PATH (the embedded default)")
