"""The lease table stays bounded: ended leases linger FINAL_LINGER_S (their holder can still
read how they ended), then go; the expiry tick and grant() read live leases only.

Time is a fake clock set on the manager (``mgr.clock``), never waited out.
"""

from __future__ import annotations

import asyncio
import itertools

import pytest

from gpulane.devices import SimulatedProvider, parse_gpu_spec
from gpulane.errors import NotFoundError
from gpulane.model import Priority
from gpulane.scheduling import leases as leases_mod
from gpulane.scheduling.leases import LeaseManager, LeaseRequest, LeaseState
from gpulane.scheduling.ledger import Ledger
from tests.conftest import settle
from tests.unit.conftest import Clock


@pytest.fixture
def clock() -> Clock:
    return Clock(1_000_000.0)


@pytest.fixture
def mgr(clock: Clock) -> LeaseManager:
    snaps = SimulatedProvider(parse_gpu_spec("2x24GiB")).snapshot()
    m = LeaseManager(Ledger(snaps, cpu_slots=2), on_change=lambda: None,
                     preempt_worker=lambda *_: None)
    m.clock = clock
    return m


IDLE = {"waiting": 0, "holding": 0, "ended": 0, "notifier": 0}


async def test_a_thousand_released_leases_leave_the_table_idle(mgr: LeaseManager,
                                                              clock: Clock) -> None:
    for i in range(1000):
        lease = await mgr.acquire(LeaseRequest(f"h{i}", vram_mb=1024), wait_s=0)
        mgr.release(lease.id, lease.token)
        clock.now += 0.01
    size = mgr.table_size()
    assert size["waiting"] == size["holding"] == 0 and size["ended"] <= leases_mod.FINAL_KEPT
    clock.now += leases_mod.FINAL_LINGER_S
    mgr.expire_now()
    assert mgr.table_size() == IDLE
    assert mgr.leases == {} and mgr.active() == []


async def test_more_ended_leases_than_kept_drops_the_oldest_early(
        mgr: LeaseManager, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(leases_mod, "FINAL_KEPT", 10)
    ids = []
    for i in range(25):
        lease = await mgr.acquire(LeaseRequest(f"h{i}", vram_mb=1024), wait_s=0)
        mgr.release(lease.id, lease.token)
        ids.append(lease.id)
    assert mgr.table_size()["ended"] == 10
    assert [lz.id for lz in mgr.leases.values()] == ids[-10:]


async def test_an_ended_lease_is_readable_for_its_linger_then_a_404(
        mgr: LeaseManager, clock: Clock) -> None:
    lease = await mgr.acquire(LeaseRequest("h", vram_mb=1024, ttl_s=5), wait_s=0)
    seen = mgr.notifier.version(lease.id)
    clock.now += 6
    mgr.expire_now()
    assert mgr.get(lease.id).state is LeaseState.EXPIRED
    assert [e["event"] for e in mgr.get(lease.id).events][-1] == "expired"
    clock.now += leases_mod.FINAL_LINGER_S - 1
    mgr.expire_now()
    assert mgr.get(lease.id).state is LeaseState.EXPIRED  # still lingering
    clock.now += 1
    mgr.expire_now()
    with pytest.raises(NotFoundError, match="kept 60 s"):
        mgr.get(lease.id)
    # A stream follower that read the version before the drop sees a change, re-reads and
    # gets the 404 instead of waiting on a counter that no longer moves.
    assert await mgr.notifier.wait(lease.id, seen, timeout=0) is True


async def test_a_revoked_lease_waiting_for_its_resume_outlives_the_linger(
        mgr: LeaseManager, clock: Clock) -> None:
    """Its holder waits for the urgent lease's end (``resume``): it stays readable until
    that is written, however long the urgent lease holds on."""
    low = await mgr.acquire(LeaseRequest("low", gpus=2, priority=10, grace_s=1), wait_s=0)
    waiter = asyncio.create_task(mgr.acquire(
        LeaseRequest("urgent", gpus=2, priority=Priority.IMMEDIATE, ttl_s=3600), wait_s=60))
    await settle()
    assert low.state is LeaseState.PREEMPTING
    clock.now += 2
    mgr.expire_now()  # low did not let go within its grace: revoked
    got = await waiter
    assert low.state is LeaseState.REVOKED and low.awaiting_resume
    clock.now += 10 * leases_mod.FINAL_LINGER_S
    mgr.expire_now()
    assert mgr.get(low.id) is low  # its resume is still to come
    mgr.release(got.id, got.token)
    assert [e["event"] for e in low.events][-1] == "resume" and not low.awaiting_resume
    clock.now += leases_mod.FINAL_LINGER_S
    mgr.expire_now()
    assert mgr.table_size() == IDLE


async def test_the_tick_and_grant_read_live_leases_only(mgr: LeaseManager,
                                                        clock: Clock) -> None:
    for i in range(50):
        lease = await mgr.acquire(LeaseRequest(f"h{i}", vram_mb=1024), wait_s=0)
        mgr.release(lease.id, lease.token)
    held = await mgr.acquire(LeaseRequest("held", vram_mb=1024, ttl_s=5), wait_s=0)
    assert mgr.table_size() == {"waiting": 0, "holding": 1, "ended": 50, "notifier": 51}
    assert list(mgr._live()) == [held]
    clock.now += 6
    mgr.expire_now()
    assert held.state is LeaseState.EXPIRED and list(mgr._live()) == []


def test_tokens_rise_stay_exact_in_javascript_and_are_not_consecutive(
        mgr: LeaseManager) -> None:
    tokens = [mgr._next_token() for _ in range(2_000)]
    assert tokens == sorted(set(tokens))  # strictly rising: a fencing token
    assert max(tokens) < 2**53  # a JSON number a browser reads exactly
    # Not the previous holder's token plus one: the low bits are random.
    assert sum(b - a == 1 for a, b in itertools.pairwise(tokens)) < 50
