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
  are scratch files older than ``retain_s``.

It knows the runtime only through the ``held`` callable it is handed, and the presets through
``max_attempts``, so that a reaped last attempt ends ``failed`` as the pipeline would end it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from gpulane.model import Task
from gpulane.store import PurgeReport, Store

log = logging.getLogger("gpulane.housekeeping")

PURGE_INTERVAL_S = 60.0
"""How often finished work past the retention period is looked for."""

PURGE_BATCHES_PER_CALL = 20
"""Store batches per purge call: a stop waits for one call at most (about 10,000 tasks)."""

PURGE_ERROR_BACKOFF_S = 5.0
"""Wait after a failed purge call before the next round tries again."""


class Housekeeper:
    """Heartbeats, reaper and retention for one node (see the module docstring)."""

    def __init__(self, store: Store, node: str, *,
                 held: Callable[[], Sequence[tuple[str, int]]],
                 max_attempts: Callable[[], Mapping[str, int]],
                 retain_s: float, claim_ttl_s: float, scratch_dir: str | Path | None = None,
                 purge_every_s: float = PURGE_INTERVAL_S,
                 on_reaped: Callable[[], None] | None = None,
                 on_lost: Callable[[list[tuple[str, int]]], None] | None = None) -> None:
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
        self.purged_total = {"tasks": 0, "events": 0, "keys": 0, "files": 0}
        self.db_bytes: int | None = None
        self.rows: dict[str, int] = {}
        self.errors = 0
        self.last_error: str | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        self._stopping.clear()
        self._tasks = [
            asyncio.create_task(self._heartbeat_loop(), name="gpulane-heartbeats"),
            asyncio.create_task(self._purge_loop(), name="gpulane-retention"),
        ]

    async def stop(self) -> None:
        """Stop both loops; a purge call in flight is let finish (its thread writes to the
        store, which must stay open until it is done)."""
        self._stopping.set()
        for task in self._tasks:
            with contextlib.suppress(Exception):
                await task
        self._tasks = []

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
        except Exception as exc:  # the store may fail; the next round tries again
            self._failed("purge", exc)
            await self._sleep(PURGE_ERROR_BACKOFF_S)
            return None
        self.db_bytes = report.db_bytes
        self.rows = dict(report.rows)
        for k in ("tasks", "events", "keys"):
            self.purged_total[k] += total[k]
        self.purged_total["files"] += files
        self.last_purge_at = self.clock()
        self.last_purge = {**total, "files": files,
                           "longest_batch_ms": round(longest * 1000, 3),
                           "seconds": round(time.perf_counter() - started, 3)}
        if total["tasks"] or files:
            log.info("retention: purged %d task(s), %d event(s), %d key(s), %d file(s) "
                     "finished before %.0f s ago", total["tasks"], total["events"],
                     total["keys"], files, self.retain_s)
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
        log.warning("housekeeping %s failed (tried again next round): %s", what, exc,
                    exc_info=True)

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
            "errors": self.errors, "last_error": self.last_error,
        }
