"""The Housekeeper in a fleet: it registers its node, heartbeats and deregisters it, and takes
over the running work of a node that holds some but is no longer registered (dead), never of a
live node, never of itself, and never on a fleet nobody shares.

Two stores on one data (two SQLite stores on one file, or two Redis stores on one server once
the redis store exists) stand for two nodes; the fleet is a RedisFleet on the shared
``redis-server``. Node "b" claims and lets its registration lapse; node "a"'s housekeeper
takes its work over.
"""

from __future__ import annotations

import importlib.util
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from gpulane.errors import StaleTokenError
from gpulane.fleet import Fleet, LocalFleet, NodeInfo, RedisFleet
from gpulane.model import TaskSpec, TaskState
from gpulane.scheduling.housekeeping import Housekeeper
from gpulane.store import Store, open_store
from gpulane.store.sqlite import SqliteStore
from tests.conftest import eventually

STORES = ["sqlite"]
if importlib.util.find_spec("gpulane.store.redis") is not None:
    STORES.append("redis")


def info(name: str) -> NodeInfo:
    now = time.time()
    return NodeInfo(name=name, url=None, started_at=now, heartbeat_at=now)


@pytest.fixture(params=STORES)
async def two_stores(request: pytest.FixtureRequest, tmp_path: Path
                     ) -> AsyncIterator[tuple[Store, Store]]:
    """Two stores over one data: node a's and node b's."""
    if request.param == "sqlite":
        make: Callable[[], Store] = lambda: SqliteStore(tmp_path / "gpulane.db")  # noqa: E731
    else:
        url: str = request.getfixturevalue("redis_url")
        make = lambda: open_store(url)  # noqa: E731
    a, b = make(), make()
    await a.open()
    await b.open()
    yield a, b
    await b.close()
    await a.close()


@pytest.fixture
async def fleets(redis_url: str) -> AsyncIterator[Callable[[str], RedisFleet]]:
    """Opened RedisFleets by node name, closed after the test."""
    made: list[RedisFleet] = []

    def make(name: str) -> RedisFleet:
        f = RedisFleet(redis_url, name)
        made.append(f)
        return f
    yield make
    for f in made:
        await f.close()


def keeper(store: Store, node: str, fleet: Fleet, **kw: Any) -> Housekeeper:
    opts: dict[str, Any] = {"retain_s": 3600.0, "claim_ttl_s": 30.0, "node_ttl_s": 30.0}
    opts.update(kw)
    return Housekeeper(store, node, held=list, max_attempts=lambda: {"p": 3}, fleet=fleet,
                       node_info=lambda: info(node), **opts)


async def test_a_dead_nodes_running_work_is_taken_over_and_a_live_nodes_is_not(
        two_stores: tuple[Store, Store], fleets: Callable[[str], RedisFleet]) -> None:
    store_a, store_b = two_stores
    fa, fb, fc = fleets("a"), fleets("b"), fleets("c")
    for f in (fa, fb, fc):
        await f.open()
    await store_a.submit_many([TaskSpec(preset="p", input=i) for i in range(3)])
    [mine] = await store_a.claim("p", "gpu", 1, "a", "gpu:0")  # a's own: never reaped
    [dead_run] = await store_b.claim("p", "gpu", 1, "b", "gpu:0")
    [live_run] = await store_b.claim("p", "gpu", 1, "c", "gpu:1")  # c: alive elsewhere
    await fb.register(info("b"), ttl_s=0.05)  # b's last heartbeat; then it is killed
    await fc.register(info("c"), ttl_s=30)
    await fb.save_lease({"id": "L1", "node": "b", "state": "granted"}, [])
    told: list[str] = []
    woken: list[bool] = []

    async def node_dead(name: str) -> None:
        told.append(name)
    hk = keeper(store_a, "a", fa, on_node_dead=node_dead, on_reaped=lambda: woken.append(True))
    assert await hk.announce()

    async def taken() -> list[Any]:
        return await hk.take_over(force=True)
    [requeued] = await eventually(taken)
    assert requeued.id == dead_run.id and requeued.state is TaskState.QUEUED
    assert told == ["b"] and woken == [True]
    for t, state in ((mine, TaskState.RUNNING), (live_run, TaskState.RUNNING)):
        assert (await store_a.get(t.id)).state is state  # type: ignore[union-attr]
    with pytest.raises(StaleTokenError):  # b's late finish is refused
        await store_b.finish(dead_run.id, dead_run.token, TaskState.SUCCEEDED)
    view = hk.view()["fleet"]
    assert (view["takeovers_total"], view["taken_over_total"]) == (1, 1)
    assert view["last_takeover"]["node"] == "b"
    # b holds nothing now but its lease: the hook hears of it again, nothing is counted twice.
    assert await hk.take_over(force=True) == [] and told == ["b", "b"]
    assert hk.view()["fleet"]["takeovers_total"] == 1


async def test_a_node_that_was_not_registered_for_a_whole_ttl_takes_nothing_over(
        two_stores: tuple[Store, Store], fleets: Callable[[str], RedisFleet]) -> None:
    """Just (re)registered, say after Redis came back: the others may not have renewed their
    keys yet, so none of them is taken for dead."""
    store_a, store_b = two_stores
    fa = fleets("a")
    await fa.open()
    await store_a.submit(TaskSpec(preset="p", input=1))
    [run] = await store_b.claim("p", "gpu", 1, "b", "gpu:0")  # b: not registered (yet)
    hk = keeper(store_a, "a", fa)
    assert await hk.take_over() == []  # never registered
    assert await hk.announce()
    assert await hk.take_over() == []  # registered, but not for node_ttl_s yet
    assert await hk.dead_nodes() == {"b"}
    assert (await store_a.get(run.id)).state is TaskState.RUNNING  # type: ignore[union-attr]


async def test_the_loops_register_take_over_and_deregister(
        two_stores: tuple[Store, Store], fleets: Callable[[str], RedisFleet]) -> None:
    store_a, store_b = two_stores
    fa, fb = fleets("a"), fleets("b")
    await fa.open()
    await fb.open()
    await store_a.submit(TaskSpec(preset="p", input=1))
    [run] = await store_b.claim("p", "gpu", 1, "b", "gpu:0")
    await fb.register(info("b"), ttl_s=0.2)
    hk = keeper(store_a, "a", fa, node_ttl_s=0.2, takeover_every_s=0.02)
    hk.start()
    try:
        async def requeued() -> bool:
            t = await store_a.get(run.id)
            return t is not None and t.state is TaskState.QUEUED
        await eventually(requeued)
        assert [n.name for n in await fb.nodes()] == ["a"]  # b lapsed; a heartbeats
        assert hk.view()["fleet"]["registrations"] >= 2
    finally:
        await hk.stop()
    assert await fb.nodes() == []  # a left at stop


async def test_a_local_fleet_registers_but_never_takes_over(tmp_path: Path) -> None:
    """One node on SQLite: another name holding work proves nothing about it (a second node
    on the same file would be a misconfiguration the claim TTL reaper covers)."""
    a, b = SqliteStore(tmp_path / "g.db"), SqliteStore(tmp_path / "g.db")
    await a.open()
    await b.open()
    try:
        await a.submit(TaskSpec(preset="p", input=1))
        [run] = await b.claim("p", "gpu", 1, "b", "gpu:0")
        fleet = LocalFleet("a")
        hk = keeper(a, "a", fleet)
        hk.start()
        try:
            async def registered() -> bool:
                return [n.name for n in await fleet.nodes()] == ["a"]
            await eventually(registered)
            assert await hk.dead_nodes() == set()
            assert await hk.take_over(force=True) == []
        finally:
            await hk.stop()
        assert hk.view()["fleet"]["shared"] is False
        assert (await a.get(run.id)).state is TaskState.RUNNING  # type: ignore[union-attr]
        assert await fleet.nodes() == []
    finally:
        await b.close()
        await a.close()
