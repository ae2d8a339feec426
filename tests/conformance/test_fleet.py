"""The Fleet conformance suite: every backend (local, redis) keeps the same registry, calls and
lease book. What needs a second node (a call to another node, following a lease saved by
another node) runs on the redis backend only: the local fleet is one node by definition.

The redis backend runs against the shared throwaway ``redis-server`` (``redis_url``, emptied
per test); the reconnect test starts a server of its own, on a free port, to kill -9 it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import pytest
from tests.conftest import RedisProcess, eventually, free_port

from gpulane.errors import (
    ConflictError,
    NotFoundError,
    RequestError,
    StoreUnavailableError,
    UnavailableError,
)
from gpulane.fleet import Fleet, LocalFleet, NodeInfo
from gpulane.fleet.factory import open_fleet
from gpulane.fleet.redis import RedisFleet

GUARD_S = 10.0
"""Failure guard for what should end at once: never the assertion."""


def info(name: str, **kw: Any) -> NodeInfo:
    now = time.time()
    return NodeInfo(name=name, url=f"http://{name}:8765", started_at=now, heartbeat_at=now,
                    **kw)


@dataclass
class Fleets:
    """Makes opened fleets of one backend (each a node by name) and closes them after."""

    backend: str
    make: Callable[[str], Fleet]
    opened: list[Fleet]

    async def node(self, name: str, handler: Any = None) -> Fleet:
        f = self.make(name)
        if handler is not None:
            f.serve(handler)
        await f.open()
        self.opened.append(f)
        return f


@pytest.fixture(params=["local", "redis"])
async def fleets(request: pytest.FixtureRequest) -> AsyncIterator[Fleets]:
    if request.param == "local":
        make: Callable[[str], Fleet] = LocalFleet
    else:
        url: str = request.getfixturevalue("redis_url")
        make = lambda name: open_fleet(url, name)  # noqa: E731
    made = Fleets(request.param, make, [])
    yield made
    for f in made.opened:
        await f.close()


@pytest.fixture
async def redis_fleets(redis_url: str) -> AsyncIterator[Fleets]:
    """Fleets of the redis backend only: for what needs two nodes."""
    made = Fleets("redis", lambda name: open_fleet(redis_url, name), [])
    yield made
    for f in made.opened:
        await f.close()


async def echo(op: str, payload: dict[str, Any]) -> dict[str, Any]:
    return {"op": op, "payload": payload}


def test_factory_picks_the_backend_by_store_url() -> None:
    assert isinstance(open_fleet("redis://127.0.0.1:1/0", "a"), RedisFleet)
    local = open_fleet("sqlite:///tmp/x.db", "a")
    assert isinstance(local, LocalFleet) and local.name == "a" and not local.shared
    assert RedisFleet.shared


# -- the registry ------------------------------------------------------------------------------


async def test_register_lists_the_node_and_deregister_removes_it(fleets: Fleets) -> None:
    a = await fleets.node("a")
    assert await a.nodes() == []
    me = info("a", devices=[{"index": 0, "schedulable_free_vram_mb": 1000}], warm=["embed/gpu"],
              running=2, simulated=True)
    await a.register(me, ttl_s=30)
    assert await a.nodes() == [me]
    await a.deregister()
    assert await a.nodes() == []


async def test_a_node_unheard_of_for_its_ttl_is_gone(fleets: Fleets) -> None:
    a = await fleets.node("a")
    await a.register(info("a"), ttl_s=0.05)

    async def gone() -> bool:
        return await a.nodes() == []
    await eventually(gone)
    await a.register(info("a"), ttl_s=30)  # a heartbeat brings it back
    assert [n.name for n in await a.nodes()] == ["a"]


async def test_every_node_sees_every_live_node_by_name(redis_fleets: Fleets) -> None:
    c, a, b = [await redis_fleets.node(n) for n in "cab"]
    for f in (c, a, b):
        await f.register(info(f.name), ttl_s=30)
    for f in (a, b, c):
        assert [n.name for n in await f.nodes()] == ["a", "b", "c"]
    await b.register(info("b"), ttl_s=0.05)  # then b stops heartbeating

    async def b_gone() -> bool:
        return [n.name for n in await c.nodes()] == ["a", "c"]
    await eventually(b_gone)
    assert [n.name for n in await a.nodes()] == ["a", "c"]


# -- calls -------------------------------------------------------------------------------------


async def test_a_call_to_this_node_runs_its_handler(fleets: Fleets) -> None:
    a = await fleets.node("a", echo)
    assert await a.call("a", "ping", {"x": [1, 2]}, timeout_s=GUARD_S) == {
        "op": "ping", "payload": {"x": [1, 2]}}


async def test_a_call_reaches_another_node_and_returns_its_answer(redis_fleets: Fleets) -> None:
    a = await redis_fleets.node("a", echo)
    b = await redis_fleets.node("b", echo)
    await b.register(info("b"), ttl_s=30)
    assert await a.call("b", "pause", {"lease": "L1"}, timeout_s=GUARD_S) == {
        "op": "pause", "payload": {"lease": "L1"}}


async def test_a_call_reaches_only_the_fleet_of_its_own_database(redis_url: str) -> None:
    # Pub/sub channels ignore the database number: two fleets on /0 and /1 of one server,
    # each with a node "b", must not both run a call meant for one of them.
    other_db = redis_url.rsplit("/", 1)[0] + "/1"
    ran: list[str] = []

    def handler(where: str) -> Any:
        async def serve(op: str, payload: dict[str, Any]) -> dict[str, Any]:
            ran.append(where)
            return {}
        return serve
    made = [open_fleet(redis_url, "a"), open_fleet(redis_url, "b"), open_fleet(other_db, "b"),
            open_fleet(other_db, "c")]
    made[1].serve(handler("db0"))
    made[2].serve(handler("db1"))
    try:
        for f in made:
            await f.open()
        await made[1].register(info("b"), ttl_s=30)
        await made[2].register(info("b"), ttl_s=30)
        await made[0].call("b", "drain", {}, timeout_s=GUARD_S)
        # A call to db1's b goes out after: once it is answered, db0's went long before.
        await made[3].call("b", "ping", {}, timeout_s=GUARD_S)
    finally:
        for f in made:
            await f.close()
    assert ran == ["db0", "db1"]


async def test_a_call_to_an_unknown_node_is_not_found(fleets: Fleets) -> None:
    a = await fleets.node("a", echo)
    with pytest.raises(NotFoundError) as err:
        await a.call("nobody", "ping", {}, timeout_s=GUARD_S)
    assert err.value.code == "unknown_node" and err.value.field == "node"


async def test_a_node_that_does_not_listen_is_unreachable_at_once(redis_fleets: Fleets) -> None:
    a = await redis_fleets.node("a", echo)
    await a.register(info("ghost"), ttl_s=30)  # registered, but nobody serves its calls
    with pytest.raises(UnavailableError) as err:
        await asyncio.wait_for(a.call("ghost", "ping", {}, timeout_s=60), GUARD_S)
    assert err.value.code == "node_unreachable" and err.value.status == 503
    assert "Retry-After" in err.value.headers


async def test_a_handler_slower_than_the_timeout_answers_unreachable(fleets: Fleets) -> None:
    release = asyncio.Event()
    finished: list[str] = []

    async def slow(op: str, payload: dict[str, Any]) -> dict[str, Any]:
        await release.wait()
        finished.append(op)
        return {}
    callee = await fleets.node("b", slow)
    await callee.register(info("b"), ttl_s=30)
    caller = callee if fleets.backend == "local" else await fleets.node("a", echo)
    with pytest.raises(UnavailableError) as err:
        await caller.call("b", "slow", {}, timeout_s=0.05)
    assert err.value.code == "node_unreachable"
    release.set()  # the handler is not cancelled: it runs to its end

    async def done() -> bool:
        return finished == ["slow"]
    await eventually(done)


class TimedOut(RequestError):
    status = 408


@pytest.mark.parametrize("raised, cls, status", [
    (NotFoundError("unknown_lease", "lease L9 not found", "id", extra={"lease": "L9"}),
     NotFoundError, 404),
    (ConflictError("stale_token", "token 3 is stale", "token",
                   headers={"Connection": "close"}), ConflictError, 409),
    (UnavailableError("draining", "node b drains", None, headers={"Retry-After": "5"}),
     UnavailableError, 503),
    (TimedOut("lease_wait_timeout", "not granted within 1 s", "wait_s"), RequestError, 408),
])
async def test_a_request_error_reaches_the_caller_as_the_same_class(
        redis_fleets: Fleets, raised: RequestError, cls: type[RequestError],
        status: int) -> None:
    async def refuse(op: str, payload: dict[str, Any]) -> dict[str, Any]:
        raise raised
    await (await redis_fleets.node("b", refuse)).register(info("b"), ttl_s=30)
    a = await redis_fleets.node("a", echo)
    with pytest.raises(RequestError) as err:
        await a.call("b", "x", {}, timeout_s=GUARD_S)
    got = err.value
    assert type(got) is cls and got.status == status
    assert (got.code, got.message, got.field) == (raised.code, raised.message, raised.field)
    assert (got.extra, got.headers) == (raised.extra, raised.headers)


async def test_a_handler_that_crashes_answers_internal(redis_fleets: Fleets) -> None:
    async def crash(op: str, payload: dict[str, Any]) -> dict[str, Any]:
        raise RuntimeError("boom")
    await (await redis_fleets.node("b", crash)).register(info("b"), ttl_s=30)
    a = await redis_fleets.node("a", echo)
    with pytest.raises(RequestError) as err:
        await a.call("b", "x", {}, timeout_s=GUARD_S)
    assert err.value.status == 500 and err.value.code == "internal"
    assert "boom" in err.value.message


# -- the lease book ----------------------------------------------------------------------------


def lease(lease_id: str, node: str, state: str = "granted", **kw: Any) -> dict[str, Any]:
    return {"id": lease_id, "node": node, "state": state, "holder": "svc", "vram_mb": 100,
            **kw}


def ev(n: int, kind: str) -> dict[str, Any]:
    return {"id": n, "event": kind, "at": 1.0 + n}


async def test_the_lease_book_saves_reads_and_lists(fleets: Fleets) -> None:
    a = await fleets.node("a")
    assert await a.lease("L1") is None and await a.leases() == []
    await a.save_lease(lease("L1", "a"), [ev(1, "granted")])
    await a.save_lease(lease("L2", "b"), [ev(1, "granted")])
    await a.save_lease(lease("L3", "a"), [])
    await a.save_lease(lease("L1", "a", "paused"), [ev(1, "granted"), ev(2, "paused")])
    assert await a.lease("L1") == lease("L1", "a", "paused")
    assert [x["id"] for x in await a.leases()] == ["L1", "L2", "L3"]  # oldest first
    assert [x["id"] for x in await a.leases("a")] == ["L1", "L3"]
    assert [x["id"] for x in await a.leases("b")] == ["L2"]
    assert await a.lease_events("L1") == [ev(1, "granted"), ev(2, "paused")]  # no duplicate
    assert await a.lease_events("L1", after=1) == [ev(2, "paused")]
    assert await a.lease_events("L3") == [] and await a.lease_events("nope") == []


async def test_an_ended_lease_leaves_the_live_list_and_is_dropped_after_keep_s(
        fleets: Fleets) -> None:
    a = await fleets.node("a")
    await a.save_lease(lease("L1", "a"), [ev(1, "granted")])
    await a.save_lease(lease("L2", "a"), [ev(1, "granted")])
    await a.save_lease(lease("L1", "a", "released"), [ev(2, "released")], keep_s=60)
    assert [x["id"] for x in await a.leases()] == ["L2"]
    assert [x["id"] for x in await a.leases("a")] == ["L2"]
    assert (await a.lease("L1") or {})["state"] == "released"  # still readable
    assert [e["event"] for e in await a.lease_events("L1")] == ["granted", "released"]
    await a.save_lease(lease("L2", "a", "expired"), [ev(2, "expired")], keep_s=0.05)

    async def dropped() -> bool:
        return await a.lease("L2") is None and await a.lease_events("L2") == []
    await eventually(dropped)
    assert await a.leases() == []


async def test_follow_lease_yields_batches_as_they_land_and_ends_when_dropped(
        fleets: Fleets) -> None:
    a = await fleets.node("a")
    await a.save_lease(lease("L1", "a"), [ev(1, "granted")])
    follow = a.follow_lease("L1", 0, quiet_s=0.05)
    assert await follow.__anext__() == [ev(1, "granted")]
    assert await follow.__anext__() == []  # quiet
    nxt = asyncio.ensure_future(follow.__anext__())
    await a.save_lease(lease("L1", "a", "paused"), [ev(2, "paused")])
    got = await asyncio.wait_for(nxt, GUARD_S)
    while got == []:  # a quiet batch may come first
        got = await asyncio.wait_for(follow.__anext__(), GUARD_S)
    assert got == [ev(2, "paused")]
    await a.save_lease(lease("L1", "a", "released"), [ev(3, "released")], keep_s=60)
    assert await asyncio.wait_for(follow.__anext__(), GUARD_S) == [ev(3, "released")]
    await a.save_lease(lease("L1", "a", "released"), [], keep_s=0.05)
    rest = [b async for b in follow]  # ends once the lease is dropped
    assert all(b == [] for b in rest)


async def test_follow_of_an_unknown_lease_ends_at_once(fleets: Fleets) -> None:
    a = await fleets.node("a")
    assert [b async for b in a.follow_lease("nope", 0, quiet_s=GUARD_S)] == []


async def test_a_lease_saved_on_one_node_is_followed_from_another(
        redis_fleets: Fleets) -> None:
    a = await redis_fleets.node("a")
    b = await redis_fleets.node("b")
    await a.save_lease(lease("L1", "a"), [ev(1, "granted")])
    follow = b.follow_lease("L1", 1, quiet_s=GUARD_S)
    nxt = asyncio.ensure_future(follow.__anext__())

    async def blocked() -> bool:  # the follower waits in XREAD BLOCK before the save
        clients: Any = await b.client.client_list()  # type: ignore[attr-defined]
        return any(c.get("cmd") == "xread" for c in clients)
    await eventually(blocked)
    await a.save_lease(lease("L1", "a", "preempted"), [ev(2, "preempted")])
    assert await asyncio.wait_for(nxt, GUARD_S) == [ev(2, "preempted")]
    assert await b.lease("L1") == lease("L1", "a", "preempted")


# -- Redis unreachable, and back ---------------------------------------------------------------


async def test_an_unreachable_redis_raises_store_unavailable() -> None:
    f = RedisFleet(f"redis://127.0.0.1:{free_port()}/0", "a")
    with pytest.raises(StoreUnavailableError):
        await asyncio.wait_for(f.open(), GUARD_S)
    with pytest.raises(StoreUnavailableError) as err:
        await asyncio.wait_for(f.register(info("a"), ttl_s=5), GUARD_S)
    assert err.value.status == 503 and err.value.headers["Retry-After"]
    with pytest.raises(StoreUnavailableError):
        await asyncio.wait_for(f.call("b", "x", {}, timeout_s=1), GUARD_S)
    await f.close()


async def test_calls_and_the_registry_come_back_after_redis_is_killed_and_restarted(
        own_redis: RedisProcess) -> None:
    a, b = RedisFleet(own_redis.url, "a"), RedisFleet(own_redis.url, "b")
    b.serve(echo)
    for f in (a, b):
        await f.open()
    try:
        await b.register(info("b"), ttl_s=30)
        assert await a.call("b", "ping", {}, timeout_s=GUARD_S) == {"op": "ping", "payload": {}}
        own_redis.kill()  # kill -9
        with pytest.raises(StoreUnavailableError):
            await asyncio.wait_for(a.call("b", "ping", {}, timeout_s=1), GUARD_S)
        own_redis.start()  # empty: the registry is gone with it

        async def answered() -> bool:
            try:
                await b.register(info("b"), ttl_s=30)  # the next heartbeat
                return await a.call("b", "ping", {}, timeout_s=1) == {"op": "ping",
                                                                      "payload": {}}
            except (StoreUnavailableError, UnavailableError):
                return False
        await eventually(answered, timeout=GUARD_S)
        assert b.view()["calls"]["resubscribes"] >= 1
    finally:
        for f in (a, b):
            await f.close()
