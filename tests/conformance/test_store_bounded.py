"""What every Store backend must do to keep its state bounded and its queues countable:
queue counters, dead-letter retry (backends: see conftest.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest
from tests.conformance.test_store import claim_one, spec, states, submit

from gpulane.errors import StaleTokenError
from gpulane.model import TaskState
from gpulane.store import QueueStats, Store

if TYPE_CHECKING:
    from tests.conformance.conftest import Backend

# -- queue counters ---------------------------------------------------------------------------


async def stats(store: Store) -> dict[str, tuple[int, int]]:
    return {p: (s.queued, s.claimed_total) for p, s in (await store.queue_stats()).items()}


async def test_queue_stats_follow_every_write(store: Store) -> None:
    assert await store.queue_stats() == {}
    assert await store.queued_count() == 0
    a1 = await submit(store, "a", input=1)
    await submit(store, "a", input=2, lane="cpu")
    b1 = await submit(store, "b")
    assert await stats(store) == {"a": (2, 0), "b": (1, 0)}
    assert await store.queued_count() == 3

    await claim_one(store, "a")  # a1
    assert await stats(store) == {"a": (1, 1), "b": (1, 0)}
    await store.requeue(a1.id, 1, None)
    assert await stats(store) == {"a": (2, 1), "b": (1, 0)}
    await claim_one(store, "a")
    await store.finish(a1.id, 2, TaskState.FAILED, error={"message": "x"})
    assert await stats(store) == {"a": (1, 2), "b": (1, 0)}
    await store.cancel_queued(b1.id)
    assert await stats(store) == {"a": (1, 2), "b": (0, 0)}
    await store.retry_failed(a1.id)
    assert await stats(store) == {"a": (2, 2), "b": (0, 0)}
    assert await store.queued_count() == 2
    assert isinstance((await store.queue_stats())["a"], QueueStats)


async def test_queue_stats_ignore_writes_that_change_nothing(store: Store) -> None:
    task = await submit(store, key="k", input=1)
    again, created = await store.submit(spec(key="k", input=1))
    assert not created and again.id == task.id
    assert await store.cancel_queued("0" * 24) is None
    with pytest.raises(StaleTokenError):
        await store.requeue(task.id, 7, None)
    assert await store.claim("p", "cpu", 5, "n1", "cpu") == []
    assert await stats(store) == {"p": (1, 0)}


async def test_queue_stats_count_recovered_tasks_and_survive_a_reopen(
        durable_backend: Backend) -> None:
    first = durable_backend.make()
    await first.open()
    try:
        for i in range(3):
            await submit(first, "a", input=i)
        await submit(first, "b")
        await first.claim("a", "gpu", 2, "n1", "gpu:0")
        assert await stats(first) == {"a": (1, 2), "b": (1, 0)}
    finally:
        await first.close()
    second = durable_backend.make()
    await second.open()
    try:
        # Queued tasks are counted from the table on open; claims count from then on.
        assert (await second.queue_stats())["a"].queued == 1
        assert await second.queued_count() == 2
        before = (await second.queue_stats())["a"].claimed_total
        assert await second.recover("n1") == 2
        assert (await second.queue_stats())["a"].queued == 3
        await second.claim("a", "gpu", 3, "n1", "gpu:0")
        after = await second.queue_stats()
        assert after["a"].queued == 0 and after["a"].claimed_total == before + 3
    finally:
        await second.close()


# -- dead letters -----------------------------------------------------------------------------


@pytest.mark.parametrize("end", ["failed", "cancelled"])
async def test_retry_failed_requeues_a_dead_letter_with_fresh_attempts(
        store: Store, end: str) -> None:
    task = await submit(store, priority=60)
    if end == "failed":
        await claim_one(store)
        await store.requeue(task.id, 1, {"message": "try again"})
        await claim_one(store)
        dead = await store.finish(task.id, 2, TaskState.FAILED,
                                  error={"kind": "worker_died", "message": "exit 139"})
        assert dead.attempts == 2
    else:
        await store.cancel_queued(task.id)
    back = await store.retry_failed(task.id)
    assert back is not None and back.id == task.id
    assert back.state is TaskState.QUEUED and back.attempts == 0
    assert back.error is None and back.output is None and back.finished_at is None
    assert back.placement is None
    assert await store.get(task.id) == back
    events = await store.events(task.id)
    assert events[-1].data == {"state": "queued", "reason": f"retried after {end}"}
    [head] = await store.queue_heads([("p", "gpu")])
    assert head.task_id == task.id

    again = await claim_one(store)
    assert again.attempts == 1
    assert again.token == back.token + 1  # fencing tokens keep rising across the retry
    with pytest.raises(StaleTokenError):  # an attempt from before the retry stays fenced off
        await store.finish(task.id, back.token, TaskState.SUCCEEDED)
    done = await store.finish(task.id, again.token, TaskState.SUCCEEDED, output="ok")
    assert done.state is TaskState.SUCCEEDED and done.error is None
    assert (await states(store, task.id))[-3:] == ["queued", "running", "succeeded"]


async def test_retry_failed_refuses_live_succeeded_and_unknown_tasks(store: Store) -> None:
    queued = await submit(store, "q")
    running = await submit(store, "r")
    await claim_one(store, "r")
    done = await submit(store, "d")
    await claim_one(store, "d")
    await store.finish(done.id, 1, TaskState.SUCCEEDED, output=1)
    for task in (queued, running, done):
        before = await store.get(task.id)
        assert await store.retry_failed(task.id) is None
        assert await store.get(task.id) == before
    assert await store.retry_failed("0" * 24) is None
    assert await stats(store) == {"q": (1, 0), "r": (0, 1), "d": (0, 1)}
