"""FleetLeases and its mirror over a lease book shared as Redis would share it (a LocalFleet
marked shared): a restart takes back what the node held, the book outlives an outage."""

from __future__ import annotations

import time
from typing import Any

import pytest

from gpulane.devices import SimulatedProvider, parse_gpu_spec
from gpulane.errors import StoreUnavailableError
from gpulane.fleet.local import LocalFleet
from gpulane.scheduling.fleet_leases import FleetLeases
from gpulane.scheduling.leases import LeaseManager, LeaseRequest
from gpulane.scheduling.ledger import Ledger
from tests.conftest import eventually


class Book(LocalFleet):
    """A LocalFleet that says it is shared, and can be made unreachable."""

    shared = True

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.down = False

    async def save_lease(self, lease: dict[str, Any], events: list[dict[str, Any]],
                         keep_s: float | None = None) -> None:
        if self.down:
            raise StoreUnavailableError("redis is away")
        await super().save_lease(lease, events, keep_s)


def manager() -> LeaseManager:
    snaps = SimulatedProvider(parse_gpu_spec("2x24GiB")).snapshot()
    return LeaseManager(Ledger(snaps, cpu_slots=2), on_change=lambda: None,
                        preempt_worker=lambda *_: None)


def record(lease_id: str, state: str, **fields: Any) -> dict[str, Any]:
    now = time.time()
    return {"id": lease_id, "node": "b", "holder": "svc", "owner": "team", "state": state,
            "vram_mb": 1024, "gpus": 0, "priority": 50, "preemptible": True, "ttl_s": 30.0,
            "grace_s": 5.0, "devices": [1], "created_at": now - 5, "granted_at": now - 5,
            "expires_at": now + 20, "token": (int(now * 1000) << 11) | 7,
            "awaiting_resume": False, "event_count": 2, "asked_device": None, **fields}


def events(lease_id: str, *kinds: str) -> list[dict[str, Any]]:
    return [{"id": i, "event": k, "data": {"lease": lease_id, "state": k}, "ts": 0.0}
            for i, k in enumerate(kinds, 1)]


@pytest.fixture
async def book() -> Book:
    return Book("b")


async def test_a_restart_takes_back_what_it_held(book: Book) -> None:
    held = record("lease-held", "granted")
    await book.save_lease(held, events("lease-held", "waiting", "granted"))
    await book.save_lease(record("lease-lapsed", "granted", expires_at=time.time() - 1),
                          events("lease-lapsed", "waiting", "granted"))
    await book.save_lease(record("lease-waiting", "waiting", devices=[], token=None,
                                 event_count=1), events("lease-waiting", "waiting"))
    await book.save_lease(record("lease-gone-gpu", "granted", devices=[7]),
                          events("lease-gone-gpu", "waiting", "granted"))
    mgr = manager()
    front = FleetLeases(mgr, book, "b")
    await front.start()
    try:
        lease = mgr.get("lease-held")
        assert (lease.state.value, lease.token, lease.expires_at) == (
            "granted", held["token"], held["expires_at"])
        assert lease.request.owner == "team" and mgr.ledger.gpus[1].declared_mb == 1024
        assert [lz["id"] for lz in await book.leases()] == ["lease-held"]
        ended = {r: (await book.lease(r)) or {} for r in
                 ("lease-lapsed", "lease-waiting", "lease-gone-gpu")}
        assert {r: v["state"] for r, v in ended.items()} == {
            "lease-lapsed": "expired", "lease-waiting": "timed_out",
            "lease-gone-gpu": "expired"}
        last = (await book.lease_events("lease-waiting"))[-1]
        assert last["id"] == 2 and "restarted" in last["data"]["reason"]
        # New grants number their tokens above the one taken back; renewals reach the book.
        fresh = await mgr.acquire(LeaseRequest("other", vram_mb=1024), wait_s=0)
        assert fresh.token > held["token"]
        renewed = await front.renew("lease-held", held["token"])
        assert renewed["node"] == "b" and "token" not in renewed
        await front.release("lease-held", held["token"])
        assert ((await book.lease("lease-held")) or {})["state"] == "released"
        assert [e["event"] for e in await book.lease_events("lease-held")] == [
            "waiting", "granted", "released"]
    finally:
        await front.stop()


async def test_the_book_gets_the_newest_state_after_an_outage(book: Book) -> None:
    mgr = manager()
    front = FleetLeases(mgr, book, "b")
    await front.start()
    try:
        book.down = True
        lease = await mgr.acquire(LeaseRequest("svc", vram_mb=2048), wait_s=0)
        mgr.renew(lease.id, lease.token)
        mgr.release(lease.id, lease.token)  # the manager never waits for the book
        assert front.mirror is not None and front.mirror.pending() == 1
        assert await book.lease(lease.id) is None
        book.down = False

        async def saved() -> bool:
            return bool(((await book.lease(lease.id)) or {}).get("state") == "released")
        await eventually(saved)
        assert [e["event"] for e in await book.lease_events(lease.id)] == [
            "waiting", "granted", "released"]
        assert await book.leases() == []  # ended: readable for a while, no longer live
    finally:
        await front.stop()


async def test_a_dead_nodes_leases_end_expired_in_the_book(book: Book) -> None:
    await book.save_lease(record("lease-x", "preempting", node="c", awaiting_resume=True),
                          events("lease-x", "waiting", "granted"))
    front = FleetLeases(manager(), book, "b")
    await front.on_node_dead("c")
    ended = (await book.lease("lease-x")) or {}
    assert ended["state"] == "expired" and ended["token"] is None
    last = (await book.lease_events("lease-x"))[-1]
    assert (last["id"], last["event"], last["data"]["reason"], last["data"]["node"]) == (
        3, "expired", "node_lost", "c")
    await front.on_node_dead("b")  # never its own
