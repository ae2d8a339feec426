"""The Store protocol and the logic every backend shares.

A store keeps tasks, their events and idempotency keys, and wakes whoever waits on a task.
Backends (``sqlite.py``, later ``redis.py``) implement the protocol; the task notifier, the ID
scheme, the idempotency fingerprint and ``wait_final`` live here so that every backend behaves
the same, and the conformance suite (tests/conformance) runs against each of them. This module
imports no backend: ``factory.py`` picks one for a URL.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson

from gpulane.errors import ConflictError, StaleTokenError
from gpulane.model import FINAL_STATES, DeviceWish, Event, Task, TaskSpec, TaskState
from gpulane.notify import Notifier, Waiters


def new_task_id() -> str:
    """A 24-hex-digit id whose first 12 digits are milliseconds, so ids sort by creation time."""
    return f"{int(time.time() * 1000):012x}{os.urandom(6).hex()}"


def new_task(task_id: str, spec: TaskSpec, seq: int, created: float) -> Task:
    """The task a submit just wrote, built from what the caller sent (every store's)."""
    return Task(id=task_id, preset=spec.preset, state=TaskState.QUEUED, input=spec.input,
                priority=spec.priority, device_wish=spec.device_wish, created_at=created,
                seq=seq, timeout_s=None if spec.timeout_s is None else float(spec.timeout_s),
                content_type=spec.content_type, idempotency_key=spec.idempotency_key,
                lane=spec.lane, fallback_reason=spec.fallback_reason,
                submitted_by=spec.submitted_by)


def key_reused(key: str, task_id: str) -> ConflictError:
    """What a submit gets whose idempotency ``key`` made ``task_id`` from another body."""
    return ConflictError(
        "idempotency_key_reused",
        f"Idempotency-Key {key!r} was already used for a different request (task {task_id}): "
        "send a new key for a new task, or the identical body to get that task back",
        field="Idempotency-Key", extra={"task_id": task_id})


def body_hash(body: Any) -> str:
    """Fingerprint of a submit body, to tell a retried submit from a different one."""
    return hashlib.sha256(orjson.dumps(body, option=orjson.OPT_SORT_KEYS)).hexdigest()


@dataclass(frozen=True, slots=True)
class QueueHead:
    """The next task of one preset's queue: what the scheduler compares across presets."""

    preset: str
    lane: str
    priority: int
    seq: int
    task_id: str


@dataclass(frozen=True, slots=True)
class QueuedTask:
    """A queued task as the fallback movers weigh it (``Store.queued``): what decides a
    move, without the input, which a scan of a long backlog would otherwise read and decode."""

    id: str
    device_wish: DeviceWish
    created_at: float


@dataclass(frozen=True, slots=True)
class NewEvent:
    """An event to append: its type and data; the store numbers it."""

    type: str
    data: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Finish:
    """One attempt's end, for :meth:`Store.finish_many`: a batch's tasks end together."""

    task_id: str
    token: int
    state: TaskState
    output: Any = None
    error: dict[str, Any] | None = None
    events: Sequence[NewEvent] = ()


@dataclass(frozen=True, slots=True)
class QueueStats:
    """One preset's queue as counters: what admission (max_queued) and drain rates read."""

    queued: int
    """Tasks of the preset queued now (every lane)."""
    claimed_total: int
    """Claims of the preset's tasks since the store was opened: only grows, so two readings
    apart in time give the rate at which its queue drains."""
    lanes: Mapping[str, int] = field(default_factory=dict)
    """Queued now per lane ("gpu", "cpu"); a lane with none may be absent."""


@dataclass(frozen=True, slots=True)
class LaneStats:
    """One (preset, lane) queue as ``GET /v1/status`` shows it."""

    queued: int
    running: int
    oldest_queued_at: float | None
    """``created_at`` of the longest-waiting queued task (None when none is queued)."""


@dataclass(frozen=True, slots=True)
class PurgeReport:
    """What one retention pass removed, and how big the store is after it."""

    tasks: int
    """Finished tasks deleted (their events and idempotency keys with them)."""
    events: int
    keys: int
    batches: int
    """Write transactions it took (each at most one batch of tasks)."""
    longest_batch_s: float
    """The longest of them: how long a write on the event loop could have waited."""
    db_bytes: int
    """The database's size on disk after the pass (its WAL included)."""
    rows: Mapping[str, int]
    """Rows per table after the pass."""


class Store(Protocol):
    """What the node needs of a store. Every method is atomic."""

    notifier: TaskNotifier
    on_work: Callable[[], None]
    """Called when another node (sharing this store) queued or requeued work: the node sets
    it to wake its scheduler. A store that only this process writes never calls it."""

    async def open(self) -> None: ...
    async def close(self) -> None: ...

    async def submit(self, spec: TaskSpec) -> tuple[Task, bool]:
        """Add a queued task, or return the one its idempotency key already made (created=False).
        Raises ConflictError when the key was used with a different body."""

    async def submit_many(self, specs: Sequence[TaskSpec]) -> list[tuple[Task, bool]]: ...

    async def task_for_key(self, key: str) -> Task | None:
        """The task an idempotency key made, if it is still kept (a full queue answers a
        repeated submit with it instead of a 429)."""

    async def get(self, task_id: str) -> Task | None: ...

    async def get_many(self, ids: Sequence[str]) -> list[Task | None]:
        """Each id's task (None if unknown), in the order asked, in one read: what a
        collector of many results asks (POST /v1/tasks/results) costs one query or round
        trip, not one per id."""

    async def list_tasks(self, state: TaskState | None = None, preset: str | None = None,
                         limit: int = 50, cursor: str | None = None
                         ) -> tuple[list[Task], str | None]:
        """Newest first; ``cursor`` is the previous page's ``next_cursor``."""

    async def queue_heads(self, lanes: Iterable[tuple[str, str]]) -> list[QueueHead]:
        """The head (highest priority, then oldest) of each non-empty (preset, lane) queue."""

    async def queued_count(self) -> int:
        """Tasks queued now, all presets together; O(1) (from the counters)."""

    async def queue_stats(self) -> Mapping[str, QueueStats]:
        """Per preset: tasks queued now and claims since open; O(1), no query. A preset that
        has had neither is absent."""

    async def age_queued(self, step_s: float, at: float | None = None) -> int:
        """Raise queued tasks' effective priority by 1 per ``step_s`` waited (ageing)."""

    async def claim(self, preset: str, lane: str, limit: int, node: str,
                    device: str) -> list[Task]:
        """Move up to ``limit`` queued tasks of (preset, lane) to running, highest priority
        first, raising each one's fencing token and its attempts."""

    async def append_events(self, task_id: str, events: Sequence[NewEvent]) -> list[Event]: ...
    async def events(self, task_id: str, after: int = 0, limit: int = 1000) -> list[Event]: ...

    async def finish(self, task_id: str, token: int, state: TaskState, output: Any = None,
                     error: dict[str, Any] | None = None,
                     events: Sequence[NewEvent] = ()) -> Task:
        """End the attempt holding ``token`` in a final state. StaleTokenError if it is not
        the task's current running attempt."""

    async def finish_many(self, items: Sequence[Finish]) -> list[Task | StaleTokenError]:
        """End many attempts in one transaction (a batch that finished together). Each
        item's answer is its final task, or the StaleTokenError that ``finish`` would raise;
        a stale item does not stop the others."""

    async def requeue(self, task_id: str, token: int, error: dict[str, Any] | None,
                      events: Sequence[NewEvent] = (), *, spent: bool = True,
                      lane: str | None = None, fallback_reason: str | None = None) -> Task:
        """Put a running attempt back in the queue: a retry (``spent``: it counts against
        max_attempts), or an attempt given back unspent (preempted, never sent, an OOM
        split, a crashed batch rerun in halves). With ``lane`` it goes back to that lane's
        queue instead of its own (a GPU OOM in a batch of one, a lost device: the CPU),
        and ``fallback_reason`` is recorded on the task."""

    async def queued(self, preset: str, lane: str, limit: int) -> list[QueuedTask]:
        """Up to ``limit`` queued tasks of (preset, lane), in the order ``claim`` would take
        them (highest effective priority first, then oldest): id, device wish and created_at
        only, read from the index and the task's fields, never its input."""

    async def move_queued(self, task_ids: Sequence[str], lane: str, reason: str,
                          events: Sequence[NewEvent] = ()) -> list[Task]:
        """Move tasks that are still queued in another lane to ``lane``'s queue, keeping
        their place by priority and age: ``fallback_reason`` becomes ``reason`` and
        ``events`` are appended to each (the fallback event), in one atomic write for the
        whole list. Tasks no longer queued, or already in ``lane``, are skipped; returns the
        moved tasks as they now stand, in the order asked. The store wakes other nodes'
        schedulers (``on_work``) and this process's waiters on each task; the caller wakes
        its own scheduler."""

    async def lane_stats(self) -> Mapping[tuple[str, str], LaneStats]:
        """Per (preset, lane): queued now, running now (every node) and the oldest queued
        task's ``created_at``. For status views: may cost a query, never a scan of every
        task. A queue with neither queued nor running tasks may be absent."""

    async def cancel_queued(self, task_id: str) -> Task | None:
        """Cancel a task that is still queued; None if it was not queued any more."""

    async def retry_failed(self, task_id: str) -> Task | None:
        """Put a dead letter (a ``failed`` or ``cancelled`` task) back in the queue with its
        attempts reset to 0 and a ``queued`` state event saying so; None when the task is
        unknown or not failed/cancelled (``get`` tells the two apart)."""

    async def heartbeat(self, node: str, held: Sequence[tuple[str, int]]
                        ) -> list[tuple[str, int]]:
        """``node`` still holds these running attempts (task id, fencing token): stamp their
        heartbeat. Returns those it held in vain: no longer the task's running attempt on
        ``node`` (reaped meanwhile, perhaps claimed again elsewhere; ended): the runtime stops
        working on them, since their outcome can no longer be recorded."""

    async def reap(self, stale_before: float,
                   max_attempts: Mapping[str, int] | None = None) -> list[Task]:
        """Take back every ``running`` attempt, of any node, whose heartbeat (its claim, when
        it never had one) is older than ``stale_before``: its owner died or lost it. The
        attempt is spent: the task is requeued, or failed (``worker_died``, code
        ``claim_expired``) once its attempts reach its preset's ``max_attempts``. Returns the
        tasks as they now stand."""

    async def purge(self, finished_before: float, max_batches: int | None = None
                    ) -> PurgeReport:
        """Delete finished tasks whose ``finished_at`` is older than ``finished_before``, with
        their events and idempotency keys, in small transactions that let the node's own
        writes in between (at most ``max_batches`` of them this call); off the event loop
        where the backend can."""

    async def recover(self, node: str) -> int:
        """Requeue the tasks a previous run of ``node`` left running, their attempts given
        back (a restart is not the task's fault); returns how many."""

    async def running_nodes(self) -> set[str]:
        """Every node that holds at least one running attempt now (a fleet's live nodes
        compare it with the node registry to find the dead ones)."""

    async def reap_node(self, node: str, max_attempts: Mapping[str, int] | None = None
                        ) -> list[Task]:
        """Take back every running attempt of ``node`` (dead: its registration expired) at
        once, without waiting for the claim TTL. Spent, as ``reap`` spends them: the task is
        requeued, or failed (``worker_died``, code ``node_lost``) past its max_attempts.
        Returns the tasks as they now stand."""

    def follow(self, task_id: str, after: int, quiet_s: float) -> AsyncIterator[list[Event]]:
        """The task's events after number ``after``, in batches as they land (whichever node
        writes them); an empty batch after ``quiet_s`` without one. Ends after the task's
        final state event, or at once for an unknown task."""


class TaskNotifier(Notifier):
    """A store's wake-ups: :class:`~gpulane.notify.Notifier` per task id, plus result waits.

    SSE streams use ``version`` and ``wait``. Result long-polls use ``until_final`` instead:
    they sleep through a task's intermediate changes (claimed, progress events) and get the
    final task handed to them, so they need no read of their own.
    """

    def __init__(self) -> None:
        super().__init__()
        self._final: Waiters[Task | None] = Waiters()

    def notify(self, key: str, task: Task | None = None) -> None:
        """The task changed. ``task`` is how it stands now, when the caller has it: a
        non-final one does not wake result waiters; without one, everyone wakes and re-reads.
        A final one is the task's last change: every waiter is woken, then its entry dropped
        (so the notifier holds live tasks only)."""
        super().notify(key)
        final = task is not None and task.state.final
        if key in self._final and (task is None or final):
            self._final.wake(key, task)
        if final:
            self.forget(key)

    def waited_on(self, key: str) -> bool:
        return super().waited_on(key) or key in self._final

    def wake_all(self) -> None:
        """Every waiter re-reads, and the entries of keys nobody waits on go: changes may
        have happened unheard (a store's wake-up channel was down a while), among them ends
        whose message would have dropped an entry, which would then be kept for good."""
        waited = self._waiters.keys() | self._final.keys()
        for key in list(self._versions.keys() - waited):
            self.forget(key)
        for key in list(waited):
            self.notify(key)

    def __len__(self) -> int:
        return len(self._versions.keys() | self._waiters.keys() | self._final.keys())

    async def until_final(self, task_id: str, seen_version: int,
                          timeout: float) -> Task | bool:
        """Wait for the task's final state: the final task when a notify carried it, True
        when the caller must re-read (it changed before the wait, or a notify carried no
        task), False when ``timeout`` passed."""
        return await self.until_any_final({task_id: seen_version}, timeout)

    async def until_any_final(self, seen: Mapping[str, int], timeout: float) -> Task | bool:
        """``until_final`` for many tasks at once (``seen``: each id's version as read before
        the caller read the tasks): woken by the first of them to end (or change without a
        task). The entries go with the wait, so a thousand-id wait holds nothing once it
        answers."""
        for task_id, version in seen.items():
            if self.version(task_id) != version:
                return True
        try:
            task = await self._final.park(seen, timeout)
        except TimeoutError:
            return False
        return True if task is None else task


async def finish_one(store: Store, task_id: str, token: int, state: TaskState,
                     output: Any = None, error: dict[str, Any] | None = None,
                     events: Sequence[NewEvent] = ()) -> Task:
    """``Store.finish`` as one item of ``finish_many``, its stale answer raised."""
    (got,) = await store.finish_many([Finish(task_id, token, state, output, error, events)])
    if isinstance(got, StaleTokenError):
        raise got
    return got


def requeued_event(error: dict[str, Any] | None, lane: str | None,
                   fallback_reason: str | None) -> NewEvent:
    """The state event of an attempt put back in the queue; a move to another lane (a
    fallback) names the lane and the reason, as a submit's first event does."""
    data: dict[str, Any] = {"state": "queued", "retry_after_error": error}
    if lane is not None:
        data["lane"] = lane
    if fallback_reason is not None:
        data["fallback_reason"] = fallback_reason
    return NewEvent("state", data)


async def follow_by_notifier(store: Store, task_id: str, after: int, quiet_s: float
                             ) -> AsyncIterator[list[Event]]:
    """``Store.follow`` for a store whose every write this process sees (its notifier hears
    of each one): read, then sleep on the notifier until the next change."""
    while True:
        seen = store.notifier.version(task_id)
        events = await store.events(task_id, after)
        for i, e in enumerate(events):
            if e.type == "state" and e.data.get("state") in FINAL_STATES:
                yield events[:i + 1]
                return
        if events:
            after = events[-1].seq
            yield events
            continue
        task = await store.get(task_id)
        if task is None or task.state.final:
            return
        if not await store.notifier.wait(task_id, seen, quiet_s):
            yield []


async def wait_final(store: Store, task_id: str, timeout: float) -> Task | None:
    """The task once it is final, or as it stands when ``timeout`` passes (None if unknown)."""
    loop = asyncio.get_running_loop()  # its clock: the one asyncio.timeout counts on
    deadline = loop.time() + timeout
    while True:
        seen = store.notifier.version(task_id)
        task = await store.get(task_id)
        if task is None or task.state.final:
            return task
        left = deadline - loop.time()
        if left <= 0:
            return task
        got = await store.notifier.until_final(task_id, seen, left)
        if isinstance(got, Task):
            return got
        if got is False:
            return await store.get(task_id)


async def wait_final_many(store: Store, ids: Sequence[str], timeout: float, *,
                          every: bool = False) -> list[Task | None]:
    """Many tasks (None for an unknown id), in the order asked: at once when any of them is
    final or unknown, else once the first ends or ``timeout`` passes; with ``every``, once
    all are final or ``timeout`` passes. One read for the lot, then reads of only the ids
    whose version moved, and one notifier wait per wake-up, whatever the number of ids."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    notifier = store.notifier
    unique = list(dict.fromkeys(ids))
    seen = {i: notifier.version(i) for i in unique}
    got = dict(zip(unique, await store.get_many(unique), strict=True))
    while True:
        open_ = {i: seen[i] for i, t in got.items() if t is not None and not t.state.final}
        if not open_ or (not every and len(open_) < len(got)):
            break
        left = deadline - loop.time()
        if left <= 0:
            break
        woke = await notifier.until_any_final(open_, left)
        if isinstance(woke, Task):
            got[woke.id] = woke
        # Re-read only what moved (the task handed over aside): a finished batch bumps
        # its tasks together, the rest of a thousand ids did not change. On a timeout,
        # every open one is read once more (as wait_final does: a change may have been
        # unheard, written by another node).
        moved = [i for i, v in open_.items() if (woke is False or notifier.version(i) != v)
                 and not (isinstance(woke, Task) and i == woke.id)]
        if moved:
            for i in moved:
                seen[i] = notifier.version(i)
            got.update(zip(moved, await store.get_many(moved), strict=True))
        if woke is False:
            break
    return [got[i] for i in ids]
