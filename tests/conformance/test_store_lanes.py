"""What every Store backend must do for fallbacks between lanes: put an attempt back in another
lane's queue, list a queue in claim order, move queued tasks to another lane keeping their
place, and count each (preset, lane)'s queued and running tasks and its oldest wait, exactly,
whatever path a task takes (backends: see conftest.py)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import pytest
from tests.conformance.test_store import claim_one, spec, states, submit

from gpulane.errors import StaleTokenError
from gpulane.model import DeviceWish, Task, TaskState
from gpulane.store import LaneStats, NewEvent, QueuedTask, Store

if TYPE_CHECKING:
    from tests.conformance.conftest import Backend

FALLBACK = NewEvent("fallback", {"reason": "gpu_busy", "from": "gpu", "to": "cpu"})
"""The event a mover hands move_queued."""


async def lanes(store: Store, preset: str = "p") -> dict[str, int]:
    stats = await store.queue_stats()
    return dict(stats[preset].lanes) if preset in stats else {}


async def counts(store: Store) -> dict[tuple[str, str], tuple[int, int]]:
    """lane_stats as (queued, running), the queues with neither left out."""
    return {k: (s.queued, s.running) for k, s in (await store.lane_stats()).items()
            if s.queued or s.running}


def ids(tasks: Sequence[Task | QueuedTask]) -> list[str]:
    return [t.id for t in tasks]


# -- requeue to another lane ------------------------------------------------------------------


@pytest.mark.parametrize("spent", [True, False])
async def test_requeue_to_another_lane_queues_it_there_with_its_reason(
        store: Store, spent: bool) -> None:
    task = await submit(store, priority=70)
    claimed = await claim_one(store)
    err = {"code": "oom", "kind": "oom", "message": "CUDA out of memory"}
    back = await store.requeue(task.id, claimed.token, err, [NewEvent("log", {"line": "oom"})],
                               spent=spent, lane="cpu", fallback_reason="gpu_oom")
    assert back.state is TaskState.QUEUED and back.lane == "cpu"
    assert back.fallback_reason == "gpu_oom" and back.placement is None
    assert back.attempts == (1 if spent else 0)
    assert await store.get(task.id) == back
    assert await lanes(store) == {"cpu": 1}
    assert await store.queued_count() == 1
    assert await store.claim("p", "gpu", 5, "n1", "gpu:0") == []  # gone from the GPU queue
    events = await store.events(task.id)
    assert [e.type for e in events[2:]] == ["log", "state"]
    assert events[-1].data["state"] == "queued"
    assert events[-1].data["lane"] == "cpu" and events[-1].data["fallback_reason"] == "gpu_oom"

    with pytest.raises(StaleTokenError):  # the GPU attempt is fenced off
        await store.finish(task.id, claimed.token, TaskState.SUCCEEDED, output="late")
    again = await claim_one(store, lane="cpu", device="cpu")
    assert again.id == task.id and again.token == claimed.token + 1
    assert again.attempts == (2 if spent else 1) and again.fallback_reason == "gpu_oom"
    assert again.placement is not None and again.placement.device == "cpu"
    with pytest.raises(StaleTokenError):
        await store.requeue(task.id, claimed.token, None, lane="gpu")
    assert await lanes(store) == {}
    assert await states(store, task.id) == ["queued", "running", "queued", "running"]


async def test_requeue_without_a_lane_keeps_its_lane_and_reason(store: Store) -> None:
    task = await submit(store, lane="cpu", fallback_reason="no_gpu")
    claimed = await claim_one(store, lane="cpu", device="cpu")
    back = await store.requeue(task.id, claimed.token, None)
    assert back.lane == "cpu" and back.fallback_reason == "no_gpu"
    assert "lane" not in (await store.events(task.id))[-1].data
    assert await lanes(store) == {"cpu": 1}


# -- a queue in claim order -------------------------------------------------------------------


async def test_queued_lists_a_queue_in_claim_order(store: Store) -> None:
    low = await submit(store, priority=40, input=1)
    high = await submit(store, priority=80, input=2)
    mid = await submit(store, priority=40, input=3)
    await submit(store, priority=99, lane="cpu")  # another lane
    await submit(store, "q", priority=99)  # another preset
    running = await submit(store, priority=90)
    await claim_one(store)  # running: the highest, so claimed first
    assert ids(await store.queued("p", "gpu", 10)) == [high.id, low.id, mid.id]
    assert ids(await store.queued("p", "gpu", 2)) == [high.id, low.id]
    assert running.id not in ids(await store.queued("p", "gpu", 10))
    # What a mover weighs, and not the input (never read nor decoded for a scan).
    assert await store.queued("p", "gpu", 1) == [
        QueuedTask(high.id, DeviceWish.AUTO, high.created_at)]
    strict = await submit(store, priority=45, device_wish=DeviceWish.GPU)
    assert (await store.queued("p", "gpu", 10))[1] == QueuedTask(
        strict.id, DeviceWish.GPU, strict.created_at)
    await store.cancel_queued(strict.id)
    assert await store.queued("p", "none", 5) == [] and await store.queued("z", "gpu", 5) == []

    # Ageing lifts every waiting task to 100: then the oldest goes first, as claim takes it.
    await store.age_queued(1.0, at=time.time() + 1000)
    order = ids(await store.queued("p", "gpu", 10))
    assert order == [low.id, high.id, mid.id]
    assert ids(await store.claim("p", "gpu", 3, "n1", "gpu:0")) == order


# -- moving queued tasks to another lane ------------------------------------------------------


async def test_move_queued_moves_only_tasks_still_queued_in_another_lane(store: Store) -> None:
    first = await submit(store, priority=50, input=1)
    urgent = await submit(store, priority=70, input=2)
    there = await submit(store, priority=60, lane="cpu", input=3)  # already in the CPU lane
    running = await submit(store, priority=99, input=4)
    claimed = await claim_one(store)
    assert claimed.id == running.id
    done = await submit(store, "q", input=5)
    [done_claim] = await store.claim("q", "gpu", 1, "n1", "gpu:0")
    await store.finish(done.id, done_claim.token, TaskState.SUCCEEDED)
    before = {t.id: len(await store.events(t.id)) for t in (there, running, done)}

    moved = await store.move_queued(
        [first.id, urgent.id, there.id, running.id, done.id, "0" * 24], "cpu", "gpu_busy",
        [FALLBACK])
    assert sorted(ids(moved)) == sorted([first.id, urgent.id])
    for task in moved:
        assert task.state is TaskState.QUEUED and task.lane == "cpu"
        assert task.fallback_reason == "gpu_busy" and task.attempts == 0
        assert await store.get(task.id) == task
        events = await store.events(task.id)
        assert [e.type for e in events] == ["state", "fallback"]  # that event and no other
        assert events[-1].data == FALLBACK.data
    for t in (there, running, done):  # skipped: nothing written
        assert len(await store.events(t.id)) == before[t.id]
    stood = await store.get(running.id)
    assert stood is not None and stood.state is TaskState.RUNNING and stood.lane == "gpu"
    assert (await store.get(there.id)).fallback_reason is None  # type: ignore[union-attr]

    # Their place by priority is kept among the tasks the lane had.
    assert ids(await store.queued("p", "cpu", 10)) == [urgent.id, there.id, first.id]
    assert await store.queued("p", "gpu", 10) == []
    assert await lanes(store) == {"cpu": 3}
    assert (await store.queue_stats())["p"].queued == 3
    assert await store.move_queued([first.id, urgent.id], "cpu", "gpu_busy", [FALLBACK]) == []
    assert await store.move_queued([], "cpu", "gpu_busy") == []
    with pytest.raises(StaleTokenError):  # the running one keeps its attempt, fenced as ever
        await store.finish(running.id, claimed.token + 1, TaskState.SUCCEEDED)
    await store.finish(running.id, claimed.token, TaskState.SUCCEEDED)
    assert ids(await store.claim("p", "cpu", 3, "n1", "cpu")) == [urgent.id, there.id, first.id]


async def test_move_queued_hands_a_backlog_over_in_the_order_asked(store: Store) -> None:
    tasks = [t for t, _ in await store.submit_many([spec(input=i) for i in range(1200)])]
    ask = [t.id for t in reversed(tasks)]
    moved = await store.move_queued([*ask, ask[0]], "cpu", "gpu_busy", [FALLBACK])
    assert ids(moved) == ask  # each once, though named twice
    assert all(t.lane == "cpu" and t.fallback_reason == "gpu_busy" for t in moved)
    assert await lanes(store) == {"cpu": 1200}
    assert ids(await store.queued("p", "cpu", 1200)) == [t.id for t in tasks]
    for task in (tasks[0], tasks[600], tasks[-1]):
        assert [e.type for e in await store.events(task.id)] == ["state", "fallback"]


async def test_move_queued_keeps_an_aged_tasks_place(store: Store) -> None:
    old = await submit(store, priority=10, input=1)
    await store.age_queued(1.0, at=old.created_at + 80)  # lifted to 90
    fresh = await submit(store, priority=50, lane="cpu", input=2)
    await store.move_queued([old.id], "cpu", "gpu_unavailable")
    assert ids(await store.queued("p", "cpu", 5)) == [old.id, fresh.id]
    [head] = await store.queue_heads([("p", "cpu")])
    assert head.task_id == old.id and head.priority == 90
    assert await store.queue_heads([("p", "gpu")]) == []


async def test_move_queued_wakes_the_tasks_waiters(store: Store) -> None:
    task = await submit(store)
    seen = store.notifier.version(task.id)
    [moved] = await store.move_queued([task.id], "cpu", "gpu_busy", [FALLBACK])
    assert store.notifier.version(task.id) != seen
    assert moved.lane == "cpu"


# -- per-lane counts --------------------------------------------------------------------------


async def test_lane_stats_count_queued_and_running_and_the_oldest_wait(store: Store) -> None:
    assert await counts(store) == {}
    old = await submit(store, priority=10, input=1)  # the longest waiting, never the head
    head = await submit(store, priority=90, input=2)
    mid = await submit(store, priority=50, input=3)
    cpu = await submit(store, lane="cpu", input=4)
    other = await submit(store, "q", input=5)
    stats = await store.lane_stats()
    assert stats[("p", "gpu")] == LaneStats(3, 0, old.created_at)
    assert stats[("p", "cpu")] == LaneStats(1, 0, cpu.created_at)
    assert stats[("q", "gpu")] == LaneStats(1, 0, other.created_at)

    claimed = await claim_one(store)  # the head: the oldest still waits
    assert claimed.id == head.id
    stats = await store.lane_stats()
    assert stats[("p", "gpu")] == LaneStats(2, 1, old.created_at)

    [got] = await store.claim("p", "gpu", 1, "n2", "gpu:1")  # mid: another node
    assert got.id == mid.id
    assert (await store.lane_stats())[("p", "gpu")] == LaneStats(1, 2, old.created_at)
    await store.finish(head.id, claimed.token, TaskState.SUCCEEDED)
    await store.requeue(mid.id, got.token, None, lane="cpu", fallback_reason="gpu_oom")
    assert await counts(store) == {("p", "gpu"): (1, 0), ("p", "cpu"): (2, 0),
                                   ("q", "gpu"): (1, 0)}
    await store.move_queued([old.id], "cpu", "gpu_busy")
    stats = await store.lane_stats()
    assert stats[("p", "cpu")] == LaneStats(3, 0, old.created_at)
    assert ("p", "gpu") not in stats or stats[("p", "gpu")] == LaneStats(0, 0, None)
    await store.claim("p", "cpu", 3, "n1", "cpu")
    stats = await store.lane_stats()
    assert stats[("p", "cpu")] == LaneStats(0, 3, None)


async def test_lane_and_queue_counts_stay_exact_on_every_path(store: Store) -> None:
    """Each write that moves a task between states, then both counts against the truth."""
    a = await submit(store, input=1)
    b = await submit(store, input=2)
    c = await submit(store, lane="cpu", input=3)
    assert await lanes(store) == {"gpu": 2, "cpu": 1}
    ta = await claim_one(store)  # a
    assert await counts(store) == {("p", "gpu"): (1, 1), ("p", "cpu"): (1, 0)}
    await store.requeue(a.id, ta.token, None, lane="cpu", fallback_reason="device_lost")
    assert await lanes(store) == {"gpu": 1, "cpu": 2}
    assert await counts(store) == {("p", "gpu"): (1, 0), ("p", "cpu"): (2, 0)}
    await store.move_queued([b.id], "cpu", "gpu_busy")
    assert await lanes(store) == {"cpu": 3}
    tasks = await store.claim("p", "cpu", 3, "n1", "cpu")
    assert await lanes(store) == {} and await counts(store) == {("p", "cpu"): (0, 3)}
    by_id = {t.id: t for t in tasks}
    await store.finish(c.id, by_id[c.id].token, TaskState.FAILED, error={"message": "x"})
    assert await counts(store) == {("p", "cpu"): (0, 2)}
    await store.retry_failed(c.id)
    assert await lanes(store) == {"cpu": 1}
    assert await counts(store) == {("p", "cpu"): (1, 2)}
    await store.cancel_queued(c.id)
    assert await lanes(store) == {}
    await store.reap_node("n1")  # a and b: spent, requeued in their (new) lane
    assert await lanes(store) == {"cpu": 2} and await counts(store) == {("p", "cpu"): (2, 0)}
    [t1, t2] = await store.claim("p", "cpu", 2, "n2", "cpu")
    await store.reap(time.time() + 1, max_attempts={"p": 2})  # both past their last attempt
    assert await lanes(store) == {} and await counts(store) == {}
    await store.retry_failed(t1.id)
    await store.claim("p", "cpu", 1, "n3", "cpu")
    assert await counts(store) == {("p", "cpu"): (0, 1)}
    assert await store.recover("n3") == 1
    assert await lanes(store) == {"cpu": 1} and await counts(store) == {("p", "cpu"): (1, 0)}
    await store.purge(time.time() + 1)  # drops the ended (t2), touches nothing queued
    assert await store.get(t2.id) is None
    assert await lanes(store) == {"cpu": 1} and await counts(store) == {("p", "cpu"): (1, 0)}
    assert (await store.queue_stats())["p"].queued == 1 and await store.queued_count() == 1


async def test_lane_counts_survive_a_reopen(durable_backend: Backend) -> None:
    first = durable_backend.make()
    await first.open()
    try:
        for i in range(3):
            await submit(first, input=i)
        cpu = await submit(first, lane="cpu")
        moved = await first.queued("p", "gpu", 1)
        await first.move_queued(ids(moved), "cpu", "gpu_busy")
        await first.claim("p", "gpu", 1, "n1", "gpu:0")
    finally:
        await first.close()
    second = durable_backend.make()
    await second.open()
    try:
        assert await lanes(second) == {"gpu": 1, "cpu": 2}
        stats = await second.lane_stats()
        assert stats[("p", "gpu")].running == 1
        assert stats[("p", "cpu")] == LaneStats(2, 0, moved[0].created_at)
        assert moved[0].created_at < cpu.created_at
    finally:
        await second.close()

