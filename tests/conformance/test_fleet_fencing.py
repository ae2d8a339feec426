"""The lease book's fence, on every backend (local, redis): an ended lease is never saved back
to life, and an end written by another node (``ended_by``: a node taken for dead) stands
against its own node's later saves. A refused save writes nothing and raises ``lease_ended``.
A malformed entry in Redis (another version, a stray client) is skipped, not fatal.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis

from gpulane.errors import ConflictError
from gpulane.fleet import Fleet, LocalFleet, NodeInfo
from gpulane.fleet.factory import open_fleet


@pytest.fixture(params=["local", "redis"])
async def book(request: pytest.FixtureRequest) -> AsyncIterator[Fleet]:
    fleet: Fleet = (LocalFleet("b") if request.param == "local"
                    else open_fleet(request.getfixturevalue("redis_url"), "b"))
    await fleet.open()
    yield fleet
    await fleet.close()


def lease(state: str, **kw: Any) -> dict[str, Any]:
    return {"id": "L1", "node": "b", "state": state, "holder": "svc", "vram_mb": 100, **kw}


def ev(n: int, kind: str) -> dict[str, Any]:
    return {"id": n, "event": kind, "at": 1.0 + n}


async def test_a_granted_save_over_an_ended_lease_is_refused_and_writes_nothing(
        book: Fleet) -> None:
    await book.save_lease(lease("granted"), [ev(1, "granted")])
    await book.save_lease(lease("expired", ended_by="a"), [ev(2, "expired")], keep_s=60)
    with pytest.raises(ConflictError) as refused:
        await book.save_lease(lease("granted", token=9), [ev(2, "renewed")])
    assert (refused.value.code, refused.value.field) == ("lease_ended", "id")
    assert "L1" in refused.value.message
    assert ((await book.lease("L1")) or {})["state"] == "expired"
    assert [e["event"] for e in await book.lease_events("L1")] == ["granted", "expired"]
    assert await book.leases() == [] and await book.leases(node="b") == []


async def test_an_end_by_another_node_stands_against_its_nodes_own_end(book: Fleet) -> None:
    await book.save_lease(lease("granted"), [ev(1, "granted")])
    await book.save_lease(lease("expired", ended_by="a"), [ev(2, "expired")], keep_s=60)
    with pytest.raises(ConflictError):
        await book.save_lease(lease("released"), [ev(2, "released")], keep_s=60)
    assert ((await book.lease("L1")) or {})["state"] == "expired"


async def test_a_node_saves_its_own_ended_lease_again(book: Fleet) -> None:
    # A preempted lease awaiting its resume is saved ended, then again with the resume.
    await book.save_lease(lease("granted"), [ev(1, "granted")])
    await book.save_lease(lease("revoked"), [ev(2, "revoked")], keep_s=60)
    await book.save_lease(lease("revoked"), [ev(3, "resume")], keep_s=60)
    assert [e["event"] for e in await book.lease_events("L1")] == [
        "granted", "revoked", "resume"]
    with pytest.raises(ConflictError):
        await book.save_lease(lease("granted"), [])


async def test_malformed_entries_are_skipped_not_fatal(redis_url: str) -> None:
    book = open_fleet(redis_url, "b")
    await book.open()
    stray = aioredis.from_url(redis_url)
    try:
        await book.register(NodeInfo("b", None, 0.0, 0.0), ttl_s=30)
        await stray.set("gl:node:junk", "not json")
        await stray.sadd("gl:registry", "junk")
        await book.save_lease(lease("granted"), [ev(1, "granted")])
        await stray.set("gl:lease:L2", '{"no": "id"')
        await stray.zadd("gl:leases", {"L2": 0.0})
        assert [n.name for n in await book.nodes()] == ["b"]
        assert [r["id"] for r in await book.leases()] == ["L1"]
        assert await book.lease("L2") is None
        await book.save_lease({**lease("granted"), "id": "L2"}, [])  # a save repairs it
        assert ((await book.lease("L2")) or {})["state"] == "granted"
    finally:
        await stray.aclose()
        await book.close()


async def test_an_end_with_a_null_ended_by_is_its_nodes_own(book: Fleet) -> None:
    await book.save_lease(lease("released", ended_by=None), [ev(1, "released")], keep_s=60)
    await book.save_lease(lease("released"), [ev(2, "resume")], keep_s=60)
    assert len(await book.lease_events("L1")) == 2
