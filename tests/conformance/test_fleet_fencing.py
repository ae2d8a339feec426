"""The lease book's fence, on every backend (local, redis): an ended lease is never saved back
to life, and an end written by another node (``ended_by``: a node taken for dead) stands
against its own node's later saves. A refused save writes nothing and raises ``lease_ended``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from gpulane.errors import ConflictError
from gpulane.fleet import Fleet, LocalFleet
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
