"""The node's housekeeping: heartbeats for the attempts it holds, the reaper of attempts nobody
holds any more, and retention of finished work.

Two loops, each surviving any error of the store (logged, tried again next round):

- every ``claim_ttl_s / 3`` the attempts the runtime still holds (``held()``: task id and
  fencing token) are heartbeat, then every ``running`` attempt of any node unheard of for
  ``claim_ttl_s`` is reaped (arq's TTL'd in-progress key, as a column). A run whose outcome
  could not be stored is forgotten by the runtime, so it stops being heartbeat and is reaped
  and run again: execution is at least once, and the recorded outcome exactly once per
  fencing token (a late finish of a reaped attempt is refused as stale). A reaped attempt is
  spent (it ran, and may be what wedged its worker); a node restart's ``recover`` gives its
  attempts back instead.
- every ``purge_every_s`` finished tasks older than ``retain_s`` are purged with their events
  and idempotency keys (the store does it off the event loop in small transactions), and so
  are scratch files older than ``retain_s``, and (``purge_uploads``) uploads past their
  expiry (``file_retain_s`` after upload) with a crashed upload's leftovers.

It knows the runtime only through the ``held`` callable it is handed, and the presets through
``max_attempts``, so that a reaped last attempt ends ``failed`` as the pipeline would end it.

Given a fleet and a ``node_info`` callable, it also keeps the node in the fleet:

- it registers the node (``announce``) at start and every ``node_ttl_s / 3``, and
  deregisters it at stop (after the loops end: stop it after the runtime, so that nothing it
  still runs is taken over);
- on a shared fleet (Redis; ``fleet.shared``) every ``takeover_every_s`` it takes over the
  dead nodes: a node that holds running attempts (``store.running_nodes()``) or live leases
  but is not registered (its key expired ``node_ttl_s`` after its last heartbeat) gets its
  attempts reaped at once (``store.reap_node``: spent, ``node_lost`` past max_attempts; a late
  finish of theirs is refused by its stale token), then ``on_node_dead(name)`` (its leases)
  and the scheduler's wake. So a node killed with kill -9 has its tasks claimable elsewhere
  within about ``node_ttl_s + takeover_every_s``. Never this node; never on a fleet that is
  not shared (a LocalFleet sees no other node, so an unregistered one proves nothing).
  Running nodes are read before the registry: a node registers before it claims, so one
  that claims meanwhile is seen registered. After any failure of its own registration (Redis
  away), a node takes nothing over until it has registered without a failure for a whole
  ``node_ttl_s``: the others re-register within that time once Redis is back, and are not
  taken for dead because their keys expired while nobody could renew them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from gpulane.errors import StoreUnavailableError
from gpulane.fleet import Fleet, NodeInfo
from gpulane.model import Task
from gpulane.store import PurgeReport, Store

log = logging.getLogger("gpulane.housekeeping")

PURGE_INTERVAL_S = 60.0
"""How often finished work past the retention period is looked for."""

PURGE_BATCHES_PER_CALL = 20
"""Store batches per purge call: a stop waits for one call at most (about 10,000 tasks)."""

PURGE_ERROR_BACKOFF_S = 5.0
"""Wait after a failed purge call before the next round tries again."""

NODE_TTL_S = 5.0
"""A node unheard of this long is dead (Settings.node_ttl_s; its heartbeat runs 3x per TTL)."""

TAKEOVER_INTERVAL_S = 1.0
"""How often a node looks for dead nodes to take over from."""


class Housekeeper:
    """Heartbeats, reaper and retention for one node (see the module docstring)."""

    def __init__(self, store: Store, node: str, *,
                 held: Callable[[], Sequence[tuple[str, int]]],
                 max_attempts: Callable[[], Mapping[str, int]],
                 retain_s: float, claim_ttl_s: float, scratch_dir: str | Path | None = None,
                 purge_every_s: float = PURGE_INTERVAL_S,
                 on_reaped: Callable[[], None] | None = None,
                 on_lost: Callable[[list[tuple[str, int]]], None] | None = None,
                 fleet: Fleet | None = None, node_info: Callable[[], NodeInfo] | None = None,
                 node_ttl_s: float = NODE_TTL_S, takeover_every_s: float = TAKEOVER_INTERVAL_S,
                 on_node_dead: Callable[[str], Awaitable[None]] | None = None) -> None:
        self.store = store
        self.node = node
        self.held = held
        self.max_attempts = max_attempts
        self.retain_s = retain_s
        self.claim_ttl_s = claim_ttl_s
        self.scratch_dir = Path(scratch_dir) if scratch_dir is not None else None
        self.purge_every_s = purge_every_s
        self.on_reaped = on_reaped
        """Called after a round that requeued something: the scheduler's wake."""
        self.on_lost = on_lost
        """Called with the attempts this node held in vain (reaped meanwhile, say after a
        stall longer than the claim TTL): the runtime stops working on them."""
        self.fleet = fleet
        self.node_info = node_info
        """This node as it registers (called at each registration heartbeat)."""
        self.node_ttl_s = node_ttl_s
        self.takeover_every_s = takeover_every_s
        self.on_node_dead = on_node_dead
        """Awaited with each dead node's name after its attempts were taken: its leases."""
        self.purge_uploads: Callable[[float], int] | None = None
        """Given the time now, removes expired uploads and crashed uploads' leftovers and
        returns how many uploads went (files.py's Files.purge); run on a worker thread."""
        self.clock: Callable[[], float] = time.time
        """The wall clock cutoffs are counted on (a test may set its own)."""
        self._stopping = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        # What the status view shows.
        self.heartbeats_sent = 0
        self.lost_total = 0
        self.reaped_total = 0
        self.last_reap_at: float | None = None
        self.last_purge_at: float | None = None
        self.last_purge: dict[str, Any] | None = None
        self.purged_total = {"tasks": 0, "events": 0, "keys": 0, "files": 0, "uploads": 0}
        self.db_bytes: int | None = None
        self.rows: dict[str, int] = {}
        self.errors = 0
        self.last_error: str | None = None
        self.registrations = 0
        self.registered_since: float | None = None
        """Monotonic time of the first registration since the last failed one."""
        self.takeovers_total = 0
        """Dead nodes taken over (a node counts again only when it had new work taken)."""
        self._dead: set[str] = set()
        """Nodes found dead and still unregistered: told to ``on_node_dead`` each round (their
        leases may take more than one) but counted and logged once."""
        self.taken_over_total = 0
        """Running attempts of dead nodes reaped."""
        self.last_takeover: dict[str, Any] | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        self._stopping.clear()
        self._tasks = [
            asyncio.create_task(self._heartbeat_loop(), name="gpulane-heartbeats"),
            asyncio.create_task(self._purge_loop(), name="gpulane-retention"),
        ]
        if self.fleet is not None and self.node_info is not None:
            self._tasks.append(asyncio.create_task(self._register_loop(),
                                                   name="gpulane-node-heartbeat"))
            if self.fleet.shared:
                self._tasks.append(asyncio.create_task(self._takeover_loop(),
                                                       name="gpulane-takeover"))

    async def stop(self) -> None:
        """Stop the loops (a purge call in flight is let finish: its thread writes to the
        store, which must stay open until it is done), then leave the fleet."""
        self._stopping.set()
        for task in self._tasks:
            with contextlib.suppress(Exception):
                await task
        self._tasks = []
        if self.fleet is not None and self.registered_since is not None:
            try:
                await self.fleet.deregister()
            except Exception as exc:  # Redis away: the registration lapses after its TTL
                self._failed("deregister", exc)
            self.registered_since = None

    async def _sleep(self, seconds: float) -> bool:
        """Wait ``seconds``; False once stopping (at once, not at the end of the wait)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)
        return not self._stopping.is_set()

    # -- heartbeats and the reaper -------------------------------------------------------------

    async def _heartbeat_loop(self) -> None:
        while await self._sleep(self.claim_ttl_s / 3):
            await self.beat()

    async def beat(self) -> list[Task]:
        """One round: heartbeat what this node holds, then reap what nobody has heartbeat for
        ``claim_ttl_s``. Returns the reaped tasks; a store error is logged, not raised."""
        try:
            held = self.held()
            lost = await self.store.heartbeat(self.node, held)
            self.heartbeats_sent += len(held) - len(lost)
            if lost:
                self._lose(lost)
            reaped = await self.store.reap(self.clock() - self.claim_ttl_s,
                                           self.max_attempts())
        except Exception as exc:  # the store may fail; the next round tries again
            self._failed("heartbeat/reap", exc)
            return []
        self.last_reap_at = self.clock()
        if reaped:
            self.reaped_total += len(reaped)
            log.warning("reaped %d running task(s) unheard of for %.0f s (claim TTL): %s",
                        len(reaped), self.claim_ttl_s, ", ".join(t.id for t in reaped[:10]))
            if self.on_reaped is not None:
                self.on_reaped()
        return reaped

    def _lose(self, lost: list[tuple[str, int]]) -> None:
        self.lost_total += len(lost)
        log.warning("%d running attempt(s) held here are no longer the tasks' own (reaped "
                    "after a stall longer than the claim TTL?); stopping them: %s", len(lost),
                    ", ".join(f"{tid} (token {token})" for tid, token in lost[:10]))
        if self.on_lost is not None:
            self.on_lost(lost)

    # -- the node in its fleet -------------------------------------------------------------------

    async def _register_loop(self) -> None:
        await self.announce()
        while await self._sleep(self.node_ttl_s / 3):
            await self.announce()

    async def announce(self) -> bool:
        """Register this node (again) for ``node_ttl_s``: the node awaits it once before it
        claims anything, then the loop repeats it. False when the fleet failed (logged)."""
        if self.fleet is None or self.node_info is None:
            return False
        try:
            await self.fleet.register(self.node_info(), self.node_ttl_s)
        except Exception as exc:  # Redis away: the next heartbeat tries again
            self.registered_since = None
            self._failed("node registration", exc)
            return False
        self.registrations += 1
        if self.registered_since is None:
            self.registered_since = time.monotonic()
        return True

    async def _takeover_loop(self) -> None:
        while await self._sleep(self.takeover_every_s):
            await self.take_over()

    def _steady(self) -> bool:
        """Registered without a failure for a whole node TTL (see the module docstring)."""
        since = self.registered_since
        return since is not None and time.monotonic() - since >= self.node_ttl_s

    async def dead_nodes(self) -> set[str]:
        """Nodes that hold running attempts or live leases but are not registered."""
        if self.fleet is None or not self.fleet.shared:
            return set()
        holding = await self.store.running_nodes()  # before the registry: see the docstring
        holding |= {str(lease["node"]) for lease in await self.fleet.leases()
                    if lease.get("node")}
        live = {n.name for n in await self.fleet.nodes()}
        return holding - live - {self.node}

    async def take_over(self, *, force: bool = False) -> list[Task]:
        """One round: reap every dead node's attempts and tell ``on_node_dead``. Returns the
        tasks taken; a failure is logged, not raised. Skipped until this node is steady
        (``force`` skips that wait: a test's)."""
        if not (force or self._steady()):
            return []
        taken: list[Task] = []
        try:
            dead_now = await self.dead_nodes()
            self._dead &= dead_now  # one that came back is news again if it dies again
            for dead in sorted(dead_now):
                tasks = await self.store.reap_node(dead, self.max_attempts())
                taken += tasks
                self.taken_over_total += len(tasks)
                if dead not in self._dead or tasks:
                    self._dead.add(dead)
                    self.takeovers_total += 1
                    self.last_takeover = {"node": dead, "tasks": len(tasks),
                                          "at": self.clock()}
                    log.warning("node %s is not registered any more (no heartbeat for "
                                "%.0f s): took over its %d running task(s)", dead,
                                self.node_ttl_s, len(tasks))
                if self.on_node_dead is not None:
                    await self.on_node_dead(dead)
        except Exception as exc:  # the store or the fleet may fail; the next round tries
            self._failed("takeover", exc)
        if taken and self.on_reaped is not None:
            self.on_reaped()
        return taken

    # -- retention -----------------------------------------------------------------------------

    async def _purge_loop(self) -> None:
        while await self._sleep(self.purge_every_s):
            await self.purge()

    async def purge(self) -> dict[str, Any] | None:
        """One retention pass: finished tasks past ``retain_s`` in calls of a bounded number
        of batches (checking for a stop between calls), then old scratch files. Returns what
        it did (also kept for the view); None when the store failed."""
        started = time.perf_counter()
        cutoff = self.clock() - self.retain_s
        total = {"tasks": 0, "events": 0, "keys": 0, "batches": 0}
        longest = 0.0
        report: PurgeReport | None = None
        try:
            while True:
                report = await self.store.purge(cutoff, max_batches=PURGE_BATCHES_PER_CALL)
                for k in ("tasks", "events", "keys", "batches"):
                    total[k] += getattr(report, k)
                longest = max(longest, report.longest_batch_s)
                if report.batches < PURGE_BATCHES_PER_CALL or self._stopping.is_set():
                    break
            files = await asyncio.to_thread(self._purge_scratch, cutoff)
            uploads = (await asyncio.to_thread(self.purge_uploads, self.clock())
                       if self.purge_uploads is not None else 0)
        except Exception as exc:  # the store may fail; the next round tries again
            self._failed("purge", exc)
            await self._sleep(PURGE_ERROR_BACKOFF_S)
            return None
        self.db_bytes = report.db_bytes
        self.rows = dict(report.rows)
        for k in ("tasks", "events", "keys"):
            self.purged_total[k] += total[k]
        self.purged_total["files"] += files
        self.purged_total["uploads"] += uploads
        self.last_purge_at = self.clock()
        self.last_purge = {**total, "files": files, "uploads": uploads,
                           "longest_batch_ms": round(longest * 1000, 3),
                           "seconds": round(time.perf_counter() - started, 3)}
        if total["tasks"] or files:
            log.info("retention: purged %d task(s), %d event(s), %d key(s), %d file(s) "
                     "finished before %.0f s ago", total["tasks"], total["events"],
                     total["keys"], files, self.retain_s)
        if uploads:
            log.info("retention: removed %d expired upload(s)", uploads)
        return self.last_purge

    def _purge_scratch(self, cutoff: float) -> int:
        """Delete scratch files last changed before ``cutoff`` (symlinks never followed), and
        folders left empty by it; returns files deleted. Runs on a worker thread."""
        root = self.scratch_dir
        if root is None or not root.is_dir():
            return 0
        removed = 0
        for folder, dirs, files in os.walk(root, topdown=False):
            for name in files:
                path = os.path.join(folder, name)
                with contextlib.suppress(OSError):  # gone meanwhile, or not ours to delete
                    if os.lstat(path).st_mtime < cutoff:
                        os.unlink(path)
                        removed += 1
            for name in dirs:
                path = os.path.join(folder, name)
                with contextlib.suppress(OSError):  # not empty, or a link: left alone
                    if not os.path.islink(path) and os.lstat(path).st_mtime < cutoff:
                        os.rmdir(path)
        return removed

    # -- view ----------------------------------------------------------------------------------

    def _failed(self, what: str, exc: Exception) -> None:
        self.errors += 1
        self.last_error = f"{what}: {type(exc).__name__}: {exc}"
        # Redis away is said in one line (a traceback every round of an outage says nothing
        # more); anything else keeps its traceback.
        log.warning("housekeeping %s failed (tried again next round): %s", what, exc,
                    exc_info=not isinstance(exc, StoreUnavailableError))

    def view(self) -> dict[str, Any]:
        """Retention, heartbeats and the reaper, for the node's status view."""
        return {
            "retain_s": self.retain_s, "claim_ttl_s": self.claim_ttl_s,
            "retention": {"last_purge_at": self.last_purge_at, "last": self.last_purge,
                          "total": dict(self.purged_total), "db_bytes": self.db_bytes,
                          "rows": dict(self.rows)},
            "reaper": {"last_run_at": self.last_reap_at, "reaped_total": self.reaped_total,
                       "heartbeats_total": self.heartbeats_sent,
                       "lost_total": self.lost_total},
            "fleet": {"node_ttl_s": self.node_ttl_s, "registrations": self.registrations,
                      "registered": self.registered_since is not None,
                      "shared": bool(self.fleet is not None and self.fleet.shared),
                      "takeovers_total": self.takeovers_total,
                      "taken_over_total": self.taken_over_total,
                      "last_takeover": self.last_takeover},
            "errors": self.errors, "last_error": self.last_error,
        }
