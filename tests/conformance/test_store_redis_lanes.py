"""What only the Redis store has for lanes: a move or a requeue to another lane wakes the other
nodes' schedulers for the new lane, running counts span every node, the per-queue running sets
empty as tasks stop running, and each lane method is one round trip."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from redis.asyncio import Redis
from tests.conformance.test_store import claim_one, submit
from tests.conftest import eventually

from gpulane.model import TaskState
from gpulane.store import LaneStats, NewEvent, Store
from gpulane.store import redis_scripts as lua
from gpulane.store import redis_scripts_lanes as lanes
from gpulane.store.redis import RedisStore


@pytest.fixture
def store(redis_store: RedisStore) -> RedisStore:
    """This module's tests are the Redis store's own (conftest.py's store is per backend)."""
    return redis_store


async def _true(value: bool) -> bool:
    return value


async def _heads(store: Store, lanes: list[tuple[str, str]], want: list[str]) -> bool:
    return [h.task_id for h in await store.queue_heads(lanes)] == want


async def test_a_move_or_a_lane_requeue_wakes_the_other_nodes_for_the_new_lane(
        two: tuple[Store, Store]) -> None:
    a, b = two
    heard = {"b": 0}
    b.on_work = lambda: heard.__setitem__("b", heard["b"] + 1)
    cpu = [("p", "cpu")]
    assert await b.queue_heads(cpu) == []  # B remembers the CPU queue as empty
    moved = await submit(a)
    await eventually(lambda: _true(heard["b"] == 1))  # the GPU queue got work
    await a.move_queued([moved.id], "cpu", "gpu_busy", [NewEvent("fallback", {})])
    await eventually(lambda: _true(heard["b"] == 2))
    await eventually(lambda: _heads(b, cpu, [moved.id]))

    oom = await submit(a, "q")
    await eventually(lambda: _true(heard["b"] == 3))
    claimed = await claim_one(a, "q")
    assert await b.queue_heads([("q", "cpu")]) == []
    await a.requeue(oom.id, claimed.token, None, spent=False, lane="cpu",
                    fallback_reason="gpu_oom")
    await eventually(lambda: _true(heard["b"] == 4))
    await eventually(lambda: _heads(b, [("q", "cpu")], [oom.id]))


async def test_running_counts_every_nodes_attempts(two: tuple[Store, Store]) -> None:
    a, b = two
    for i in range(4):
        await submit(a, input=i)
    await a.claim("p", "gpu", 1, "node-a", "gpu:0")
    [on_b] = await b.claim("p", "gpu", 1, "node-b", "gpu:0")
    for store in (a, b):
        assert (await store.lane_stats())[("p", "gpu")].queued == 2
        assert (await store.lane_stats())[("p", "gpu")].running == 2
    await b.reap_node("node-b")
    assert (await a.lane_stats())[("p", "gpu")].running == 1
    assert (await a.get(on_b.id)).state is TaskState.QUEUED  # type: ignore[union-attr]


async def test_the_running_sets_empty_as_tasks_stop_running(store: RedisStore,
                                                            raw: Redis) -> None:
    tasks = [await submit(store, input=i) for i in range(4)]
    claimed = {t.id: t for t in await store.claim("p", "gpu", 4, "n1", "gpu:0")}
    assert await raw.scard("gl:r:gpu:p") == 4
    await store.finish(tasks[0].id, claimed[tasks[0].id].token, TaskState.SUCCEEDED)
    await store.requeue(tasks[1].id, claimed[tasks[1].id].token, None, lane="cpu",
                        fallback_reason="gpu_oom")
    await store.recover("n1")  # the other two
    assert await raw.scard("gl:r:gpu:p") == 0
    assert await raw.sismember("gl:rlanes", "gpu:p")
    assert (await store.lane_stats())[("p", "gpu")] == LaneStats(2, 0, tasks[2].created_at)
    assert not await raw.sismember("gl:rlanes", "gpu:p")  # found empty: dropped
    await store.claim("p", "cpu", 1, "n2", "cpu")
    assert await raw.smembers("gl:rlanes") == {b"cpu:p"}
    await store.reap(time.time() + 1, max_attempts={"p": 1})
    assert await raw.scard("gl:r:cpu:p") == 0


async def test_the_lane_counters_are_set_from_the_queues_where_they_differ(
        redis_url: str, raw: Redis) -> None:
    """A store made by an older release kept no per-lane counters: the first store of this
    one to open sets them from the queues, as every lane_stats call does."""
    old = RedisStore(redis_url)
    await old.open()
    try:
        await submit(old, input=1)
        await submit(old, input=2, lane="cpu")
        await raw.hdel("gl:stats", "l:gpu:p", "l:cpu:p")
        assert (await old.queue_stats())["p"].lanes == {}
        await raw.hset("gl:stats", "l:cpu:p", 7)  # wrong, however it came to be
        await old.lane_stats()
        assert (await old.queue_stats())["p"].lanes == {"gpu": 1, "cpu": 1}
        await raw.hdel("gl:stats", "l:gpu:p")
    finally:
        await old.close()
    new = RedisStore(redis_url)
    await new.open()
    try:
        assert (await new.queue_stats())["p"].lanes == {"gpu": 1, "cpu": 1}
    finally:
        await new.close()


async def test_each_lane_method_is_one_round_trip(store: RedisStore,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    task = await submit(store)
    other = await submit(store, input=2)
    claimed = await claim_one(store)
    calls: list[Any] = []
    conn = store._conn  # counting the commands that go over the store's one connection
    for source in (lanes.LANE_STATS, lanes.QUEUED, lanes.MOVE, lua.REQUEUE):
        await conn.call("SCRIPT", "LOAD", source)  # as on a server that ran them before
    real = conn.call

    async def call(*args: Any) -> Any:
        calls.append(args[0])
        return await real(*args)

    monkeypatch.setattr(conn, "call", call)
    steps: list[tuple[Callable[[], Awaitable[object]], str]] = [
        (store.queue_stats, "HGETALL"), (store.lane_stats, "EVALSHA"),
        (lambda: store.queued("p", "gpu", 10), "EVALSHA"),
        (lambda: store.requeue(task.id, claimed.token, None, lane="cpu",
                               fallback_reason="gpu_oom"), "EVALSHA"),
        (lambda: store.move_queued([other.id], "cpu", "gpu_busy", [NewEvent("fallback", {})]),
         "EVALSHA")]
    for step, command in steps:
        calls.clear()
        await step()
        assert calls == [command]
    assert [t.id for t in await store.queued("p", "cpu", 5)] == [task.id, other.id]
