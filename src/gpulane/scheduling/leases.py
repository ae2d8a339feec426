"""Leases: GPU capacity handed to outside services that drive the GPU themselves.

A lease is a claim on VRAM (or whole devices) with a priority, a TTL kept alive by renewals
and a fencing token that is never valid twice. Waiting requests are granted highest priority
first (oldest first among equals) as soon as they fit; an ``immediate`` request that cannot fit
asks lower-priority preemptible holders to step aside: a lease gets a ``preempt`` event and
grace_s to release, a task worker is drained and stopped, and whoever has not let go when the
grace ends is revoked. When the urgent lease ends, the holders it paused get ``resume``.

The table holds live leases, plus each ended one for ``FINAL_LINGER_S`` (at most
``FINAL_KEPT`` of them), so that its holder's GET or event stream still reads how it ended;
after that it is gone (404). Waiting and holding leases are kept apart as well, so granting
sorts only the waiting ones and the expiry tick reads only the holding ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import itertools
import logging
import os
import secrets
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from gpulane.config import DEFAULT_LEASE_GRACE_S, DEFAULT_LEASE_TTL_S
from gpulane.errors import ConflictError, NotFoundError, RequestError, UnavailableError
from gpulane.model import Priority
from gpulane.notify import Notifier
from gpulane.scheduling.lease_plans import cheapest as _cheapest
from gpulane.scheduling.lease_plans import plan_device as _plan_device
from gpulane.scheduling.ledger import Holding, Ledger

log = logging.getLogger("gpulane.leases")

TOKEN_RANDOM_BITS = 11
"""Random low bits of a lease token: milliseconds since the epoch stay below 2**42 until the
year 2109, so shifted by 11 the token stays below 2**53, JavaScript's largest exact integer."""
EXPIRY_TICK_S = 0.1
"""How often TTLs and grace deadlines are checked."""

FINAL_LINGER_S = 60.0
"""How long an ended lease stays readable (GET, its event stream) before it is dropped."""

FINAL_KEPT = 1000
"""Most ended leases kept lingering at once: past it the oldest go early."""


class LeaseState(str, enum.Enum):
    WAITING = "waiting"
    GRANTED = "granted"
    PREEMPTING = "preempting"  # asked to release; revoked at the end of its grace
    RELEASED = "released"
    EXPIRED = "expired"
    REVOKED = "revoked"
    TIMED_OUT = "timed_out"  # never granted within wait_s

    @property
    def final(self) -> bool:
        return self in (LeaseState.RELEASED, LeaseState.EXPIRED, LeaseState.REVOKED,
                        LeaseState.TIMED_OUT)

    @property
    def holds(self) -> bool:
        return self in (LeaseState.GRANTED, LeaseState.PREEMPTING)


@dataclass(frozen=True, slots=True)
class LeaseRequest:
    holder: str
    vram_mb: int = 0
    gpus: int = 0  # whole devices; 0 means a slice of vram_mb on one device
    device: int | None = None
    priority: int = Priority.NORMAL
    ttl_s: float = DEFAULT_LEASE_TTL_S
    preemptible: bool = True
    grace_s: float = DEFAULT_LEASE_GRACE_S
    owner: str | None = None  # the API key that took it: only that key may renew or release


@dataclass(eq=False, slots=True)
class Lease:
    id: str
    request: LeaseRequest
    seq: int
    state: LeaseState = LeaseState.WAITING
    token: int = 0
    devices: list[int] = field(default_factory=list)
    uuids: list[str] = field(default_factory=list)
    simulated: bool = False  # granted on simulated GPUs: no CUDA device stands behind them
    created_at: float = field(default_factory=time.time)
    granted_at: float | None = None
    expires_at: float | None = None  # wall clock
    revoke_at: float | None = None  # wall clock, while PREEMPTING
    preempted_by: str | None = None
    paused: set[str] = field(default_factory=set)  # holders this lease preempted
    awaiting_resume: bool = False  # preempted, and its preemptor has not ended yet
    events: list[dict[str, Any]] = field(default_factory=list)
    granted: asyncio.Event = field(default_factory=asyncio.Event)
    end_reason: str | None = None  # why the node ended it (a drain), not its holder or TTL

    def to_json(self) -> dict[str, Any]:
        r = self.request
        return {"id": self.id, "holder": r.holder, "state": self.state.value,
                "vram_mb": r.vram_mb, "gpus": r.gpus, "priority": r.priority,
                "preemptible": r.preemptible, "ttl_s": r.ttl_s, "grace_s": r.grace_s,
                "devices": self.devices, "uuids": self.uuids,
                "device": self.devices[0] if self.devices else None,
                "uuid": self.uuids[0] if self.uuids else None,
                "cuda_visible_devices": ",".join(str(d) for d in self.devices),
                "simulated": self.simulated,
                "token": self.token if self.state.holds else None,
                "created_at": self.created_at, "granted_at": self.granted_at,
                "expires_at": self.expires_at, "revoke_at": self.revoke_at,
                "preempted_by": self.preempted_by}


class LeaseTimeout(RequestError):
    status = 408


class LeaseManager:
    """Grants, renews, expires and preempts leases on one node's ledger."""

    def __init__(self, ledger: Ledger, *, on_change: Callable[[], None],
                 preempt_worker: Callable[[str, float], None]) -> None:
        self.ledger = ledger
        self.on_change = on_change
        self.preempt_worker = preempt_worker
        self.leases: dict[str, Lease] = {}
        """Every lease kept: the live ones and those that ended within the linger."""
        self._waiting: dict[str, Lease] = {}  # in request order (seq)
        self._held: dict[str, Lease] = {}  # GRANTED or PREEMPTING
        self._ended: deque[tuple[float, str]] = deque()  # (when, lease id), oldest first
        self.clock: Callable[[], float] = time.time
        """The wall clock of TTLs, graces and the linger (a test may set its own)."""
        self.notifier = Notifier()
        self._last_token_ms = 0  # the millisecond part of the last token given out
        self._seq = itertools.count(1)
        self._reserved: dict[int, str] = {}  # device -> the urgent lease it is cleared for
        self._ticker: asyncio.Task[None] | None = None
        self.preemptions: dict[str, int] = {}  # by holder kind (lease, worker): the metrics
        self.mirror: Callable[[Lease], None] | None = None
        """Told of every change to a lease (the fleet's lease book copies them); None on a
        node of its own."""

    # -- requests ----------------------------------------------------------------------------

    def check(self, req: LeaseRequest) -> None:
        """Refuse a well-formed request this node cannot serve, naming the field (the API's
        request models have checked each field's type and bounds)."""
        if req.device is not None and req.device not in self.ledger.gpus:
            raise NotFoundError("unknown_device", f"device={req.device} is not a GPU of this "
                                f"node: use one of {sorted(self.ledger.gpus)}", field="device")
        largest = max((g.total_vram_mb for g in self.ledger.gpus.values()), default=0)
        if req.vram_mb > largest:
            raise RequestError("vram_exceeds_devices", f"vram_mb={req.vram_mb} is more than "
                               f"the largest GPU here ({largest} MB): ask for at most "
                               f"{largest}", field="vram_mb",
                               extra={"largest_device_mb": largest})
        if req.gpus > len(self.ledger.gpus):
            raise RequestError("not_enough_gpus", f"gpus={req.gpus} but this node has "
                               f"{len(self.ledger.gpus)}: ask for at most "
                               f"{len(self.ledger.gpus)}", field="gpus",
                               extra={"gpus_here": len(self.ledger.gpus)})

    async def acquire(self, req: LeaseRequest, wait_s: float) -> Lease:
        """Grant now, or wait up to wait_s (preempting for an immediate request)."""
        lease = Lease(f"lease-{os.urandom(6).hex()}", req, next(self._seq))
        self.leases[lease.id] = self._waiting[lease.id] = lease
        self._event(lease, "waiting", {})
        self.grant()
        if not lease.state.holds and req.priority >= Priority.IMMEDIATE:
            self._preempt_for(lease)
            self.grant()
        if not lease.state.holds:
            try:
                with contextlib.suppress(TimeoutError):  # not granted in time: 408 below
                    async with asyncio.timeout(wait_s):
                        await lease.granted.wait()
            except asyncio.CancelledError:  # the caller left: grant this to nobody
                self.end(lease, LeaseState.RELEASED if lease.state.holds  # granted as it left
                         else LeaseState.TIMED_OUT)
                raise
        if not lease.state.holds and lease.state.final:  # ended while it waited (a drain)
            raise UnavailableError(
                "lease_ended", f"lease {lease.id} was ended before it was granted: "
                f"{lease.end_reason}; ask again (another node can serve it)", field="wait_s",
                headers={"Retry-After": "1"})
        if not lease.state.holds:
            self._set_final(lease, LeaseState.TIMED_OUT)
            self._unreserve(lease.id)
            self._resume_paused(lease)
            raise LeaseTimeout(
                "lease_wait_timeout", f"no room for {_describe(req)} within wait_s={wait_s:g}: "
                "wait longer, ask for less, or raise the priority",
                field="wait_s", extra={"holders": self.holders_summary()})
        return lease

    def renew(self, lease_id: str, token: object) -> Lease:
        lease = self._holding(lease_id, token)
        lease.expires_at = self.clock() + lease.request.ttl_s
        if self.mirror is not None:
            self.mirror(lease)
        return lease

    def release(self, lease_id: str, token: object) -> Lease:
        lease = self._holding(lease_id, token)
        self.end(lease, LeaseState.RELEASED)
        return lease

    def get(self, lease_id: str) -> Lease:
        lease = self.leases.get(lease_id)
        if lease is None:
            raise NotFoundError("unknown_lease", f"no lease with id {lease_id!r} (an ended "
                                f"lease is kept {FINAL_LINGER_S:g} s)", field="id")
        return lease

    def _holding(self, lease_id: str, token: object) -> Lease:
        lease = self.get(lease_id)
        if not lease.state.holds or token != lease.token:
            raise ConflictError(
                "stale_token", f"token {token!r} does not hold lease {lease_id} (it is "
                f"{lease.state.value}): acquire a new lease", field="token")
        return lease

    # -- granting ----------------------------------------------------------------------------

    def grant(self) -> None:
        """Grant every waiting request that fits, highest priority first, oldest first."""
        waiting = sorted(self._waiting.values(), key=lambda lz: (-lz.request.priority, lz.seq))
        for lease in waiting:
            devices = self._place(lease)
            if devices is None:
                continue
            if not self._take(lease, devices):  # pragma: no cover - _place offers room
                continue
            lease.token = self._next_token()
            del self._waiting[lease.id]
            lease.granted_at = self.clock()
            lease.expires_at = lease.granted_at + lease.request.ttl_s
            self._unreserve(lease.id)
            self._event(lease, "granted", {"devices": devices, "uuids": lease.uuids})
            lease.granted.set()
            log.info("lease %s granted to %s on %s", lease.id, lease.request.holder, devices)

    def _take(self, lease: Lease, devices: list[int]) -> bool:
        """Hold ``devices`` in the ledger for ``lease`` and mark it granted there."""
        req = lease.request
        if req.gpus:
            ok = self.ledger.acquire_whole(lease.id, devices, priority=req.priority,
                                           preemptible=req.preemptible, kind="lease")
        else:
            ok = self.ledger.acquire(lease.id, devices[0], req.vram_mb, priority=req.priority,
                                     preemptible=req.preemptible, kind="lease")
        if ok:
            lease.devices = devices
            lease.uuids = [self.ledger.gpus[d].uuid for d in devices]
            lease.simulated = any(self.ledger.gpus[d].simulated for d in devices)
            lease.state = LeaseState.GRANTED
            self._held[lease.id] = lease
        return ok

    def fits_now(self, req: LeaseRequest) -> bool:
        """Whether ``req`` would be granted at once (no preemption, no wait)."""
        return self._place(Lease("", req, 0)) is not None

    def adopt(self, lease_id: str, req: LeaseRequest, *, devices: list[int], token: int,
              created_at: float, granted_at: float | None, expires_at: float,
              events: list[dict[str, Any]]) -> Lease | None:
        """Hold again a lease that this node granted before it restarted: same id, token,
        devices and expiry, its events kept (new ones number on). None when its devices are
        not here or have no room for it now."""
        if not devices or any(d not in self.ledger.gpus for d in devices):
            return None
        lease = Lease(lease_id, req, next(self._seq), created_at=created_at,
                      events=list(events))
        if not self._take(lease, devices):
            return None
        lease.token, lease.granted_at, lease.expires_at = token, granted_at, expires_at
        # Tokens given from now on stay above the adopted one.
        self._last_token_ms = max(self._last_token_ms, token >> TOKEN_RANDOM_BITS)
        self.leases[lease_id] = lease
        lease.granted.set()
        return lease

    def end_all(self, reason: str, *, held_too: bool = True) -> int:
        """End every waiting lease (timed out), then unless ``held_too`` is False every held
        one (revoked), ``reason`` in each one's event: the node drains or stops. How many."""
        waiting = list(self._waiting.values())
        held = list(self._held.values()) if held_too else []
        for lease in waiting:
            lease.end_reason = reason
            self._set_final(lease, LeaseState.TIMED_OUT, reason)
            self._unreserve(lease.id)
            self._resume_paused(lease)
            lease.granted.set()  # its acquire returns now, refused
        for lease in held:
            lease.end_reason = reason
            self.end(lease, LeaseState.REVOKED, reason)
        return len(waiting) + len(held)

    def _place(self, lease: Lease) -> list[int] | None:
        req = lease.request
        usable = [d for d in self.ledger.gpus
                  if self._reserved.get(d, lease.id) == lease.id
                  and (req.device is None or d == req.device)]
        if req.gpus:
            empty = [d for d in self.ledger.empty_devices() if d in usable]
            return empty[:req.gpus] if len(empty) >= req.gpus else None
        for d in self.ledger.fits(req.vram_mb):
            if d in usable:
                return [d]
        return None

    def _next_token(self) -> int:
        """A fencing token above every one given before: milliseconds since the epoch (one
        more than the last when grants come faster) with TOKEN_RANDOM_BITS random low bits.
        Below 2**53, so JavaScript reads it exactly; the random bits keep a neighbour's
        token from being the next integer down (ownership itself rests on the API key)."""
        ms = max(int(time.time() * 1000), self._last_token_ms + 1)
        self._last_token_ms = ms
        return (ms << TOKEN_RANDOM_BITS) | secrets.randbits(TOKEN_RANDOM_BITS)

    def reserved_devices(self) -> set[int]:
        """Devices being cleared for an urgent lease: task placement keeps off them."""
        return set(self._reserved)

    def _unreserve(self, lease_id: str) -> None:
        for d in [d for d, owner in self._reserved.items() if owner == lease_id]:
            del self._reserved[d]

    # -- preemption --------------------------------------------------------------------------

    def _preempt_for(self, lease: Lease) -> None:
        """Ask the cheapest set of lower-priority preemptible holders to make room.

        A slice request (vram_mb) needs room on one device; ``gpus: N`` needs N devices
        cleared whole. Each device that could be made ready has a plan (the holders to pause
        on it; none for a device that is already empty), and the chosen set of devices is the
        one whose plans together pause the cheapest set of holders: lowest sum of their
        priorities, then fewest holders, then lowest device indexes. A holder that spans
        several devices (a whole-GPU lease or a multi-GPU worker) counts once, so clearing
        every device it holds costs no more than clearing one of them. Devices being cleared
        for another urgent lease are left alone. If no set is possible, nothing is paused and
        the request just waits.
        """
        req = lease.request
        plans: dict[int, list[Holding]] = {}
        for d, acct in self.ledger.gpus.items():
            if req.device is not None and d != req.device:
                continue
            if self._reserved.get(d, lease.id) != lease.id:
                continue  # being cleared for another urgent lease
            plan = _plan_device(acct, vram_mb=req.vram_mb, gpus=req.gpus,
                                priority=req.priority)
            if plan is not None:
                plans[d] = plan
        picked = _cheapest(plans, max(req.gpus, 1))
        if picked is None:
            return
        devices, chosen = picked
        for d in devices:
            self._reserved[d] = lease.id
        for h in chosen:
            lease.paused.add(h.holder)
            if h.kind == "lease":
                victim = self.leases[h.holder]
                if victim.state is LeaseState.PREEMPTING:
                    continue  # already asked by another urgent lease: its grace stands
                victim.state = LeaseState.PREEMPTING
                victim.preempted_by = lease.id
                victim.awaiting_resume = True
                victim.revoke_at = self.clock() + victim.request.grace_s
                self._event(victim, "preempt", {"by": lease.id, "grace_s":
                                                victim.request.grace_s})
                log.info("lease %s preempted by %s (grace %.1fs)", victim.id, lease.id,
                         victim.request.grace_s)
            else:
                log.info("worker %s preempted by lease %s", h.holder, lease.id)
                self.preempt_worker(h.holder, req.grace_s)
            self.preemptions[h.kind] = self.preemptions.get(h.kind, 0) + 1

    # -- endings -----------------------------------------------------------------------------

    def end(self, lease: Lease, state: LeaseState, reason: str | None = None) -> None:
        """End ``lease`` now: its devices go back, an acquire waiting on it returns."""
        lease.granted.set()
        self.ledger.release(lease.id)
        self._set_final(lease, state, reason)
        self._unreserve(lease.id)
        self._resume_paused(lease)
        self.on_change()
        self.grant()

    def _resume_paused(self, lease: Lease) -> None:
        """The urgent lease is over: tell the leases it paused that they may come back."""
        for holder in lease.paused:
            paused = self.leases.get(holder)
            if paused is not None and not any(
                    holder in other.paused for other in self._live() if other is not lease):
                # (A lease that another live urgent lease also paused waits for that one.)
                paused.awaiting_resume = False
                if paused.state is LeaseState.PREEMPTING:  # it never had to let go
                    paused.state = LeaseState.GRANTED
                    paused.revoke_at = None
                    paused.preempted_by = None
                self._event(paused, "resume", {"after": lease.id})
        lease.paused.clear()

    def _set_final(self, lease: Lease, state: LeaseState, reason: str | None = None) -> None:
        lease.state = state
        self._waiting.pop(lease.id, None)
        self._held.pop(lease.id, None)
        self._ended.append((self.clock(), lease.id))
        self._event(lease, state.value, {"reason": reason} if reason else {})
        self._drop_ended(self.clock())

    def _drop_ended(self, now: float) -> None:
        """Drop ended leases past their linger, and the oldest past ``FINAL_KEPT``. One that
        a live urgent lease paused stays until its ``resume`` is written (its holder waits
        for it), then lingers anew."""
        for _ in range(len(self._ended)):
            ended_at, lease_id = self._ended[0]
            if ended_at + FINAL_LINGER_S > now and len(self._ended) <= FINAL_KEPT:
                break
            self._ended.popleft()
            lease = self.leases.get(lease_id)
            if lease is None:
                continue
            if lease.awaiting_resume:
                self._ended.append((now, lease_id))
                continue
            del self.leases[lease_id]
            self.notifier.forget(lease_id)

    def _live(self) -> Iterable[Lease]:
        yield from self._waiting.values()
        yield from self._held.values()

    def expire_now(self) -> None:
        """End every lease whose TTL or grace has run out (also run by the ticker), and drop
        ended leases past their linger. Reads the holding leases only."""
        now = self.clock()
        self._drop_ended(now)
        for lease in list(self._held.values()):
            if lease.state is LeaseState.PREEMPTING and lease.revoke_at and now >= lease.revoke_at:
                log.warning("lease %s revoked: it did not release within its grace", lease.id)
                self.end(lease, LeaseState.REVOKED)
            elif lease.state.holds and lease.expires_at and now >= lease.expires_at:
                log.info("lease %s expired: not renewed within ttl_s", lease.id)
                self.end(lease, LeaseState.EXPIRED)

    def start(self) -> None:
        self._ticker = asyncio.create_task(self._tick(), name="gpulane-leases")

    async def stop(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(EXPIRY_TICK_S)
            self.expire_now()

    # -- views -------------------------------------------------------------------------------

    def _event(self, lease: Lease, kind: str, data: dict[str, Any]) -> None:
        lease.events.append({"id": len(lease.events) + 1, "event": kind,
                             "data": {"lease": lease.id, "state": lease.state.value, **data},
                             "ts": time.time()})
        self.notifier.notify(lease.id)
        if self.mirror is not None:
            self.mirror(lease)

    def holders_summary(self) -> list[dict[str, Any]]:
        return [{"device": h.device, "holder": h.holder, "kind": h.kind, "vram_mb": h.vram_mb,
                 "priority": h.priority, "preemptible": h.preemptible}
                for h in self.ledger.holders()]

    def active(self) -> list[Lease]:
        return sorted(self._live(), key=lambda lz: lz.seq)

    def table_size(self) -> dict[str, int]:
        """What the table holds: live leases by kind, and ended ones lingering."""
        return {"waiting": len(self._waiting), "holding": len(self._held),
                "ended": len(self.leases) - len(self._waiting) - len(self._held),
                "notifier": len(self.notifier)}


def _describe(req: LeaseRequest) -> str:
    return f"{req.gpus} whole GPU(s)" if req.gpus else f"{req.vram_mb} MB of VRAM"

