"""What the runtime writes to the store about task runs, written so that a store fault never
wedges a worker.

Every write here happens after its run has let go of its worker (see runtime/pipeline.py), and
none of them raises. Two kinds of fault:

- The store cannot be reached (``StoreUnavailableError``: Redis down or restarting). The write
  is kept, in order, and retried with backoff until the store answers again, so a node finishes
  what it runs through an outage and nothing it ran is lost. While writes are kept, new ones
  queue behind them (an event never lands after its task's finish). The queue is bounded
  (PENDING_MAX): past it the oldest write is dropped, logged, and its task goes back to the
  queue by the claim-TTL reaper as below. A kept write that lands late is fenced like any
  other: a stale token (the attempt was reaped meanwhile) is refused and dropped quietly.
- Any other failure loses what was being written, logged once with the task ids, and the run
  is forgotten all the same: a task whose outcome or requeue was lost stays ``running`` in the
  store with nobody heartbeating it, and the claim-TTL reaper puts it back in the queue.

Execution is at least once; the fencing token keeps the recorded outcome exactly once.
A ``StaleTokenError`` is no fault: the attempt was ended elsewhere (cancelled, reaped), and the
store was right to refuse.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Iterable

from gpulane.errors import StaleTokenError, StoreUnavailableError
from gpulane.model import DeviceWish, ErrorKind, FallbackReason
from gpulane.presets import FallbackKind
from gpulane.protocol import EventType
from gpulane.runtime.taskrun import TaskRun
from gpulane.runtime.view import RuntimeListener
from gpulane.store import Finish, NewEvent, Store

log = logging.getLogger("gpulane.supervisor")

LOGGED_IDS = 20
"""At most this many task ids in one log line: a big batch's ids do not flood the log."""
PENDING_MAX = 10_000
"""Writes kept while the store is unreachable; past it the oldest is dropped (its task is
requeued by the claim-TTL reaper once the store is back)."""
RETRY_FIRST_S = 0.1
"""The first wait before a kept write is tried again; it doubles up to RETRY_MAX_S."""
RETRY_MAX_S = 2.0
"""The longest wait between two tries while the store is unreachable."""

FALLBACK_EVENT = "fallback"
"""The event a task gets when it leaves the GPU for the CPU: {reason, from, to, ...}."""

Write = Callable[[], Awaitable[None]]
"""One store write; it raises only StoreUnavailableError (every other fault it handles)."""


def ids(task_ids: Iterable[str]) -> str:
    """Task ids for a log line, bounded by LOGGED_IDS."""
    listed = list(task_ids)
    shown = ", ".join(listed[:LOGGED_IDS])
    extra = len(listed) - LOGGED_IDS
    return shown if extra <= 0 else f"{shown} and {extra} more"


class OutcomeWriter:
    """Writes runs' events, outcomes and requeues; logs a failing store, never raises it, and
    keeps what an unreachable store could not take until it can."""

    def __init__(self, store: Store, listener: RuntimeListener,
                 pending_max: int = PENDING_MAX) -> None:
        self.store = store
        self.listener = listener
        self.pending_max = pending_max
        self._pending: deque[tuple[str, Write]] = deque()
        self._flusher: asyncio.Task[None] | None = None
        self.dropped = 0
        """Kept writes dropped because the queue was full (each task is reaped later)."""

    @property
    def pending(self) -> int:
        """Writes kept for an unreachable store now."""
        return len(self._pending)

    async def _through(self, what: str | Callable[[], str], write: Write) -> None:
        """Run ``write`` now, or keep it (behind those already kept) for when the store
        answers again. ``what`` names it in the log; a callable is formatted only if kept
        (the hot path formats no task ids)."""
        if not self._pending:
            try:
                await write()
                return
            except StoreUnavailableError as exc:
                log.warning("the store is unreachable (%s): keeping outcomes until it answers "
                            "again", exc)
        self._keep(what, write)

    def _keep(self, what: str | Callable[[], str], write: Write) -> None:
        what = what if isinstance(what, str) else what()
        if len(self._pending) >= self.pending_max:
            old, _ = self._pending.popleft()
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 1000 == 0:
                log.error("%d kept write(s) dropped while the store is unreachable (the last: "
                          "%s); their tasks go back to the queue once their claim expires",
                          self.dropped, old)
        self._pending.append((what, write))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush(), name="gpulane-outcomes-retry")

    async def _flush(self) -> None:
        """Write what was kept, oldest first, waiting longer after each refusal."""
        delay = RETRY_FIRST_S
        written = 0
        while self._pending:
            _, write = self._pending[0]
            try:
                await write()
            except StoreUnavailableError:
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_S)
                continue
            if self._pending and self._pending[0][1] is write:
                self._pending.popleft()
            written += 1
            delay = RETRY_FIRST_S
        log.info("the store answers again: %d kept write(s) done", written)

    async def close(self, timeout_s: float) -> None:
        """Give kept writes up to ``timeout_s`` to land (a stopping node), then drop them:
        their tasks are reaped back to the queue by another node or the next start."""
        if self._flusher is None or self._flusher.done():
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await asyncio.shield(self._flusher)
        if not self._flusher.done():
            log.warning("%d kept write(s) not done at stop", len(self._pending))
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher
            self._pending.clear()

    async def append(self, run: TaskRun, event: NewEvent) -> None:
        """Store a streamed event. A failing store loses the event, not the run: its finish
        still settles it (logged once per run, not once per event)."""
        async def write() -> None:
            try:
                await self.store.append_events(run.id, [event])
            except StoreUnavailableError:
                raise
            except StaleTokenError:
                pass  # the attempt was ended elsewhere (cancelled, reaped): its events are moot
            except Exception:
                if not run.store_failed:
                    run.store_failed = True
                    log.exception("storing a %s event of task %s failed; later ones may be "
                                  "lost too", event.type, run.id)
        await self._through(lambda: f"a {event.type} event of task {run.id}", write)

    async def finish_many(self, ends: list[Finish]) -> None:
        """Write final states in one transaction; lost ones run again once their claim
        expires."""
        async def write() -> None:
            try:
                results = await self.store.finish_many(ends)
            except StoreUnavailableError:
                raise
            except Exception:
                log.exception("storing the outcomes of tasks %s failed; they run again once "
                              "their claim expires", ids(e.task_id for e in ends))
                return
            for got in results:
                if isinstance(got, StaleTokenError):
                    log.info("dropped the outcome of a stale attempt: %s", got)
        await self._through(lambda: f"the outcomes of tasks {ids(e.task_id for e in ends)}",
                            write)

    async def requeue_unspent(self, attempts: list[tuple[str, int]],
                              event: dict[str, object]) -> None:
        """Put settled attempts (task id, token) back in the queue without holding them
        against max_attempts, each with an ``error`` event saying why; then the scheduler
        looks again. Each one a failing store did not take is logged."""
        for task_id, token in attempts:
            await self._through(f"the requeue of task {task_id}",
                                self._requeue_unspent(task_id, token, event))
        self.listener.capacity_changed()

    def _requeue_unspent(self, task_id: str, token: int, event: dict[str, object]) -> Write:
        async def write() -> None:
            await _landed(self.store.requeue(task_id, token, None, events=[NewEvent(
                EventType.ERROR.value, {**event, "retrying": True})], spent=False),
                "task %s could not go back to the queue (%s); it does once its claim expires",
                task_id, event.get("kind"))
        return write

    async def gpu_oom(self, runs: list[TaskRun], device: str) -> None:
        """Runs of ``auto`` tasks that ran out of memory on GPU ``device`` in a batch of one:
        they run again on the CPU, unspent (gpu_oom)."""
        if not runs:
            return
        await self.requeue_elsewhere(
            [(r.id, r.token) for r in runs], runs[0].preset.name, lane="cpu",
            reason=FallbackReason.GPU_OOM, error={
                "kind": ErrorKind.OOM.value, "batch_size": 1,
                "message": f"out of device memory on {device} in a batch of one: runs again "
                           "on the CPU, no attempt spent"},
            fallback={"from": device, "batch_size": 1})

    async def device_lost(self, runs: list[TaskRun], device: str, worker_id: str) -> None:
        """Settled runs of a worker whose GPU ``device`` was lost go back unspent: an
        ``auto`` task whose preset falls back on ``error`` to the CPU's queue (device_lost),
        any other to its own lane, where another GPU takes it."""
        if not runs:
            return
        message = f"{device} was lost while worker {worker_id} ran the task"
        to_cpu = [r for r in runs if r.task.device_wish is DeviceWish.AUTO
                  and r.preset.falls_back(FallbackKind.ERROR)]
        again = [(r.id, r.token) for r in runs if r not in to_cpu]
        if to_cpu:
            await self.requeue_elsewhere(
                [(r.id, r.token) for r in to_cpu], to_cpu[0].preset.name, lane="cpu",
                reason=FallbackReason.DEVICE_LOST, error={
                    "kind": FallbackReason.DEVICE_LOST,
                    "message": f"{message}: runs again on the CPU, no attempt spent"},
                fallback={"from": device})
        if again:
            await self.requeue_unspent(again, {
                "kind": FallbackReason.DEVICE_LOST,
                "message": f"{message}: runs again on another GPU, no attempt spent"})

    async def requeue_elsewhere(self, attempts: list[tuple[str, int]], preset: str, *,
                                lane: str, reason: str, error: dict[str, object],
                                fallback: dict[str, object]) -> None:
        """Put settled attempts back unspent in ``lane``'s queue instead of their own (a GPU
        OOM in a batch of one, a lost GPU: the CPU's), ``reason`` recorded on each task as
        its fallback_reason, with an ``error`` event (what happened) and a ``fallback`` event
        (``fallback``: reason, from, to); the listener hears of each one that landed."""
        for task_id, token in attempts:
            await self._through(f"the requeue of task {task_id} to the {lane}",
                                self._requeue_elsewhere(task_id, token, preset, lane, reason,
                                                        error, fallback))
        self.listener.capacity_changed()

    def _requeue_elsewhere(self, task_id: str, token: int, preset: str, lane: str,
                           reason: str, error: dict[str, object],
                           fallback: dict[str, object]) -> Write:
        events = [NewEvent(EventType.ERROR.value, {**error, "retrying": True}),
                  NewEvent(FALLBACK_EVENT, {"reason": reason, **fallback, "to": lane})]

        async def write() -> None:
            if await _landed(self.store.requeue(task_id, token, None, events=events,
                                                spent=False, lane=lane, fallback_reason=reason),
                             "task %s could not go to the %s queue (%s); it goes back to its "
                             "own once its claim expires", task_id, lane, reason):
                self.listener.fell_back(reason, preset, 1)
        return write

    async def retry(self, task_id: str, token: int, error: dict[str, object],
                    event: NewEvent) -> None:
        """Put a settled attempt back in the queue with its attempt spent."""
        async def write() -> None:
            try:
                await self.store.requeue(task_id, token, error, events=[event])
            except StoreUnavailableError:
                raise
            except StaleTokenError as exc:
                log.info("dropped a retry of a stale attempt: %s", exc)
            except Exception:
                log.exception("requeueing task %s for a retry failed; it goes back once its "
                              "claim expires", task_id)
        await self._through(f"the retry of task {task_id}", write)
        self.listener.capacity_changed()


async def _landed(requeue: Awaitable[object], failure: str, *args: object) -> bool:
    """Whether an unspent requeue landed: one whose attempt ended elsewhere (cancelled,
    reaped) has nothing left to put back, and any other failure is logged with ``failure``
    (its claim expires and the task goes back then); a store that is away is raised for
    _through to retry."""
    try:
        await requeue
    except StoreUnavailableError:
        raise
    except StaleTokenError:
        return False
    except Exception:
        log.exception(failure, *args)
        return False
    return True
