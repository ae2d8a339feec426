"""The Redis store against a misconfigured or full server (a task hash evicted from under its
queue entry, a server out of memory, a wrong password), a store closed under a straggler's
call, and a listing filter that few tasks pass (it must not hold the server)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from redis.asyncio import Redis
from tests.conformance.test_store import claim_one, submit
from tests.conftest import eventually

from gpulane.errors import StoreError, StoreUnavailableError
from gpulane.model import Task, TaskState
from gpulane.store import redis as redis_store
from gpulane.store import redis_scripts as lua
from gpulane.store import wait_final
from gpulane.store.redis import RedisStore


@pytest.fixture
def store(redis_store: RedisStore) -> RedisStore:
    """This module's tests are the Redis store's own (conftest.py's store is per backend)."""
    return redis_store



async def test_a_claim_drops_an_evicted_task_and_claims_the_next(store: RedisStore,
                                                                 raw: Redis) -> None:
    # A Redis with an evicting maxmemory-policy may drop a queued task's hash: the claim used
    # to fail in Lua after its pop, losing the whole popped batch from the queue.
    first, second, third = [await submit(store, input={"n": n}) for n in range(3)]
    await raw.delete(f"gl:t:{first.id}")
    got = await store.claim("p", "gpu", 2, "n1", "gpu:0")
    assert [t.id for t in got] == [second.id, third.id]
    assert (await store.queue_stats())["p"].queued == 0
    assert await raw.zcard("gl:s:queued") == 0


async def test_a_full_redis_is_store_unavailable_naming_maxmemory(store: RedisStore,
                                                                  raw: Redis) -> None:
    await raw.config_set("maxmemory-policy", "noeviction")
    await raw.config_set("maxmemory", "1")
    try:
        with pytest.raises(StoreUnavailableError, match="maxmemory"):
            await submit(store)
    finally:
        await raw.config_set("maxmemory", "0")
    await submit(store)  # writes again once memory is freed


async def test_a_refused_login_closes_its_connection(redis_url: str, raw: Redis) -> None:
    async def clients() -> int:
        return len(await raw.client_list())

    before = await clients()
    bad = RedisStore(redis_url.replace("redis://", "redis://:wrong@"))
    try:
        for _ in range(5):
            with pytest.raises(StoreError, match="AUTH"):
                await bad.get("0" * 24)
        async def back_to_before() -> bool:
            return await clients() == before
        await eventually(back_to_before)
    finally:
        await bad.close()


async def test_a_call_after_close_opens_no_connection(redis_url: str, raw: Redis) -> None:
    # A straggler's call after the store closed used to connect again, and nothing closed
    # that connection.
    s = RedisStore(redis_url)
    await s.open()
    before = len(await raw.client_list())
    await s.close()
    with pytest.raises(StoreUnavailableError, match="closed"):
        await s.get("0" * 24)

    async def fewer() -> bool:
        return len(await raw.client_list()) < before
    await eventually(fewer)
    await s.open()  # opened again, it calls again
    assert await s.get("0" * 24) is None
    await s.close()


async def test_a_listing_filter_few_pass_scans_in_bounded_steps(
        store: RedisStore, monkeypatch: pytest.MonkeyPatch) -> None:
    # state=succeeded has no index of its own: the script filters every task's listing entry,
    # and used to scan all of them in one call (100,000 queued tasks held Redis 0.8 s).
    monkeypatch.setattr(redis_store, "PAGE_SCAN_MAX", 10)
    done = []
    for _ in range(2):
        await submit(store)
        claimed = await claim_one(store)
        done.append(await store.finish(claimed.id, claimed.token, TaskState.SUCCEEDED))
    for n in range(35):
        await submit(store, input={"n": n})
    found: list[Task] = []
    calls, cursor = 0, None
    while True:
        page, cursor = await store.list_tasks(state=TaskState.SUCCEEDED, limit=5, cursor=cursor)
        calls += 1
        found += page
        if cursor is None:
            break
    assert [t.id for t in found] == [t.id for t in reversed(done)]
    assert calls >= 4  # 37 entries looked at 10 per call


async def test_a_backlog_is_aged_in_bounded_calls(store: RedisStore,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    # Ageing walked every queued task in one script (100,000 held Redis 0.4-0.65 s).
    monkeypatch.setattr(redis_store, "AGE_BATCH_TASKS", 3)
    tasks = [await submit(store, lane=lane, priority=10, input={"n": n})
             for n in range(5) for lane in ("gpu", "cpu")]
    at = max(t.created_at for t in tasks) + 5 * 60.0
    calls = 0
    run = store._run

    async def counted(script: str, *args: Any, **kw: Any) -> Any:
        nonlocal calls
        calls += script == lua.AGE
        return await run(script, *args, **kw)
    monkeypatch.setattr(store, "_run", counted)
    assert await store.age_queued(60.0, at=at) == len(tasks)
    assert calls >= 4  # 10 tasks, 3 per call
    heads = await store.queue_heads([("p", "gpu"), ("p", "cpu")])
    assert [h.priority for h in heads] == [15, 15]
    assert await store.age_queued(60.0, at=at) == 0  # nothing left to lift


async def test_a_malformed_wake_up_message_ends_no_subscription(
        redis_url: str, raw: Redis) -> None:
    # An exception out of the subscriber's read callback closed its connection: the wake-ups
    # sent until it subscribed again were lost.
    a, b = RedisStore(redis_url), RedisStore(redis_url)
    await a.open()
    await b.open()
    try:
        heard = []
        a.on_work = lambda: heard.append(1)
        subscribed = a._wakeups._transport
        await raw.publish("gl:ch", b"w\tstray\t\xff\xfe not utf-8")
        await submit(b)

        async def woken() -> bool:
            return bool(heard)
        await eventually(woken)
        assert a._wakeups._transport is subscribed
    finally:
        await a.close()
        await b.close()


async def test_a_result_waiter_hears_of_an_end_announced_while_its_channel_was_down(
        redis_url: str, raw: Redis) -> None:
    a, b = RedisStore(redis_url), RedisStore(redis_url)
    await a.open()
    await b.open()
    try:
        task = await submit(b)
        [claimed] = await b.claim("p", "gpu", 1, "node-b", "gpu:0")
        waiter = asyncio.create_task(wait_final(a, task.id, timeout=60))

        async def parked() -> bool:
            return a.notifier.waited_on(task.id)
        await eventually(parked)
        # A's subscription is cut: B's "ended" message reaches nobody on A.
        await raw.client_kill_filter(_type="pubsub")
        await b.finish(task.id, claimed.token, TaskState.SUCCEEDED, output="done")
        got = await asyncio.wait_for(waiter, 10)  # a guard; it used to wait out its 60 s
        assert got is not None and got.state is TaskState.SUCCEEDED
    finally:
        await a.close()
        await b.close()


async def test_a_read_only_replica_is_store_unavailable(store: RedisStore, raw: Redis) -> None:
    # A failover under way leaves the nodes on a replica for a while: writes there are
    # refused with READONLY, which was a 500.
    await raw.replicaof("127.0.0.1", 1)  # nothing listens there: it stays a replica
    try:
        with pytest.raises(StoreUnavailableError, match="READONLY"):
            await submit(store)
    finally:
        await raw.replicaof("NO", "ONE")
    await submit(store)


async def test_a_redis_busy_with_a_long_script_is_store_unavailable_to_followers_too(
        store: RedisStore, raw: Redis, redis_url: str) -> None:
    task = await submit(store)
    await raw.config_set("busy-reply-threshold", "10")
    busy = Redis.from_url(redis_url)
    async def loop_forever() -> None:
        await busy.eval("while true do end", 0)  # until SCRIPT KILL
    looping = asyncio.create_task(loop_forever())
    try:
        async def refused() -> bool:
            try:
                await store.get(task.id)
            except StoreUnavailableError:
                return True
            return False
        await eventually(refused)
        with pytest.raises(StoreUnavailableError, match="BUSY"):
            await store._tails.read(task.id, 0, 10)  # a follower's read: was a 500
    finally:
        killer = Redis.from_url(redis_url)
        await killer.script_kill()
        await killer.aclose()
        await asyncio.gather(looping, return_exceptions=True)
        await busy.aclose()
        await raw.config_set("busy-reply-threshold", "5000")
