"""LeaseManager under random operation sequences (hypothesis state machine).

Drives a LeaseManager directly over a Ledger of simulated GPUs: acquire (now or waiting),
release and renew with right or stale tokens, TTL expiry, and immediate requests for a slice
or for N whole devices that preempt (holders either step aside or are revoked). After every
step: no device is over-committed, the ledger holds exactly the leases in a holding state, the
waiting and holding indexes agree with the leases' states, no token was ever handed out twice,
every ended lease's token is refused, every grant() granted in greedy priority order (a
waiting lease was passed over only if it did not fit at its turn), and devices are only kept
clear for a lease that is still waiting."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Coroutine
from typing import Any

import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from gpulane.devices import SimulatedProvider, parse_gpu_spec
from gpulane.errors import ConflictError
from gpulane.scheduling.leases import Lease, LeaseManager, LeaseRequest, LeaseState, LeaseTimeout
from gpulane.scheduling.ledger import Ledger

GIB = 1024
VRAM = st.sampled_from([1 * GIB, 4 * GIB, 8 * GIB, 12 * GIB, 20 * GIB, 24 * GIB])
MAX_WAITERS = 4


def _fits(mgr: LeaseManager, lease: Lease, used: dict[int, int],
          reserved: dict[int, str]) -> bool:
    """Whether ``lease`` could be placed given per-device declared MB ``used``."""
    req = lease.request
    usable = [d for d in mgr.ledger.gpus if reserved.get(d, lease.id) == lease.id
              and (req.device is None or d == req.device)]
    if req.gpus:
        empty = [d for d in usable if used[d] == 0]
        return len(empty) >= req.gpus
    return any(mgr.ledger.gpus[d].total_vram_mb - used[d] >= req.vram_mb for d in usable)


class LeaseMachine(RuleBasedStateMachine):
    SPEC = "2x24GiB"

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        snaps = SimulatedProvider(parse_gpu_spec(self.SPEC)).snapshot()
        self.mgr = LeaseManager(Ledger(snaps, cpu_slots=2), on_change=lambda: None,
                                preempt_worker=lambda *_: None)
        self.tokens: set[int] = set()
        self.granted: list[Lease] = []  # every lease ever granted, in grant order
        self.waiters: list[asyncio.Task[Lease]] = []
        self.order_errors: list[str] = []
        original = self.mgr.grant

        def checked_grant() -> None:
            before = {lz.id for lz in self.mgr.leases.values() if lz.state is LeaseState.WAITING}
            used0 = {d: a.declared_mb for d, a in self.mgr.ledger.gpus.items()}
            reserved0 = dict(self.mgr._reserved)
            original()
            self._after_grant(before, used0, reserved0)

        self.mgr.grant = checked_grant  # type: ignore[method-assign]

    # -- helpers ---------------------------------------------------------------------------

    def _after_grant(self, before: set[str], used0: dict[int, int],
                     reserved0: dict[int, str]) -> None:
        leases = [self.mgr.leases[i] for i in before]
        leases.sort(key=lambda lz: (-lz.request.priority, lz.seq))
        used, reserved = dict(used0), dict(reserved0)
        for lz in leases:  # replay the greedy pass in its order
            if lz.state.holds:
                assert lz.token not in self.tokens, f"token {lz.token} granted twice"
                self.tokens.add(lz.token)
                self.granted.append(lz)
                for d in lz.devices:
                    used[d] += (self.mgr.ledger.gpus[d].total_vram_mb if lz.request.gpus
                                else lz.request.vram_mb)
                for d in [d for d, o in reserved.items() if o == lz.id]:
                    del reserved[d]
            elif _fits(self.mgr, lz, used, reserved):
                self.order_errors.append(f"{lz.id} (priority {lz.request.priority}) fitted at "
                                         "its turn but was skipped")

    def _run(self, coro: Coroutine[Any, Any, Any]) -> Any:
        return self.loop.run_until_complete(coro)

    def _settle(self) -> None:
        for _ in range(3):
            self._run(asyncio.sleep(0))
        for t in [t for t in self.waiters if t.done()]:
            self.waiters.remove(t)
            assert t.result().state.holds or t.result().state.final

    def _holding(self) -> list[Lease]:
        return [lz for lz in self.granted if lz.state.holds]

    def teardown(self) -> None:
        for t in self.waiters:
            t.cancel()
        if self.waiters:
            self._run(asyncio.gather(*self.waiters, return_exceptions=True))
        self.loop.close()

    # -- rules -----------------------------------------------------------------------------

    @rule(vram=VRAM, gpus=st.sampled_from([0, 0, 0, 1, 2]),
          priority=st.sampled_from([10, 50, 70]),
          preemptible=st.sampled_from([True, True, True, False]),
          wait=st.booleans())
    def acquire(self, vram: int, gpus: int, priority: int, preemptible: bool,
                wait: bool) -> None:
        req = LeaseRequest("svc", 0 if gpus else vram, gpus, None, priority, 30.0,
                           preemptible, 5.0)
        if wait and len(self.waiters) < MAX_WAITERS:
            self.waiters.append(self.loop.create_task(self.mgr.acquire(req, 3600)))
        else:
            try:
                lease = self._run(self.mgr.acquire(req, 0))
                assert lease.state is LeaseState.GRANTED
            except LeaseTimeout as exc:
                assert exc.status == 408
        self._settle()

    @rule(data=st.data(), stale=st.booleans())
    def release(self, data: st.DataObject, stale: bool) -> None:
        if not self.granted:
            return
        lease = data.draw(st.sampled_from(self.granted))
        if lease.state.holds and not stale:
            assert self.mgr.release(lease.id, lease.token).state is LeaseState.RELEASED
            assert all(lease.id not in a.holdings for a in self.mgr.ledger.gpus.values())
        else:
            with pytest.raises(ConflictError):
                self.mgr.release(lease.id, lease.token + 1 if stale else lease.token)
        self._settle()

    @rule(data=st.data(), stale=st.booleans())
    def renew(self, data: st.DataObject, stale: bool) -> None:
        if not self.granted:
            return
        lease = data.draw(st.sampled_from(self.granted))
        if lease.state.holds and not stale:
            assert lease.expires_at is not None
            lease.expires_at -= 10  # so the renewal visibly pushes it out again
            self.mgr.renew(lease.id, lease.token)
            assert lease.expires_at > time.time() + lease.request.ttl_s - 5
        else:
            with pytest.raises(ConflictError):
                self.mgr.renew(lease.id, lease.token - 1 if stale else lease.token)

    @rule(data=st.data())
    def expire(self, data: st.DataObject) -> None:
        held = self._holding()
        if not held:
            return
        lease = data.draw(st.sampled_from(held))
        lease.expires_at = time.time() - 1  # its TTL ran out
        self.mgr.expire_now()
        assert lease.state is LeaseState.EXPIRED
        self._settle()

    @rule(vram=VRAM, gpus=st.integers(0, 3), priority=st.sampled_from([90, 100]),
          cooperate=st.booleans(), keep=st.booleans())
    def preempt(self, vram: int, gpus: int, priority: int, cooperate: bool,
                keep: bool) -> None:
        gpus = min(gpus, len(self.mgr.ledger.gpus))  # 0: a slice; N: N whole devices
        req = LeaseRequest("urgent", 0 if gpus else vram, gpus, None, priority,
                           30.0, False, 5.0)
        task = self.loop.create_task(self.mgr.acquire(req, 3600))
        self._run(asyncio.sleep(0))
        urgent = max(self.mgr.leases.values(), key=lambda lz: lz.seq)
        assert urgent.request is req
        victims = [lz for lz in self.mgr.leases.values()
                   if lz.state is LeaseState.PREEMPTING and lz.preempted_by == urgent.id]
        for v in victims:
            assert v.request.preemptible and v.request.priority < priority
            assert v.revoke_at is not None
            if cooperate:
                self.mgr.release(v.id, v.token)
            else:  # its grace ran out without a release
                v.revoke_at = time.time() - 1
                self.mgr.expire_now()
                assert v.state is LeaseState.REVOKED
        self._run(asyncio.sleep(0))
        if victims:
            assert urgent.state is LeaseState.GRANTED, "victims let go but urgent not granted"
        if urgent.state.holds:
            assert len(set(urgent.devices)) == max(gpus, 1)
        event(f"urgent gpus={gpus}: {len(victims)} victim(s), "
              f"{'granted' if urgent.state.holds else 'not granted'}")
        if not urgent.state.holds:
            # Nothing to preempt: end the wait now, as if wait_s had run out.
            urgent.granted.set()
            with pytest.raises(LeaseTimeout):
                self._run(task)
        else:
            assert self._run(task) is urgent
            if not keep:  # the urgent work is done: whoever it paused may come back
                self.mgr.release(urgent.id, urgent.token)
                assert not [lz for lz in self.mgr.leases.values()
                            if lz.preempted_by == urgent.id and lz.state.holds]
        self._settle()

    # -- invariants ------------------------------------------------------------------------

    @invariant()
    def never_over_committed(self) -> None:
        for acct in self.mgr.ledger.gpus.values():
            assert sum(h.vram_mb for h in acct.holdings.values()) <= acct.total_vram_mb

    @invariant()
    def ledger_matches_leases(self) -> None:
        in_ledger = {h.holder for h in self.mgr.ledger.holders()}
        holding = {lz.id for lz in self.mgr.leases.values() if lz.state.holds}
        assert in_ledger == holding

    @invariant()
    def waiting_and_holding_indexes_match_the_states(self) -> None:
        table = self.mgr.table_size()
        kept = list(self.mgr.leases.values())
        assert table["waiting"] == sum(lz.state is LeaseState.WAITING for lz in kept)
        assert table["holding"] == sum(lz.state.holds for lz in kept)
        assert table["ended"] == sum(lz.state.final for lz in kept)
        assert [lz.seq for lz in self.mgr.active()] == sorted(
            lz.seq for lz in kept if not lz.state.final)

    @invariant()
    def reservations_belong_to_waiting_leases(self) -> None:
        for d, owner in self.mgr._reserved.items():
            assert self.mgr.leases[owner].state is LeaseState.WAITING, (d, owner)

    @invariant()
    def grants_in_priority_order(self) -> None:
        assert not self.order_errors, self.order_errors

    @invariant()
    def ended_tokens_are_refused(self) -> None:
        for lz in self.granted:
            if lz.state.final:
                with pytest.raises(ConflictError):
                    self.mgr.renew(lz.id, lz.token)
                with pytest.raises(ConflictError):
                    self.mgr.release(lz.id, lz.token)


class ThreeGpuLeaseMachine(LeaseMachine):
    SPEC = "24GiB,24GiB,16GiB"


_SETTINGS = settings(max_examples=50, stateful_step_count=25, deadline=None,
                     suppress_health_check=[HealthCheck.too_slow])
LeaseMachine.TestCase.settings = _SETTINGS
ThreeGpuLeaseMachine.TestCase.settings = settings(_SETTINGS, max_examples=25)
TestTwoGpus = LeaseMachine.TestCase
TestThreeGpus = ThreeGpuLeaseMachine.TestCase
