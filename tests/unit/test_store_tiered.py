"""The online lane's tiered store (store/tiered.py, memory.py, sqlite_adopt.py): routing by
``durable``, spills on failure, on the window and on close, the cap, keys across tiers, and
one notifier for both tiers. A hand-moved clock drives the windows."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gpulane.errors import ConflictError, StaleTokenError
from gpulane.model import TaskSpec, TaskState
from gpulane.store import NewEvent, open_store, wait_final
from gpulane.store.memory import MemoryStore
from gpulane.store.sqlite import SqliteStore
from gpulane.store.sqlite_adopt import adopt
from gpulane.store.tiered import SPILL_BATCH, OnlineLimits, TieredStore
from tests.unit.conftest import Clock


def make(path: str | Path = ":memory:", *, spill_after_s: float = 2.0, keep_s: float = 300.0,
         max_tasks: int = 100) -> tuple[TieredStore, Clock]:
    clock = Clock()
    sqlite = SqliteStore(path)
    store = TieredStore(sqlite, lambda held: adopt(sqlite, held),
                        OnlineLimits(spill_after_s, keep_s, max_tasks), MemoryStore(clock))
    return store, clock


@pytest.fixture
async def tiered() -> AsyncIterator[tuple[TieredStore, Clock]]:
    store, clock = make()
    await store.open()
    try:
        yield store, clock
    finally:
        await store.close()


@pytest.fixture
def ordered_ids(monkeypatch: pytest.MonkeyPatch) -> None:
    """Memory ids one millisecond apart (ids sort by creation time; within one millisecond
    the random part decides, and these tests compare ages)."""
    made = iter(range(1 << 30))
    monkeypatch.setattr("gpulane.store.memory.new_task_id",
                        lambda: f"{10**12 + next(made):012x}{0:012x}")


def online(inp: object = None, **kw: object) -> TaskSpec:
    return TaskSpec(preset="p", input=inp, durable=False, **kw)  # type: ignore[arg-type]


async def test_online_specs_stay_in_memory_and_durable_ones_go_to_disk(
        tiered: tuple[TieredStore, Clock]) -> None:
    store, _ = tiered
    (a, created), (b, _) = await store.submit_many([online(1), TaskSpec("p", 2)])
    assert created and a.id in store.memory and await store.durable.get(a.id) is None
    assert b.id not in store.memory and (await store.durable.get(b.id)) is not None
    assert (await store.get(a.id)) is a and (await store.get(b.id)) is not None
    assert [t and t.id for t in await store.get_many([a.id, "nope", b.id])] == [a.id, None,
                                                                                 b.id]
    assert await store.queued_count() == 2
    assert (await store.queue_stats())["p"].queued == 2
    assert (await store.lane_stats())[("p", "gpu")].queued == 2


async def test_a_succeeded_online_task_keeps_its_events_and_result_in_memory(
        tiered: tuple[TieredStore, Clock]) -> None:
    store, _ = tiered
    task, _ = await store.submit(online({"x": 1}))
    (claimed,) = await store.claim("p", "gpu", 10, "n1", "gpu:0")
    assert claimed.id == task.id and claimed.state is TaskState.RUNNING and claimed.token == 1
    await store.append_events(task.id, [NewEvent("progress", {"done": 1})])
    done = await store.finish(task.id, 1, TaskState.SUCCEEDED, output={"ok": True})
    assert done.output == {"ok": True} and done.state is TaskState.SUCCEEDED
    events = await store.events(task.id)
    assert [(e.seq, e.type) for e in events] == [(1, "state"), (2, "state"), (3, "progress"),
                                                  (4, "state")]
    assert [e.seq for e in await store.events(task.id, after=2, limit=1)] == [3]
    assert await store.durable.get(task.id) is None  # never written
    with pytest.raises(StaleTokenError):
        await store.finish(task.id, 1, TaskState.FAILED)
    assert (await store.lane_stats()) == {}


async def test_a_failed_online_task_is_written_with_its_events(
        tiered: tuple[TieredStore, Clock]) -> None:
    store, _ = tiered
    task, _ = await store.submit(online("in", idempotency_key="k", body_hash="h"))
    await store.claim("p", "gpu", 1, "n1", "gpu:0")
    error = {"code": "bad_input", "kind": "bad_input", "message": "no"}
    await store.finish(task.id, 1, TaskState.FAILED, error=error,
                       events=[NewEvent("text", {"content": "partial"})])
    assert task.id not in store.memory and store.spilled["failed"] == 1
    kept = await store.durable.get(task.id)
    assert kept is not None and kept.state is TaskState.FAILED and kept.error == error
    assert kept.input == "in" and kept.attempts == 1 and kept.token == 1
    assert kept.placement is not None and kept.placement.device == "gpu:0"
    assert [e.type for e in await store.durable.events(task.id)] == ["state", "state", "text",
                                                                     "state"]
    # Its key moved with it; a retry of the dead letter works as a durable one's does.
    again, created = await store.submit(online("in", idempotency_key="k", body_hash="h"))
    assert not created and again.id == task.id
    retried = await store.retry_failed(task.id)
    assert retried is not None and retried.state is TaskState.QUEUED


async def test_a_queued_task_past_the_window_moves_to_disk_and_is_claimed_first(
        tiered: tuple[TieredStore, Clock], ordered_ids: None) -> None:
    store, clock = tiered
    old, _ = await store.submit(online("old"))
    clock.now += 2.5
    new, _ = await store.submit(online("new"))
    store.upkeep()
    assert old.id not in store.memory and new.id in store.memory
    assert store.spilled["window"] == 1
    spilled = await store.durable.get(old.id)
    assert spilled is not None and spilled.state is TaskState.QUEUED
    assert await store.queued_count() == 2
    (head,) = await store.queue_heads([("p", "gpu")])
    assert head.task_id == old.id  # older, same priority: ahead of the memory one
    first = await store.claim("p", "gpu", 1, "n1", "gpu:0")
    assert [t.id for t in first] == [old.id]
    both = await store.claim("p", "gpu", 5, "n1", "gpu:0")
    assert [t.id for t in both] == [new.id]


async def test_priority_across_tiers(tiered: tuple[TieredStore, Clock],
                                     ordered_ids: None) -> None:
    store, clock = tiered
    low, _ = await store.submit(online("low", priority=10))
    clock.now += 3
    store.upkeep()  # low now on disk
    high, _ = await store.submit(online("high", priority=90))
    got = await store.claim("p", "gpu", 2, "n1", "gpu:0")
    assert [t.id for t in got] == [high.id, low.id]


async def test_a_running_task_past_the_window_finishes_on_disk_fenced_by_its_token(
        tiered: tuple[TieredStore, Clock]) -> None:
    store, clock = tiered
    task, _ = await store.submit(online("x"))
    await store.claim("p", "gpu", 1, "n1", "gpu:0")
    waiter = asyncio.create_task(wait_final(store, task.id, 10))
    await asyncio.sleep(0)
    clock.now += 2.5
    store.upkeep()
    assert task.id not in store.memory
    on_disk = await store.durable.get(task.id)
    assert on_disk is not None and on_disk.state is TaskState.RUNNING and on_disk.token == 1
    assert await store.heartbeat("n1", [(task.id, 1)]) == []
    assert await store.heartbeat("n1", [(task.id, 7)]) == [(task.id, 7)]
    assert "n1" in await store.running_nodes()
    with pytest.raises(StaleTokenError):
        await store.finish(task.id, 2, TaskState.SUCCEEDED)
    await store.append_events(task.id, [NewEvent("progress", {"done": 1})])
    await store.finish(task.id, 1, TaskState.SUCCEEDED, output=5)
    final = await waiter  # woken through the one notifier both tiers share
    assert final is not None and final.state is TaskState.SUCCEEDED and final.output == 5
    assert [e.seq for e in await store.events(task.id)] == [1, 2, 3, 4]


async def test_heartbeat_splits_tiers(tiered: tuple[TieredStore, Clock]) -> None:
    store, _ = tiered
    mem, _ = await store.submit(online())
    disk, _ = await store.submit(TaskSpec("p", None))
    got = await store.claim("p", "gpu", 2, "n1", "gpu:0")
    assert {t.id for t in got} == {mem.id, disk.id}
    assert await store.heartbeat("n1", [(mem.id, 1), (disk.id, 1)]) == []
    assert sorted(await store.heartbeat("n2", [(mem.id, 1), (disk.id, 1)])) == sorted(
        [(mem.id, 1), (disk.id, 1)])


async def test_results_are_kept_for_keep_s(tiered: tuple[TieredStore, Clock]) -> None:
    store, clock = tiered
    task, _ = await store.submit(online())
    await store.claim("p", "gpu", 1, "n", "cpu")
    await store.finish(task.id, 1, TaskState.SUCCEEDED)
    clock.now += 299
    store.upkeep()
    assert await store.get(task.id) is not None
    clock.now += 2
    store.upkeep()
    assert await store.get(task.id) is None and len(store.memory) == 0


async def test_above_the_cap_online_submits_go_to_disk() -> None:
    store, _ = make(max_tasks=2)
    await store.open()
    try:
        got = await store.submit_many([online(i) for i in range(3)])
        assert [t.id in store.memory for t, _ in got] == [True, True, False]
        assert await store.durable.get(got[2][0].id) is not None
        assert await store.queued_count() == 3
    finally:
        await store.close()


async def test_keys_across_tiers(tiered: tuple[TieredStore, Clock]) -> None:
    store, clock = tiered
    a, created = await store.submit(online(1, idempotency_key="k", body_hash="h1"))
    b, again = await store.submit(online(1, idempotency_key="k", body_hash="h1"))
    assert created and not again and a.id == b.id
    with pytest.raises(ConflictError):
        await store.submit(online(2, idempotency_key="k", body_hash="h2"))
    with pytest.raises(ConflictError):  # a durable submit with an online task's key
        await store.submit(TaskSpec("p", 2, idempotency_key="k", body_hash="h2"))
    pair = await store.submit_many([online(3, idempotency_key="j", body_hash="x"),
                                    online(3, idempotency_key="j", body_hash="x")])
    assert pair[0][0].id == pair[1][0].id and [c for _, c in pair] == [True, False]
    assert (await store.task_for_key("k")) is a
    clock.now += 3
    store.upkeep()  # both spill, keys with them
    c, made = await store.submit(online(1, idempotency_key="k", body_hash="h1"))
    assert not made and c.id == a.id and c.id not in store.memory
    with pytest.raises(ConflictError):
        await store.submit(online(2, idempotency_key="k", body_hash="h2"))
    t = await store.task_for_key("k")
    assert t is not None and t.id == a.id


async def test_a_refused_batch_leaves_nothing(tiered: tuple[TieredStore, Clock]) -> None:
    store, _ = tiered
    await store.submit(TaskSpec("p", 1, idempotency_key="d", body_hash="h"))
    with pytest.raises(ConflictError):
        await store.submit_many([online(9), TaskSpec("p", 2, idempotency_key="d",
                                                     body_hash="other")])
    assert len(store.memory) == 0 and await store.queued_count() == 1


async def test_cancel_retry_requeue_and_move_in_memory(
        tiered: tuple[TieredStore, Clock]) -> None:
    store, _ = tiered
    a, _ = await store.submit(online("a"))
    b, _ = await store.submit(online("b"))
    cancelled = await store.cancel_queued(a.id)
    assert cancelled is not None and cancelled.state is TaskState.CANCELLED
    assert await store.cancel_queued(a.id) is None
    retried = await store.retry_failed(a.id)
    assert retried is not None and retried.state is TaskState.QUEUED
    assert [q.id for q in await store.queued("p", "gpu", 10)] == [b.id, a.id]
    moved = await store.move_queued([b.id, "unknown"], "cpu", "gpu_busy",
                                    [NewEvent("fallback", {"reason": "gpu_busy"})])
    assert [t.id for t in moved] == [b.id] and moved[0].lane == "cpu"
    assert [h.task_id for h in await store.queue_heads([("p", "gpu"), ("p", "cpu")])] == [
        a.id, b.id]
    (run,) = await store.claim("p", "cpu", 5, "n", "cpu")
    back = await store.requeue(run.id, run.token, None, spent=False, lane="gpu",
                               fallback_reason=None)
    assert back.state is TaskState.QUEUED and back.attempts == 0 and back.lane == "gpu"
    assert (await store.queue_stats())["p"].lanes == {"gpu": 2}


async def test_close_writes_everything_and_a_reopened_store_has_it(tmp_path: Path) -> None:
    path = tmp_path / "g.db"
    store, _ = make(path)
    await store.open()
    done, _ = await store.submit(online("d"))
    (run,) = await store.claim("p", "gpu", 1, "n1", "gpu:0")
    await store.finish(run.id, run.token, TaskState.SUCCEEDED, output=1)
    queued, _ = await store.submit(online("q"))
    await store.close()
    assert store.spilled["close"] == 2
    again = open_store(f"sqlite:///{path}")
    await again.open()
    try:
        assert (t := await again.get(queued.id)) is not None and t.state is TaskState.QUEUED
        assert (t := await again.get(done.id)) is not None and t.output == 1
        assert await again.queued_count() == 1
    finally:
        await again.close()


async def test_open_store_builds_the_tier_for_sqlite_only() -> None:
    limits = OnlineLimits(2.0, 300.0, 10)
    assert isinstance(open_store("sqlite://", online=limits), TieredStore)
    assert isinstance(open_store("sqlite://", online=OnlineLimits(2.0, 300.0, 0)), SqliteStore)
    assert isinstance(open_store("sqlite://"), SqliteStore)
    assert not isinstance(open_store("redis://127.0.0.1:1/0", online=limits), TieredStore)


async def test_a_spill_that_fails_leaves_the_task_in_memory_for_the_next_round() -> None:
    clock = Clock()
    sqlite = SqliteStore(":memory:")
    failures = [OSError("disk full")]

    def flaky(held: object) -> None:
        if failures:
            raise failures.pop()
        adopt(sqlite, held)  # type: ignore[arg-type]

    store = TieredStore(sqlite, flaky, OnlineLimits(2.0, 300.0, 10), MemoryStore(clock))
    await store.open()
    try:
        task, _ = await store.submit(online())
        clock.now += 3
        with pytest.raises(OSError):
            store.upkeep()
        assert task.id in store.memory and await sqlite.get(task.id) is None
        store.upkeep()
        assert task.id not in store.memory and await sqlite.get(task.id) is not None
    finally:
        await store.close()


async def test_lane_stats_name_the_oldest_queued_task(tiered: tuple[TieredStore, Clock]) -> None:
    store, _ = tiered
    a, _ = await store.submit(online("a"))
    await store.submit(TaskSpec("q", "other", durable=False))
    await store.submit(online("b"))
    stats = await store.lane_stats()
    assert stats[("p", "gpu")].queued == 2 and stats[("p", "gpu")].oldest_queued_at == a.created_at
    assert stats[("q", "gpu")].queued == 1
    await store.claim("p", "gpu", 1, "n", "gpu:0")
    stats = await store.lane_stats()
    assert (stats[("p", "gpu")].queued, stats[("p", "gpu")].running) == (1, 1)


async def test_a_backlog_past_the_window_is_written_in_batches(
        tiered: tuple[TieredStore, Clock]) -> None:
    store, clock = tiered
    store.limits = OnlineLimits(2.0, 300.0, 10_000)
    await store.submit_many([online(i) for i in range(SPILL_BATCH + 10)])
    clock.now += 3
    assert store.upkeep() is True and len(store.memory) == 10
    assert store.upkeep() is False and len(store.memory) == 0
    assert await store.queued_count() == SPILL_BATCH + 10
    assert len(await store.claim("p", "gpu", SPILL_BATCH + 10, "n", "gpu:0")) == SPILL_BATCH + 10
