"""Reads and result waits over many tasks at once (get_many, wait_final_many), per backend.

What POST /v1/tasks/results and POST /v1/tasks/bulk?wait= stand on: one read for the lot, one
notifier wait for any of them, entries gone once the wait answers. Timeouts are driven by
``loop_clock`` (tests/conftest.py), never waited out.
"""

from __future__ import annotations

import asyncio

from tests.conformance.test_store import GUARD_S, LONG_S, claim_one, spec, submit
from tests.conftest import LoopClock, eventually, settle

from gpulane.model import TaskState
from gpulane.store import Finish, NewEvent, Store
from gpulane.store.base import wait_final_many

UNKNOWN = "0" * 24


async def _parked_on(store: Store, task_id: str) -> None:
    async def check() -> bool:
        return store.notifier.waited_on(task_id)

    await eventually(check)


async def test_get_many_answers_in_the_order_asked_with_none_for_unknown(store: Store) -> None:
    a, b = await submit(store, input=1), await submit(store, input=2)
    got = await store.get_many([b.id, UNKNOWN, a.id, b.id])
    assert [t.id if t else None for t in got] == [b.id, None, a.id, b.id]
    assert got[0] is not None and got[0].input == 2
    assert await store.get_many([]) == []


async def test_get_many_reads_a_thousand_ids(store: Store) -> None:
    tasks = [t for t, _ in await store.submit_many([spec(input=i) for i in range(1000)])]
    ids = [t.id for t in reversed(tasks)]
    got = await store.get_many(ids)
    assert [t.id for t in got if t is not None] == ids


async def test_wait_many_answers_at_once_when_one_is_final_or_unknown(store: Store) -> None:
    a, b = await submit(store), await submit(store)
    await store.cancel_queued(b.id)
    got = await asyncio.wait_for(wait_final_many(store, [a.id, b.id], LONG_S), GUARD_S)
    assert got[0] is not None and got[0].state is TaskState.QUEUED
    assert got[1] is not None and got[1].state is TaskState.CANCELLED
    got = await asyncio.wait_for(wait_final_many(store, [a.id, UNKNOWN], LONG_S), GUARD_S)
    assert got[1] is None


async def test_wait_many_wakes_on_the_first_of_them_to_end(store: Store) -> None:
    """Any of them: a progress event on one does not end the wait, the end of another
    does; the parked future is gone from every id once it answers."""
    a, b, c = await submit(store), await submit(store), await submit(store)
    await claim_one(store)  # a is running
    waiter = asyncio.create_task(wait_final_many(store, [a.id, b.id, c.id], LONG_S))
    await _parked_on(store, c.id)
    await store.append_events(a.id, [NewEvent("progress", {"pct": 5})])
    await settle()
    assert not waiter.done()
    await store.cancel_queued(c.id)
    got = await asyncio.wait_for(waiter, GUARD_S)
    assert [t.state if t else None for t in got] == [
        TaskState.RUNNING, TaskState.QUEUED, TaskState.CANCELLED]
    assert not any(store.notifier.waited_on(t) for t in (a.id, b.id, c.id))


async def test_wait_many_answers_every_task_final_by_then(store: Store) -> None:
    """A batch that ends together is answered whole, not just its first task."""
    a, b, c = await submit(store), await submit(store), await submit(store)
    await store.claim("p", "gpu", 2, "n1", "gpu:0")  # a and b
    waiter = asyncio.create_task(wait_final_many(store, [a.id, b.id, c.id], LONG_S))
    await _parked_on(store, a.id)
    await store.finish_many([Finish(a.id, 1, TaskState.SUCCEEDED, output="a"),
                             Finish(b.id, 1, TaskState.FAILED, error={"code": "x"})])
    got = await asyncio.wait_for(waiter, GUARD_S)
    assert [t.state if t else None for t in got] == [
        TaskState.SUCCEEDED, TaskState.FAILED, TaskState.QUEUED]


async def test_wait_many_every_waits_for_all_of_them(store: Store) -> None:
    a, b = await submit(store), await submit(store)
    waiter = asyncio.create_task(wait_final_many(store, [a.id, b.id], LONG_S, every=True))
    await _parked_on(store, b.id)
    await store.cancel_queued(a.id)
    await _parked_on(store, b.id)  # the first end did not answer: it waits on b alone
    assert not waiter.done() and not store.notifier.waited_on(a.id)
    await store.cancel_queued(b.id)
    got = await asyncio.wait_for(waiter, GUARD_S)
    assert all(t is not None and t.state is TaskState.CANCELLED for t in got)


async def test_wait_many_returns_them_as_they_stand_after_the_timeout(
        store: Store, loop_clock: LoopClock) -> None:
    a, b = await submit(store), await submit(store)
    waiter = asyncio.create_task(wait_final_many(store, [a.id, b.id], 60))
    await _parked_on(store, a.id)
    await loop_clock.advance(50)
    assert not waiter.done()
    await loop_clock.advance(20)
    got = await asyncio.wait_for(waiter, GUARD_S)
    assert [t.state if t else None for t in got] == [TaskState.QUEUED, TaskState.QUEUED]
    assert not store.notifier.waited_on(a.id) and not store.notifier.waited_on(b.id)
