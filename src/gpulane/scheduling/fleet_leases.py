"""Leases across the fleet: the node's one front for leases, whichever node's GPUs they hold.

A lease lives on ONE node, the one whose devices it holds: that node's LeaseManager is the
authority for it (granting, preemption, expiry, in memory and synchronous, as on a node of
its own). On a shared fleet (Redis) every change is also written to the fleet's lease book
by one ordered background writer (lease_mirror.py), so any node reads any lease, follows its
events, and routes a renew or release to its node:

- acquire: served here when no node is named (or this one is) and this node can serve it,
  unless another live node has room now and this one has not; else by the named node, or the
  live node that could serve it (enough GPUs, largest free VRAM), through ``fleet.call``. The
  answer (with the token, its only appearance) waits until the book has the lease, so a
  renew through any node finds it.
- renew, release: by the lease's node (this one, or ``fleet.call`` to the one the book names).
- get, list: this node's own leases from memory, the others' from the book.
- follow: a lease of this node from memory; another's from the book, so a holder connected to
  node C sees the ``preempt`` and ``resume`` of its lease on node B.

Failures (for docs/fleet.md): a node that restarts adopts the leases it held from the book
(same token and expiry; a lapsed one ends ``expired``, a waiting one ``timed_out``: its caller
is gone). A dead node's live leases end ``expired`` with the reason ``node_lost`` when the
housekeeper of a live node takes its work over (``on_node_dead``); that end is fenced: if
the node was alive after all (a stalled heartbeat), the book refuses its next save of the
lease and the node ends it too (``_fenced``), so no lease the fleet saw end lives on; a
lease nobody renews is ended so within ``FENCE_CHECK_S`` (``check_fence``). A drain
ends every lease here (``release_all``: held ones ``revoked``, waiting ones ``timed_out``, the
reason in the event). While the book is unreachable, this node's leases go on in memory and
are saved when it is back; renews and releases of other nodes' leases answer 503 meanwhile.
An acquire forwarded to a node whose caller leaves (or that got no answer in time) is called
off there (``lease.abandon``, lease_forwards.py): a waiting one ends ``timed_out``, one
granted meanwhile ``released``; only if that call fails too does it end at its ttl_s.

On a node of its own (SQLite, LocalFleet) nothing is mirrored: everything is served from the
LeaseManager as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from gpulane.errors import ConflictError, NotFoundError, RequestError, UnavailableError
from gpulane.fleet import Fleet, NodeInfo
from gpulane.scheduling.lease_forwards import Abandoned, Forwards
from gpulane.scheduling.lease_mirror import LeaseMirror
from gpulane.scheduling.leases import (
    FINAL_LINGER_S,
    Lease,
    LeaseManager,
    LeaseRequest,
    LeaseState,
)

log = logging.getLogger("gpulane.leases")

CALL_SLACK_S = 5.0
"""Added to wait_s for an acquire forwarded to another node: its answer's time on the way."""
CALL_TIMEOUT_S = 10.0
"""Longest a renew or release forwarded to the lease's node may take."""
SETTLE_S = 2.0
"""Longest an acquire or release waits for the book to have the lease before answering."""
STOP_FLUSH_S = 5.0
"""Longest a stopping node spends saving its last lease changes."""
DRAINING_RETRY_S = 30
"""Retry-After of a lease refused by a draining node with no other node to send it to."""
FENCE_CHECK_S = 1.0
"""How often this node looks in the book for held leases another node ended there."""
RESTORE_RETRY_MAX_S = 5.0
"""Longest wait between tries to read this node's leases back while the book is away."""
BOOK_ONLY = ("token", "awaiting_resume", "event_count", "asked_device", "ended_by")
"""Fields the book keeps that no API answer shows (the token is the holder's secret)."""
HOLDING = (LeaseState.GRANTED.value, LeaseState.PREEMPTING.value)
"""States in which a lease holds its devices."""

Op = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]
"""One call another node may make to this one: payload in, answer out."""


def public(record: dict[str, Any]) -> dict[str, Any]:
    """A lease as any caller with the leases scope sees it: never its token."""
    return {k: v for k, v in record.items() if k not in BOOK_ONLY}


def _unknown(lease_id: str) -> NotFoundError:
    return NotFoundError("unknown_lease", f"no lease with id {lease_id!r} (an ended lease is "
                         f"kept {FINAL_LINGER_S:g} s)", field="id")


class FleetLeases:
    """This node's leases, and its way to every other node's (see the module docstring)."""

    def __init__(self, manager: LeaseManager, fleet: Fleet, name: str) -> None:
        self.manager = manager
        self.fleet = fleet
        self.name = name
        self.shared = bool(getattr(fleet, "shared", False))
        self.mirror = LeaseMirror(fleet, self.record) if self.shared else None
        self._restorer: asyncio.Task[None] | None = None
        self._watcher: asyncio.Task[None] | None = None
        self.forwards = Forwards(self._release_abandoned)
        """Acquires other nodes forwarded here, by ref: an abandoned one is called off."""
        self._abandons: set[asyncio.Task[None]] = set()
        self.draining: Callable[[], bool] = lambda: False
        """Whether this node drains: it grants no new leases then (the node sets it)."""

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Take back this node's leases from the book (a restart), then run."""
        if self.mirror is not None:
            self.manager.mirror = self.mirror.mark
            self.mirror.on_fenced = self._fenced
            self.mirror.start()
            try:
                await self._restore()
            except Exception as exc:  # the book is away: start anyway, read them back later
                log.warning("could not read this node's leases back from the book (%s): "
                            "trying again in the background", exc)
                self._restorer = asyncio.create_task(self._restore_later(),
                                                     name="gpulane-lease-restore")
            self._watcher = asyncio.create_task(self._watch_book(),
                                                name="gpulane-lease-fence")
        self.manager.start()

    async def _watch_book(self) -> None:
        """Every ``FENCE_CHECK_S``, end here the held leases that another node ended in the
        book (it took this node for dead: a stalled heartbeat), as a refused save would, so a
        lease nobody renews does not hold its devices here until its ttl_s."""
        while True:
            await asyncio.sleep(FENCE_CHECK_S)
            with contextlib.suppress(Exception):  # the book is away: look again later
                await self.check_fence()

    async def check_fence(self) -> int:
        """End the held leases the book has ended by another node; how many."""
        held = [lz for lz in self.manager.active() if lz.state.holds]
        if not held:
            return 0
        live = {str(r["id"]) for r in await self.fleet.leases(node=self.name)}
        ended = 0
        for lease in held:
            if lease.id in live:
                continue
            record = await self.fleet.lease(lease.id)  # None: granted, not saved yet
            if record is not None and record.get("ended_by") and lease.state.holds:
                self._fenced(lease)
                ended += 1
        return ended

    async def _restore_later(self) -> None:
        wait_s = 0.1
        while True:
            await asyncio.sleep(wait_s)
            try:
                await self._restore()
            except Exception:  # still away
                wait_s = min(wait_s * 2, RESTORE_RETRY_MAX_S)
            else:
                log.info("leases of node %s read back from the book", self.name)
                return

    async def stop(self) -> None:
        """Stop, refusing the waiting requests (their callers get a 503 now); held leases
        stay in the book for this node to take back when it starts again."""
        for task in (self._restorer, self._watcher):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self.manager.end_all(f"node {self.name} stopped", held_too=False)
        await self.manager.stop()
        if self.mirror is not None:
            await self.mirror.stop(STOP_FLUSH_S)

    def ops(self) -> dict[str, Op]:
        """The calls other nodes make to this one, for the node's call dispatcher."""
        return {"lease.acquire": self._op_acquire, "lease.renew": self._op_renew,
                "lease.release": self._op_release, "lease.abandon": self._op_abandon}

    # -- views -------------------------------------------------------------------------------

    def view(self, lease: Lease) -> dict[str, Any]:
        """A lease of this node as the API shows it (its node and owner; no token)."""
        return public(self.record(lease))

    def record(self, lease: Lease) -> dict[str, Any]:
        """A lease as the book keeps it: the public view, its token and what a restart or a
        follower on another node needs."""
        return {**lease.to_json(), "node": self.name, "owner": lease.request.owner,
                "token": lease.token, "awaiting_resume": lease.awaiting_resume,
                "event_count": len(lease.events), "asked_device": lease.request.device}

    async def get(self, lease_id: str) -> dict[str, Any]:
        lease = self.manager.leases.get(lease_id)
        if lease is not None:
            return self.view(lease)
        return public(await self._book(lease_id))

    async def active(self) -> list[dict[str, Any]]:
        """Leases waiting or held: this node's, then (on a shared fleet) the others'."""
        mine = [self.view(lz) for lz in self.manager.active()]
        if not self.shared:
            return mine
        others = [public(r) for r in await self.fleet.leases() if r.get("node") != self.name]
        return sorted([*mine, *others], key=lambda v: float(v.get("created_at") or 0))

    async def _book(self, lease_id: str) -> dict[str, Any]:
        record = await self.fleet.lease(lease_id) if self.shared else None
        if record is None:
            raise _unknown(lease_id)
        return record

    # -- requests ----------------------------------------------------------------------------

    async def acquire(self, req: LeaseRequest, wait_s: float,
                      node: str | None = None) -> dict[str, Any]:
        """Grant a lease here or on another node; the lease with its token."""
        target = await self._target(req, node)
        if target != self.name:
            ref = uuid.uuid4().hex
            try:
                return await self.fleet.call(
                    target, "lease.acquire", {"request": dataclasses.asdict(req),
                                              "wait_s": wait_s, "ref": ref},
                    timeout_s=wait_s + CALL_SLACK_S)
            except asyncio.CancelledError:  # the caller left: call it off there
                self._abandon(target, ref)
                raise
            except UnavailableError as exc:
                if exc.code == "node_unreachable":  # no answer: it may still be granted there
                    self._abandon(target, ref)
                raise
        if self.draining():
            raise UnavailableError(
                "draining", f"node {self.name} is draining and grants no new leases: ask "
                f"another node's GPUs (leave node out, or name one GET /v1/nodes lists), or "
                f"retry after {DRAINING_RETRY_S} s", field="node",
                headers={"Retry-After": str(DRAINING_RETRY_S)})
        self.manager.check(req)
        lease = await self.manager.acquire(req, wait_s)
        if self.mirror is not None:
            await self.mirror.settled(lease.id, SETTLE_S)
        return {**self.view(lease), "token": lease.token}

    async def _target(self, req: LeaseRequest, node: str | None) -> str:
        """The node to ask: the named one; else this one if it can serve the request and no
        other has room now while this one has not; else the live node that could."""
        if node is not None or not self.shared:
            return node or self.name
        try:
            self.manager.check(req)
        except RequestError as exc:
            refusal: RequestError | None = exc
        else:
            refusal = None
            if self.draining():
                refusal = UnavailableError(
                    "draining", f"node {self.name} is draining and no other live node can "
                    f"serve this lease now: retry after {DRAINING_RETRY_S} s",
                    headers={"Retry-After": str(DRAINING_RETRY_S)})
            elif self.manager.fits_now(req):
                return self.name
        others = [n for n in await self.fleet.nodes()
                  if n.name != self.name and not n.draining and _could(n, req)]
        roomy = [n for n in others if _room_now(n, req)]
        if refusal is None and not roomy:
            return self.name
        if not (roomy or others):
            assert refusal is not None
            raise refusal
        return max(roomy or others, key=_free_mb).name

    async def renew(self, lease_id: str, token: int) -> dict[str, Any]:
        if lease_id in self.manager.leases:
            return self.view(self.manager.renew(lease_id, token))
        return await self._forward("lease.renew", lease_id, token)

    async def release(self, lease_id: str, token: int) -> dict[str, Any]:
        if lease_id in self.manager.leases:
            lease = self.manager.release(lease_id, token)
            if self.mirror is not None:
                await self.mirror.settled(lease.id, SETTLE_S)
            return self.view(lease)
        return await self._forward("lease.release", lease_id, token)

    async def _forward(self, op: str, lease_id: str, token: int) -> dict[str, Any]:
        record = await self._book(lease_id)
        owner = str(record.get("node"))
        if owner == self.name:  # the book is ahead of a table that has dropped it
            raise _unknown(lease_id)
        return await self.fleet.call(owner, op, {"id": lease_id, "token": token},
                                     timeout_s=CALL_TIMEOUT_S)

    # -- calls from other nodes ----------------------------------------------------------------

    async def _op_acquire(self, payload: dict[str, Any]) -> dict[str, Any]:
        req = LeaseRequest(**payload["request"])
        wait_s = float(payload["wait_s"])
        if payload.get("ref") is None:
            return await self.acquire(req, wait_s, node=self.name)
        try:
            return await self.forwards.serve(
                str(payload["ref"]), lambda: self.acquire(req, wait_s, node=self.name))
        except Abandoned:
            raise UnavailableError("lease_abandoned", "the caller of this lease request left "
                                   "before it was served: ask again", field="wait_s",
                                   headers={"Retry-After": "1"}) from None

    async def _op_abandon(self, payload: dict[str, Any]) -> dict[str, Any]:
        return {"ref": payload["ref"], "was": self.forwards.abandon(str(payload["ref"]))}

    def _abandon(self, node: str, ref: str) -> None:
        """Tell ``node`` that the caller of the acquire ``ref`` left (in the background: the
        caller is gone, nobody waits for this)."""
        async def tell() -> None:
            try:
                await self.fleet.call(node, "lease.abandon", {"ref": ref},
                                      timeout_s=CALL_TIMEOUT_S)
            except Exception as exc:  # it ends at its ttl_s then
                log.warning("could not call off a lease request on node %s whose caller "
                            "left (%s): a lease granted to it ends at its ttl_s", node, exc)
        task = asyncio.create_task(tell(), name="gpulane-lease-abandon")
        self._abandons.add(task)
        task.add_done_callback(self._abandons.discard)

    def _release_abandoned(self, lease_id: str, token: int) -> None:
        """End a lease granted to a forwarded acquire whose caller left: nobody has its
        token, so nobody would renew or release it."""
        lease = self.manager.leases.get(lease_id)
        if lease is not None and lease.state.holds and lease.token == token:
            lease.end_reason = "its caller left before the grant reached it"
            self.manager.end(lease, LeaseState.RELEASED, lease.end_reason)

    async def _op_renew(self, payload: dict[str, Any]) -> dict[str, Any]:
        return await self.renew(str(payload["id"]), int(payload["token"]))

    async def _op_release(self, payload: dict[str, Any]) -> dict[str, Any]:
        return await self.release(str(payload["id"]), int(payload["token"]))

    # -- events ------------------------------------------------------------------------------

    async def follow(self, lease_id: str, after: int, quiet_s: float
                     ) -> AsyncIterator[list[dict[str, Any]]]:
        """The lease's events after number ``after`` in batches, an empty batch after
        ``quiet_s`` without one; ends once the lease is final (a preempted holder's stream
        stays open until its ``resume``). NotFoundError before the first batch if unknown."""
        if lease_id in self.manager.leases or not self.shared:
            async for batch in self._follow_here(lease_id, after, quiet_s):
                yield batch
            return
        await self._book(lease_id)
        async for batch in self.fleet.follow_lease(lease_id, after, quiet_s):
            if batch:
                after = int(batch[-1]["id"])
                yield batch
            else:
                yield []
            record = await self.fleet.lease(lease_id)
            if record is None or (LeaseState(record["state"]).final
                                  and not record.get("awaiting_resume")
                                  and after >= int(record.get("event_count", 0))):
                return

    async def _follow_here(self, lease_id: str, after: int, quiet_s: float
                           ) -> AsyncIterator[list[dict[str, Any]]]:
        leases = self.manager
        while True:
            seen = leases.notifier.version(lease_id)
            lease = leases.get(lease_id)
            fresh = lease.events[after:]
            if fresh:
                after = fresh[-1]["id"]
                yield fresh
            if lease.state.final and after >= len(lease.events) and not lease.awaiting_resume:
                return
            if not await leases.notifier.wait(lease_id, seen, quiet_s):
                yield []

    # -- endings the fleet decides -------------------------------------------------------------

    async def release_all(self, reason: str) -> int:
        """End every lease of this node, held (revoked) or waiting (timed out), ``reason`` in
        the event; the book has them before this returns. The node drains to exit."""
        ended = self.manager.end_all(reason)
        if self.mirror is not None:
            await self.mirror.settled(None, STOP_FLUSH_S)
        return ended

    async def on_node_dead(self, name: str) -> None:
        """Node ``name`` is lost (the housekeeper took its work over): its live leases end
        ``expired`` in the book with an event that says so, for their holders following
        from other nodes."""
        if not self.shared or name == self.name:
            return
        for record in await self.fleet.leases(node=name):
            await self._end_in_book(record, LeaseState.EXPIRED,
                                    {"reason": "node_lost", "node": name})

    async def _restore(self) -> None:
        """Take back the leases this node held before it restarted; end the others."""
        now = self.manager.clock()
        for record in await self.fleet.leases(node=self.name):
            try:
                await self._restore_one(record, now)
            except (KeyError, TypeError, ValueError) as exc:  # not a lease this code wrote
                log.warning("lease %r in the book is malformed (%s: %s): left as it is",
                            record.get("id"), type(exc).__name__, exc)

    async def _restore_one(self, record: dict[str, Any], now: float) -> None:
        """Take back one lease of the book, or end it there."""
        if record["id"] in self.manager.leases:
            return  # taken back by an earlier try
        if record["state"] in HOLDING and float(record.get("expires_at") or 0) > now:
            events = await self.fleet.lease_events(record["id"])
            lease = self.manager.adopt(
                record["id"], _request(record), devices=list(record["devices"]),
                token=int(record["token"]), created_at=float(record["created_at"]),
                granted_at=record.get("granted_at"),
                expires_at=float(record["expires_at"]), events=events)
            if lease is not None:
                assert self.mirror is not None
                self.mirror.adopt(lease)
                self.mirror.mark(lease)  # a preempting one is plainly granted now
                return
            why = "its devices have no room for it on this node any more"
            await self._end_in_book(record, LeaseState.EXPIRED, {"reason": why})
        elif record["state"] in HOLDING:
            await self._end_in_book(record, LeaseState.EXPIRED, {
                "reason": f"not renewed within ttl_s while node {self.name} restarted"})
        else:
            await self._end_in_book(record, LeaseState.TIMED_OUT, {
                "reason": f"node {self.name} restarted while it waited"})

    async def _end_in_book(self, record: dict[str, Any], state: LeaseState,
                           data: dict[str, Any]) -> None:
        """End a lease that no live manager holds: in the book only, signed ``ended_by``
        this node so that its own node, alive after all, cannot save it back (fenced)."""
        number = int(record.get("event_count", 0)) + 1
        event = {"id": number, "event": state.value,
                 "data": {"lease": record["id"], "state": state.value, **data},
                 "ts": time.time()}
        ended = {**record, "state": state.value, "token": None, "awaiting_resume": False,
                 "event_count": number, "ended_by": self.name}
        with contextlib.suppress(ConflictError):  # another node ended it first: that stands
            await self.fleet.save_lease(ended, [event], FINAL_LINGER_S)

    def _fenced(self, lease: Lease) -> None:
        """The book refused a save of ``lease``: another node ended it there, taking this
        node for dead (a stalled heartbeat). End it here too, so its devices are free and
        its holder's renew is refused, as the fleet already told its followers."""
        if not lease.state.final:
            lease.end_reason = "ended in the lease book by another node (node_lost)"
            self.manager.end(lease, LeaseState.EXPIRED, lease.end_reason)


def _request(record: dict[str, Any]) -> LeaseRequest:
    """The request behind a lease as the book keeps it."""
    return LeaseRequest(
        holder=record["holder"], vram_mb=int(record["vram_mb"]), gpus=int(record["gpus"]),
        device=record.get("asked_device"), priority=int(record["priority"]),
        ttl_s=float(record["ttl_s"]), preemptible=bool(record["preemptible"]),
        grace_s=float(record["grace_s"]), owner=record.get("owner"))


def _could(node: NodeInfo, req: LeaseRequest) -> bool:
    """Whether ``node`` could ever serve ``req`` (its GPUs, as it registered them)."""
    devices = [d for d in node.devices if req.device is None or d.get("index") == req.device]
    if req.gpus:
        return len(devices) >= req.gpus
    return any(int(d.get("total_vram_mb", 0)) >= req.vram_mb for d in devices)


def _room_now(node: NodeInfo, req: LeaseRequest) -> bool:
    """Whether ``node`` had room for ``req`` at its last heartbeat."""
    devices = [d for d in node.devices if req.device is None or d.get("index") == req.device]
    free = [int(d.get("schedulable_free_vram_mb", 0)) for d in devices]
    if req.gpus:
        whole = [f for f, d in zip(free, devices, strict=True)
                 if f >= int(d.get("total_vram_mb", 0)) > 0]
        return len(whole) >= req.gpus
    return any(f >= req.vram_mb for f in free)


def _free_mb(node: NodeInfo) -> int:
    return sum(int(d.get("schedulable_free_vram_mb", 0)) for d in node.devices)
