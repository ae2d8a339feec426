"""Outcomes written through a store outage: kept in order while the store is unreachable,
written once it answers, bounded, and fenced like any other write."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, cast

from gpulane.errors import StaleTokenError, StoreUnavailableError
from gpulane.model import TaskState
from gpulane.runtime.outcomes import OutcomeWriter
from gpulane.runtime.taskrun import TaskRun
from gpulane.store import Finish, NewEvent, Store
from tests.conftest import eventually


class FlakyStore:
    """Records the writes it takes; refuses every write with StoreUnavailableError while
    ``down``; answers a stale token for the task ids in ``stale``."""

    def __init__(self) -> None:
        self.down = False
        self.stale: set[str] = set()
        self.writes: list[tuple[str, str]] = []
        self.refused = 0

    def _take(self, op: str, task_id: str) -> None:
        if self.down:
            self.refused += 1
            raise StoreUnavailableError("redis://127.0.0.1:1/0 is unreachable")
        if task_id in self.stale:
            raise StaleTokenError(f"task {task_id}: stale token")
        self.writes.append((op, task_id))

    async def append_events(self, task_id: str, events: list[NewEvent]) -> None:
        self._take("event", task_id)

    async def finish_many(self, ends: list[Finish]) -> list[object]:
        for e in ends:
            self._take("finish", e.task_id)
        return [None for _ in ends]

    async def requeue(self, task_id: str, token: int, error: Any, events: Any = (),
                      spent: bool = True) -> None:
        self._take("requeue" if spent else "requeue_unspent", task_id)


class Listener:
    def __init__(self) -> None:
        self.changes = 0

    def worker_exited(self, worker_id: str) -> None: ...
    def cpu_slot_freed(self, worker_id: str) -> None: ...

    def capacity_changed(self) -> None:
        self.changes += 1


def _writer(store: FlakyStore, pending_max: int = 100) -> OutcomeWriter:
    return OutcomeWriter(cast(Store, store), Listener(), pending_max=pending_max)


def _run(task_id: str) -> TaskRun:
    return cast(TaskRun, SimpleNamespace(id=task_id, store_failed=False))


async def test_outcomes_are_kept_through_an_outage_and_written_in_order() -> None:
    store = FlakyStore()
    writer = _writer(store)
    store.down = True
    await writer.append(_run("t1"), NewEvent("text", {"content": "hi"}))
    await writer.finish_many([Finish("t1", 1, TaskState.SUCCEEDED, output={})])
    await writer.requeue_unspent([("t2", 1)], {"kind": "preempted"})
    assert writer.pending == 3 and store.writes == []
    await eventually(lambda: _true(store.refused >= 3))
    store.down = False
    await eventually(lambda: _true(writer.pending == 0))
    assert store.writes == [("event", "t1"), ("finish", "t1"), ("requeue_unspent", "t2")]


async def test_a_write_made_while_others_are_kept_waits_behind_them() -> None:
    store = FlakyStore()
    writer = _writer(store)
    store.down = True
    await writer.append(_run("t1"), NewEvent("text", {"content": "a"}))
    store.down = False  # back, but the kept event is not written yet
    await writer.finish_many([Finish("t1", 1, TaskState.SUCCEEDED, output={})])
    await eventually(lambda: _true(writer.pending == 0))
    assert store.writes == [("event", "t1"), ("finish", "t1")]


async def test_a_late_write_of_a_reaped_attempt_is_refused_and_dropped() -> None:
    store = FlakyStore()
    writer = _writer(store)
    store.down = True
    await writer.finish_many([Finish("t1", 1, TaskState.SUCCEEDED, output={})])
    await writer.retry("t2", 1, {"kind": "internal"}, NewEvent("error", {}))
    store.stale.add("t1")  # reaped by another node meanwhile: its token is stale
    store.down = False
    await eventually(lambda: _true(writer.pending == 0))
    assert store.writes == [("requeue", "t2")]


async def test_kept_writes_are_bounded_the_oldest_dropped() -> None:
    store = FlakyStore()
    writer = _writer(store, pending_max=3)
    store.down = True
    for n in range(5):
        await writer.finish_many([Finish(f"t{n}", 1, TaskState.SUCCEEDED, output={})])
    assert writer.pending == 3 and writer.dropped == 2
    store.down = False
    await eventually(lambda: _true(writer.pending == 0))
    assert store.writes == [("finish", "t2"), ("finish", "t3"), ("finish", "t4")]


async def test_close_drops_what_an_unreachable_store_never_took() -> None:
    store = FlakyStore()
    writer = _writer(store)
    store.down = True
    await writer.finish_many([Finish("t1", 1, TaskState.SUCCEEDED, output={})])
    await writer.close(0.05)
    assert writer.pending == 0 and store.writes == []


async def _true(value: bool) -> bool:
    return value
