"""What only the Redis store has: stores on one server see each other's writes (wake-ups,
followers, new work), the per-task stream cap, TTLs on what ended, pruned listings, and
StoreUnavailableError while the server is away, then recovery by itself."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator

import pytest
from redis.asyncio import Redis
from tests.conformance.test_store import GUARD_S, LONG_S, claim_one, spec, submit
from tests.conftest import RedisProcess, eventually

from gpulane.errors import StoreUnavailableError
from gpulane.model import Event, TaskState
from gpulane.store import NewEvent, Store, open_store, wait_final
from gpulane.store.redis import RedisStore

# -- a fleet's stores see each other ------------------------------------------------------------


async def test_a_task_submitted_on_one_store_is_claimed_and_awaited_across_stores(
        two: tuple[Store, Store]) -> None:
    a, b = two
    task = await submit(a, input={"x": 1}, key="k")
    [claimed] = await b.claim("p", "gpu", 5, "node-b", "gpu:0")
    assert claimed.id == task.id and claimed.input == {"x": 1}
    assert (await a.submit(spec(input={"x": 1}, key="k")))[0].id == task.id
    # A result waiter on A wakes when B finishes: by pub/sub, A has no write of its own.
    waiter = asyncio.create_task(wait_final(a, task.id, timeout=LONG_S))
    await eventually(lambda: _true(a.notifier.waited_on(task.id)))
    await b.finish(task.id, claimed.token, TaskState.SUCCEEDED, output="done")
    got = await asyncio.wait_for(waiter, GUARD_S)
    assert got is not None and got.state is TaskState.SUCCEEDED and got.output == "done"
    assert len(a.notifier) == 0 and len(b.notifier) == 0


async def _true(value: bool) -> bool:
    return value


async def test_follow_on_one_store_streams_what_another_appends_and_resumes(
        two: tuple[Store, Store]) -> None:
    a, b = two
    task = await submit(a)
    [claimed] = await b.claim("p", "gpu", 1, "node-b", "gpu:0")
    got: list[Event] = []
    follower = a.follow(task.id, 0, quiet_s=LONG_S)

    async def drain() -> None:
        async for batch in follower:
            got.extend(batch)

    reader = asyncio.create_task(drain())
    await eventually(lambda: _true(len(got) == 2))  # queued, running: there already
    await b.append_events(task.id, [NewEvent("progress", {"pct": i}) for i in (10, 20)])
    await eventually(lambda: _true(len(got) == 4))
    await b.finish(task.id, claimed.token, TaskState.SUCCEEDED,
                   events=[NewEvent("result", {"ok": True})])
    await asyncio.wait_for(reader, GUARD_S)  # ends after the final state event
    assert [e.seq for e in got] == [1, 2, 3, 4, 5, 6]
    assert [e.type for e in got[2:]] == ["progress", "progress", "result", "state"]
    # Last-Event-ID 3: the rest, from another store, and nothing twice.
    resumed = [e async for batch in b.follow(task.id, 3, quiet_s=LONG_S) for e in batch]
    assert [e.seq for e in resumed] == [4, 5, 6]
    assert [e async for e in a.follow("0" * 24, 0, quiet_s=LONG_S)] == []


async def test_follow_yields_an_empty_batch_when_nothing_lands(
        two: tuple[Store, Store]) -> None:
    a, _ = two
    task = await submit(a)
    follower = a.follow(task.id, 1, quiet_s=0.01)
    assert isinstance(follower, AsyncGenerator)
    assert await asyncio.wait_for(anext(follower), GUARD_S) == []
    await follower.aclose()


async def test_other_stores_writes_wake_on_work_and_own_writes_do_not(
        two: tuple[Store, Store]) -> None:
    a, b = two
    calls = {"a": 0, "b": 0}
    a.on_work = lambda: calls.__setitem__("a", calls["a"] + 1)
    b.on_work = lambda: calls.__setitem__("b", calls["b"] + 1)
    task = await submit(b)
    await eventually(lambda: _true(calls["a"] == 1))
    [claimed] = await a.claim("p", "gpu", 1, "node-a", "gpu:0")
    await a.requeue(task.id, claimed.token, None, spent=False)  # put back: work again
    await eventually(lambda: _true(calls["b"] == 1))
    await submit(a)  # the queue was not empty: nobody needs waking
    await submit(b, "other")
    await eventually(lambda: _true(calls["a"] == 2))
    assert calls["b"] == 1


async def test_a_queue_one_store_saw_empty_shows_the_work_another_queues(
        two: tuple[Store, Store]) -> None:
    """A store skips the queues it found empty (no call to Redis) until work is reported:
    by its own writes at once, by another store's through the channel."""
    a, b = two
    lanes = [("p", "gpu"), ("q", "gpu")]
    assert await a.queue_heads(lanes) == []  # both empty: remembered
    mine = await submit(a, "q")
    assert [h.task_id for h in await a.queue_heads(lanes)] == [mine.id]
    [claimed] = await a.claim("q", "gpu", 5, "n", "gpu:0")  # fewer than asked: now empty
    theirs = await submit(b, "p")
    await eventually(lambda: _heads(a, lanes, [theirs.id]))
    taken, token = await _claim_on(b, "p")
    assert await a.queue_heads(lanes) == []  # both empty again
    await b.requeue(taken, token, None)  # put back by B: A hears of it
    await eventually(lambda: _heads(a, lanes, [theirs.id]))
    await a.finish(mine.id, claimed.token, TaskState.SUCCEEDED)
    assert await a.queue_heads([("q", "gpu")]) == []


async def _heads(store: Store, lanes: list[tuple[str, str]], want: list[str]) -> bool:
    return [h.task_id for h in await store.queue_heads(lanes)] == want


async def _claim_on(store: Store, preset: str) -> tuple[str, int]:
    [task] = await store.claim(preset, "gpu", 1, "n", "gpu:0")
    return task.id, task.token


# -- bounded state ------------------------------------------------------------------------------


async def test_the_stream_keeps_events_max_and_numbering_goes_on(
        redis_url: str, raw: Redis) -> None:
    store = open_store(redis_url, events_max=100)
    await store.open()
    try:
        task = await submit(store)
        await claim_one(store)
        for start in range(0, 250, 50):
            await store.append_events(task.id, [NewEvent("log", {"i": i})
                                                 for i in range(start, start + 50)])
        assert await raw.xlen(f"gl:e:{task.id}") == 100
        events = await store.events(task.id, 0, limit=1000)
        assert [e.seq for e in events] == list(range(153, 253))
        assert [e.seq for e in await store.events(task.id, 250)] == [251, 252]
        [ev] = await store.append_events(task.id, [NewEvent("log", {"i": "last"})])
        assert ev.seq == 253
    finally:
        await store.close()


async def test_what_ended_carries_the_retention_ttl_and_a_retry_lifts_it(
        redis_url: str, raw: Redis) -> None:
    store = open_store(redis_url, retain_s=100)
    await store.open()
    try:
        task = await submit(store, key="k1")
        keys = [f"gl:t:{task.id}", f"gl:e:{task.id}", "gl:k:k1"]
        [claimed] = await store.claim("p", "gpu", 1, "n1", "gpu:0")
        assert [await raw.ttl(k) for k in keys] == [-1, -1, -1]  # live: kept
        await store.finish(task.id, claimed.token, TaskState.FAILED, error={"message": "x"})
        for k in keys:
            assert 100 <= await raw.ttl(k) <= 150  # retain_s and half again, the backstop
        await store.retry_failed(task.id)
        assert [await raw.ttl(k) for k in keys] == [-1, -1, -1]
    finally:
        await store.close()


async def test_purge_prunes_the_listings_of_tasks_that_expired(
        redis_url: str, raw: Redis) -> None:
    store = open_store(redis_url)
    await store.open()
    try:
        gone = await submit(store, "p")
        kept = await submit(store, "p")
        await store.claim("p", "gpu", 2, "n1", "gpu:0")
        await store.finish(gone.id, 1, TaskState.CANCELLED)
        await store.finish(kept.id, 1, TaskState.SUCCEEDED)
        await raw.delete(f"gl:t:{gone.id}", f"gl:e:{gone.id}")  # as its TTL would
        listed, _ = await store.list_tasks()
        assert [t.id for t in listed] == [kept.id]  # a listing skips (and drops) it at once
        report = await store.purge(gone.created_at - 1)
        assert report.tasks == 0  # nothing finished that long ago
        report = await store.purge(time.time() + 1)
        assert report.tasks == 1 and report.rows["tasks"] == 0  # kept purged, gone pruned
        for index in ("gl:all", "gl:p:p", "gl:s:cancelled", "gl:done"):
            assert await raw.zcard(index) == 0, index
        assert await store.list_tasks(state=TaskState.CANCELLED) == ([], None)
    finally:
        await store.close()


# -- Redis away and back ------------------------------------------------------------------------


async def test_redis_away_is_store_unavailable_and_the_store_recovers(
        own_redis: RedisProcess) -> None:
    url = own_redis.url
    a, b = RedisStore(url), RedisStore(url)
    await a.open()
    await b.open()
    try:
        task = await submit(a)
        own_redis.kill()
        for call in (a.get(task.id), a.submit(spec()), a.claim("p", "gpu", 1, "n", "gpu:0"),
                     a.queue_stats(), a.events(task.id)):
            with pytest.raises(StoreUnavailableError) as info:
                await asyncio.wait_for(call, GUARD_S)
            assert info.value.status == 503 and info.value.headers["Retry-After"] == "2"
        own_redis.start()  # the same port, empty: no persistence in this test
        assert await a.get(task.id) is None  # a call reconnects by itself
        # The subscriber came back too: B's finish wakes a waiter on A.
        work = asyncio.Event()
        a.on_work = work.set
        await eventually(lambda: _submit_woke(b, work))
        fresh = await submit(a, "q")
        [claimed] = await b.claim("q", "gpu", 1, "n", "gpu:0")
        waiter = asyncio.create_task(wait_final(a, fresh.id, timeout=LONG_S))
        await eventually(lambda: _true(a.notifier.waited_on(fresh.id)))
        await b.finish(fresh.id, claimed.token, TaskState.SUCCEEDED)
        got = await asyncio.wait_for(waiter, GUARD_S)
        assert got is not None and got.state is TaskState.SUCCEEDED
    finally:
        await a.close()
        await b.close()


async def _submit_woke(other: Store, woke: asyncio.Event) -> bool:
    """Another store queues work in a fresh preset; True once this store heard of it."""
    woke.clear()
    await other.submit(spec(f"probe-{id(woke)}"))
    try:
        await asyncio.wait_for(woke.wait(), 0.2)
    except TimeoutError:
        return False
    return True
