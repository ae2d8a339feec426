"""The lease mirror: copies every change of this node's leases to the fleet's lease book.

The lease manager is synchronous (granting, preemption and expiry run in plain calls), so it
only marks a lease changed (``mark``); one background task writes the marked leases to the
book in the order they were first marked, each as it stands now with the events it gained
since its last save. Several changes between two writes cost one save. If the book cannot be
reached (Redis down), the lease stays marked and the writer retries with backoff, logging the
outage once: the manager never waits for the book, and the newest state of every lease is
saved when it is back. A save the book refuses (``lease_ended``: another node ended the
lease there, taking this node for dead) is not retried: ``on_fenced`` ends it here too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

from gpulane.errors import ConflictError
from gpulane.fleet import Fleet
from gpulane.scheduling.leases import FINAL_LINGER_S, Lease

log = logging.getLogger("gpulane.leases")

RETRY_MIN_S = 0.1
"""First wait before saving again after the book refused a save."""
RETRY_MAX_S = 2.0
"""Longest wait between tries while the book stays unreachable."""
AWAIT_RESUME_KEEP_S = 86_400.0
"""How long the book keeps an ended lease whose ``resume`` is still due (its preemptor
holds on): its holder follows it for that event. The resume saves it again with the linger."""


Record = Callable[[Lease], dict[str, Any]]
"""How a lease is written in the book (FleetLeases.record)."""


class LeaseMirror:
    """One ordered writer of this node's lease changes to the book."""

    def __init__(self, fleet: Fleet, record: Record) -> None:
        self.fleet = fleet
        self.record = record
        self._dirty: dict[str, Lease] = {}  # marked, in the order first marked
        self._saved: dict[str, int] = {}  # lease id -> events saved so far
        self._busy: str | None = None  # the lease being saved now
        self._wake = asyncio.Event()
        self._progress = asyncio.Condition()
        self._task: asyncio.Task[None] | None = None
        self.failing = False
        """The last save failed: the book is unreachable (logged once per outage)."""
        self.on_fenced: Callable[[Lease], None] = lambda lease: None
        """The book refused a save: another node ended the lease there (FleetLeases ends it
        here too, so the devices it holds are not held by a lease the fleet sees ended)."""

    def adopt(self, lease: Lease) -> None:
        """A lease read back from the book: its events up to now are saved there already."""
        self._saved[lease.id] = len(lease.events)

    def mark(self, lease: Lease) -> None:
        """The lease changed: save it soon (the manager's ``mirror`` hook)."""
        self._dirty.setdefault(lease.id, lease)
        self._wake.set()

    def pending(self) -> int:
        """Leases marked and not saved yet."""
        return len(self._dirty) + (self._busy is not None)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="gpulane-lease-mirror")

    async def stop(self, flush_s: float) -> None:
        """Save what is marked (for up to ``flush_s``), then stop the writer."""
        await self.settled(None, flush_s)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def settled(self, lease_id: str | None, timeout_s: float) -> bool:
        """Wait until ``lease_id`` (every lease, for None) is saved as it stands; False when
        ``timeout_s`` passed first (the book is unreachable)."""
        def done() -> bool:
            if lease_id is None:
                return self.pending() == 0
            return lease_id not in self._dirty and self._busy != lease_id
        async with self._progress:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout_s):
                    await self._progress.wait_for(done)
            return done()

    async def _run(self) -> None:
        backoff = RETRY_MIN_S
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._dirty:
                lease_id, lease = next(iter(self._dirty.items()))
                del self._dirty[lease_id]  # a change while saving marks it again
                self._busy = lease_id
                try:
                    ok = await self._save(lease)
                finally:
                    self._busy = None
                if not ok:
                    self._dirty = {lease_id: lease, **self._dirty}
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, RETRY_MAX_S)
                    continue
                backoff = RETRY_MIN_S
                async with self._progress:
                    self._progress.notify_all()

    async def _save(self, lease: Lease) -> bool:
        count = len(lease.events)
        fresh = lease.events[self._saved.get(lease.id, 0):count]
        ended = lease.state.final
        keep = None if not ended else (AWAIT_RESUME_KEEP_S if lease.awaiting_resume
                                       else FINAL_LINGER_S)
        try:
            await self.fleet.save_lease(self.record(lease), fresh, keep)
        except ConflictError as exc:  # fenced: the book's end stands, not retried
            log.warning("the lease book refused a save: %s", exc.message)
            self._saved.pop(lease.id, None)
            self.on_fenced(lease)
            return True
        except Exception as exc:  # the book is out of reach: keep the lease marked
            if not self.failing:
                log.warning("lease book unreachable, lease changes kept to save later: %s",
                            exc)
            self.failing = True
            return False
        if self.failing:
            log.info("lease book reachable again: saving the leases kept meanwhile")
            self.failing = False
        if ended and not lease.awaiting_resume:
            self._saved.pop(lease.id, None)  # nothing more comes for it
        else:
            self._saved[lease.id] = count
        return True
