"""Split brain on leases: a node taken for dead while alive (a stalled heartbeat) does not
save ``granted`` over the ``expired`` that another node's takeover wrote in the book; it ends
the lease itself instead, so its devices are free and its holder's renew is refused."""

from __future__ import annotations

import pytest

from gpulane.errors import ConflictError
from gpulane.scheduling.fleet_leases import FleetLeases
from gpulane.scheduling.leases import LeaseRequest, LeaseState
from tests.conftest import eventually
from tests.unit.test_fleet_leases import Book, events, manager, record


async def test_a_lease_ended_by_a_takeover_is_not_brought_back_by_its_living_node() -> None:
    book = Book("b")
    mgr = manager()
    front = FleetLeases(mgr, book, "b")
    await front.start()
    try:
        held = await front.acquire(LeaseRequest("svc", vram_mb=2048), wait_s=0)
        assert ((await book.lease(held["id"])) or {})["state"] == "granted"
        # Node a took b for dead and ended its leases in the book.
        await FleetLeases(manager(), book, "a").on_node_dead("b")
        # b was alive: its holder renews through it; the book refuses the save, b ends it.
        await front.renew(held["id"], held["token"])

        async def ended_here() -> bool:
            return mgr.get(held["id"]).state.value == "expired"
        await eventually(ended_here)
        assert ((await book.lease(held["id"])) or {})["state"] == "expired"
        last = (await book.lease_events(held["id"]))[-1]
        assert (last["event"], last["data"]["reason"]) == ("expired", "node_lost")
        assert all(not g.holdings for g in mgr.ledger.gpus.values())
        with pytest.raises(ConflictError):
            await front.renew(held["id"], held["token"])
    finally:
        await front.stop()


async def test_a_lease_nobody_renews_is_ended_by_the_fence_check() -> None:
    book = Book("b")
    mgr = manager()
    front = FleetLeases(mgr, book, "b")
    await front.start()
    try:
        held = await front.acquire(LeaseRequest("svc", vram_mb=2048), wait_s=0)
        kept = await front.acquire(LeaseRequest("other", vram_mb=1024), wait_s=0)
        assert await front.check_fence() == 0
        record = await book.lease(held["id"])  # node a ended this one only
        assert record is not None
        await FleetLeases(manager(), book, "a")._end_in_book(
            record, LeaseState.EXPIRED, {"reason": "node_lost", "node": "b"})
        assert await front.check_fence() == 1
        assert mgr.get(held["id"]).state.value == "expired"
        assert mgr.get(kept["id"]).state.value == "granted"
    finally:
        await front.stop()


async def test_a_malformed_lease_in_the_book_does_not_stop_the_restore() -> None:
    book = Book("b")
    await book.save_lease({"id": "lease-odd", "node": "b", "state": "granted"}, [])
    good = record("lease-good", "granted")
    await book.save_lease(good, events("lease-good", "waiting", "granted"))
    mgr = manager()
    front = FleetLeases(mgr, book, "b")
    await front.start()
    try:
        assert mgr.get("lease-good").token == good["token"]
        assert "lease-odd" not in mgr.leases
    finally:
        await front.stop()
