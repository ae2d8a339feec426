"""The online lane's store: tasks of ``durable: false`` presets, in this process's memory.

The hot path of a store, with nothing written anywhere: submit (idempotency keys included),
reads, queue heads and counters, claim, events, finish, requeue, cancel, the fallback moves.
Plain dicts, a heap per (preset, lane) queue and two deques in time order; each call costs
O(1) per task touched (O(log n) for the heap). It is not a Store on its own: the tiered store
(``tiered.py``) puts it in front of a durable one, hands it the one notifier both share,
and takes tasks out of it (``take``) to write them to the durable store when they fail or
outlive the spill window. Upkeep that only a durable store needs (reaping, recovery,
retention of what is written, ageing) is not here: an online task that would need it has been
spilled by then.
"""

from __future__ import annotations

import heapq
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from gpulane.errors import StaleTokenError, StoreError
from gpulane.model import (
    ErrorKind,
    Event,
    Placement,
    Task,
    TaskSpec,
    TaskState,
    now,
    task_error,
)
from gpulane.store.base import (
    Finish,
    LaneStats,
    NewEvent,
    QueuedTask,
    QueueHead,
    TaskNotifier,
    key_reused,
    new_task,
    new_task_id,
    requeued_event,
)


@dataclass(slots=True)
class Held:
    """One task in memory, with what the durable store would keep beside it."""

    task: Task
    events: list[Event]
    body_hash: str | None
    born: float
    """When it was submitted, on the store's monotonic clock (the spill window counts it)."""
    ended: float | None = None
    """When it ended, on the same clock (the keep window counts it)."""
    node: str | None = None
    """The node running it (None unless running)."""


@dataclass(slots=True)
class _Queue:
    """One (preset, lane) queue: a heap of (-priority, seq, id); entries of tasks that left
    it (claimed, cancelled, moved) are skipped when they come up, not searched for."""

    heap: list[tuple[int, int, str]] = field(default_factory=list)
    count: int = 0


class MemoryStore:
    """Tasks held in memory only (see the module docstring for what it is not).

    A Task handed out is never changed afterwards (each change makes a new one, as a
    database read would): a caller may keep what it got as a snapshot."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.notifier = TaskNotifier()
        self.clock = clock
        self._held: dict[str, Held] = {}
        self._keys: dict[str, str] = {}  # idempotency key -> task id
        self._queues: dict[tuple[str, str], _Queue] = {}
        self._running: Counter[tuple[str, str]] = Counter()
        self._claimed: Counter[str] = Counter()
        self._seq = 0
        self._live: deque[tuple[float, str]] = deque()  # (born, id), submit order
        self._ended: deque[tuple[float, str]] = deque()  # (ended, id), end order

    def __len__(self) -> int:
        return len(self._held)

    def __contains__(self, task_id: object) -> bool:
        return task_id in self._held

    def ids(self) -> list[str]:
        """Every task held now."""
        return list(self._held)

    def held(self, task_id: str) -> Held:
        """A task with its events and key (KeyError when not held)."""
        return self._held[task_id]

    # -- submit ----------------------------------------------------------------------------

    def known(self, spec: TaskSpec) -> Task | None:
        """The task ``spec``'s idempotency key made here, if any; ConflictError when the key
        was used for a different body."""
        if spec.idempotency_key is None:
            return None
        tid = self._keys.get(spec.idempotency_key)
        if tid is None:
            return None
        held = self._held[tid]
        if held.body_hash != spec.body_hash:
            raise key_reused(spec.idempotency_key, tid)
        return held.task

    def add(self, spec: TaskSpec) -> Task:
        """A new queued task (the caller checked its key with ``known``)."""
        self._seq += 1
        created = now()
        task = new_task(new_task_id(), spec, self._seq, created)
        first = Event(task.id, 1, "state", {"state": "queued", "lane": spec.lane,
                                            "fallback_reason": spec.fallback_reason}, created)
        born = self.clock()
        self._held[task.id] = Held(task, [first], spec.body_hash, born)
        if spec.idempotency_key is not None:
            self._keys[spec.idempotency_key] = task.id
        self._enqueue(task)
        self._live.append((born, task.id))
        self.notifier.notify(task.id, task)
        return task

    def _enqueue(self, task: Task) -> None:
        q = self._queues.get((task.preset, task.lane))
        if q is None:
            q = self._queues[(task.preset, task.lane)] = _Queue()
        heapq.heappush(q.heap, (-task.priority, task.seq, task.id))
        q.count += 1

    def task_for_key(self, key: str) -> Task | None:
        tid = self._keys.get(key)
        return None if tid is None else self._held[tid].task

    # -- reads -----------------------------------------------------------------------------

    def get(self, task_id: str) -> Task | None:
        held = self._held.get(task_id)
        return None if held is None else held.task

    def _head(self, q: _Queue, lane: tuple[str, str]) -> tuple[int, int, str] | None:
        """The queue's first entry of a task still queued in it (stale entries dropped)."""
        heap = q.heap
        while heap:
            _prio, _seq, tid = top = heap[0]
            held = self._held.get(tid)
            if (held is not None and held.task.state is TaskState.QUEUED
                    and (held.task.preset, held.task.lane) == lane
                    and held.task.seq == _seq):
                return top
            heapq.heappop(heap)
        return None

    def queue_heads(self, lanes: Iterable[tuple[str, str]]) -> list[QueueHead]:
        heads = []
        for lane in lanes:
            q = self._queues.get(lane)
            if q is None or q.count <= 0:
                continue
            top = self._head(q, lane)
            if top is not None:
                heads.append(QueueHead(lane[0], lane[1], -top[0], top[1], top[2]))
        return heads

    def queued_count(self) -> int:
        return sum(q.count for q in self._queues.values())

    def lane_counts(self) -> tuple[dict[tuple[str, str], int], Mapping[str, int]]:
        """Queued now per (preset, lane), and claims since open per preset."""
        return ({k: q.count for k, q in self._queues.items()}, self._claimed)

    def queued(self, preset: str, lane: str, limit: int) -> list[QueuedTask]:
        q = self._queues.get((preset, lane))
        if q is None or not q.count:
            return []
        out = []
        for _p, seq, tid in sorted(q.heap):
            held = self._held.get(tid)
            if (held is None or held.task.state is not TaskState.QUEUED
                    or held.task.seq != seq or held.task.lane != lane):
                continue
            out.append(QueuedTask(tid, held.task.device_wish, held.task.created_at))
            if len(out) >= limit:
                break
        return out

    def lane_stats(self) -> dict[tuple[str, str], LaneStats]:
        queued = {k: q.count for k, q in self._queues.items() if q.count > 0}
        oldest: dict[tuple[str, str], float] = {}
        # One pass over the live tasks (bounded by the spill window: older ones left memory),
        # stopping once every queue with queued tasks has its oldest.
        for _born, tid in self._live:
            if len(oldest) == len(queued):
                break
            held = self._held.get(tid)
            if held is None or held.task.state is not TaskState.QUEUED:
                continue
            lane = (held.task.preset, held.task.lane)
            if lane not in oldest or held.task.created_at < oldest[lane]:
                oldest[lane] = held.task.created_at
        out: dict[tuple[str, str], LaneStats] = {}
        for lane in queued.keys() | {k for k, n in self._running.items() if n > 0}:
            out[lane] = LaneStats(queued.get(lane, 0), self._running.get(lane, 0),
                                  oldest.get(lane))
        return out

    # -- claim, events, finish ---------------------------------------------------------------

    def claim(self, preset: str, lane: str, limit: int, node: str, device: str,
              ahead_of: tuple[int, str] | None = None) -> list[Task]:
        """As ``Store.claim``; with ``ahead_of`` (a priority and a task id), only tasks that
        rank before that task (higher priority, or as high and older): the head of the same
        queue in the durable store, so that neither tier starves the other."""
        key = (preset, lane)
        q = self._queues.get(key)
        out: list[Task] = []
        if q is None:
            return out
        started = now()
        while len(out) < limit and q.count > 0:
            top = self._head(q, key)
            if top is None:
                break
            if ahead_of is not None and (-top[0], _neg_id(top[2])) < (ahead_of[0],
                                                                       _neg_id(ahead_of[1])):
                break
            heapq.heappop(q.heap)
            q.count -= 1
            held = self._held[top[2]]
            old = held.task
            t = held.task = replace(old, state=TaskState.RUNNING, attempts=old.attempts + 1,
                                    token=old.token + 1, started_at=started,
                                    placement=Placement(node, device, old.fallback_reason))
            held.node = node
            self._append(held, [NewEvent("state", {
                "state": "running", "attempt": t.attempts, "node": node, "device": device,
                "fallback_reason": t.fallback_reason})], started)
            out.append(t)
        if out:
            self._running[key] += len(out)
            self._claimed[preset] += len(out)
        for t in out:
            self.notifier.notify(t.id, t)
        return out

    def _append(self, held: Held, events: Sequence[NewEvent], ts: float) -> list[Event]:
        base = len(held.events)
        out = [Event(held.task.id, base + i + 1, e.type, e.data, ts)
               for i, e in enumerate(events)]
        held.events.extend(out)
        return out

    def append_events(self, task_id: str, events: Sequence[NewEvent]) -> list[Event]:
        held = self._held.get(task_id)
        if held is None:
            raise StoreError(f"no task {task_id!r} to append events to")
        if not events:
            return []
        out = self._append(held, events, now())
        self.notifier.notify(task_id)
        if held.task.state.final:  # a late event of an attempt that ended: no entry
            self.notifier.forget(task_id)
        return out

    def events(self, task_id: str, after: int = 0, limit: int = 1000) -> list[Event]:
        held = self._held.get(task_id)
        if held is None:
            return []
        # Numbered 1..n with no gaps: event n sits at index n-1.
        return held.events[max(after, 0):max(after, 0) + limit]

    def _current(self, task_id: str, token: int) -> Held:
        held = self._held.get(task_id)
        if held is None:
            raise StaleTokenError(f"no task {task_id!r}")
        t = held.task
        if t.state is not TaskState.RUNNING or t.token != token:
            raise StaleTokenError(f"task {task_id} token {token} is stale: the task is "
                                  f"{t.state.value} with token {t.token}")
        return held

    def finish(self, item: Finish) -> Task:
        """End one running attempt (StaleTokenError if ``item.token`` is not current)."""
        if not item.state.final:
            raise StoreError(f"finish() needs a final state, not {item.state.value}")
        held = self._current(item.task_id, item.token)
        ended = now()
        self._append(held, [*item.events, NewEvent("state", {"state": item.state.value,
                                                             "error": item.error})], ended)
        t = held.task = replace(held.task, state=item.state, output=item.output,
                                error=item.error, finished_at=ended)
        self._running[(t.preset, t.lane)] -= 1
        self._ended_now(held)
        self.notifier.notify(t.id, t)
        return t

    def _ended_now(self, held: Held) -> None:
        held.ended = self.clock()
        held.node = None
        self._ended.append((held.ended, held.task.id))

    def requeue(self, task_id: str, token: int, error: dict[str, Any] | None,
                events: Sequence[NewEvent] = (), *, spent: bool = True,
                lane: str | None = None, fallback_reason: str | None = None) -> Task:
        held = self._current(task_id, token)
        old = held.task
        self._append(held, [*events, requeued_event(error, lane, fallback_reason)], now())
        self._running[(old.preset, old.lane)] -= 1
        held.node = None
        return self._requeued(held, state=TaskState.QUEUED, error=error, placement=None,
                              attempts=old.attempts - (0 if spent else 1),
                              lane=old.lane if lane is None else lane,
                              fallback_reason=fallback_reason or old.fallback_reason)

    def _requeued(self, held: Held, **changes: Any) -> Task:
        """A task back in its queue: a new place (a new seq: older entries go stale)."""
        self._seq += 1
        t = held.task = replace(held.task, seq=self._seq, **changes)
        self._enqueue(t)
        self.notifier.notify(t.id, t)
        return t

    def move_queued(self, task_ids: Sequence[str], lane: str, reason: str,
                    events: Sequence[NewEvent] = ()) -> list[Task]:
        moved = []
        for tid in task_ids:
            held = self._held.get(tid)
            if held is None or held.task.state is not TaskState.QUEUED or held.task.lane == lane:
                continue
            old = held.task
            self._queues[(old.preset, old.lane)].count -= 1
            self._append(held, events, now())
            t = held.task = replace(old, lane=lane, fallback_reason=reason)
            # Its place by priority and age: the seq it had (an entry in the new heap).
            self._enqueue(t)
            self.notifier.notify(t.id, t)
            moved.append(t)
        return moved

    def cancel_queued(self, task_id: str) -> Task | None:
        held = self._held.get(task_id)
        if held is None or held.task.state is not TaskState.QUEUED:
            return None
        error = task_error(ErrorKind.CANCELLED, "cancelled by request")
        ended = now()
        self._append(held, [NewEvent("state", {"state": "cancelled", "error": error})], ended)
        self._queues[(held.task.preset, held.task.lane)].count -= 1
        t = held.task = replace(held.task, state=TaskState.CANCELLED, error=error,
                                finished_at=ended)
        self._ended_now(held)
        self.notifier.notify(task_id, t)
        return t

    def retry_cancelled(self, task_id: str) -> Task | None:
        """A cancelled task back in the queue with fresh attempts (``Store.retry_failed``:
        a failed online task is in the durable store, never here)."""
        held = self._held.get(task_id)
        if held is None or held.task.state is not TaskState.CANCELLED:
            return None
        self._append(held, [NewEvent("state", {"state": "queued",
                                               "reason": "retried after cancelled"})], now())
        held.ended = None
        held.born = self.clock()  # a fresh start gets a fresh window
        self._live.append((held.born, task_id))
        return self._requeued(held, state=TaskState.QUEUED, attempts=0, output=None,
                              error=None, placement=None, started_at=None, finished_at=None)

    def heartbeat(self, node: str, held: Sequence[tuple[str, int]]) -> list[tuple[str, int]]:
        """Of ``held`` (all of them in memory), those not running on ``node`` under that
        token. Nothing to stamp: no reaper looks at memory (a running task outlives it only
        by the spill window, then the durable store's heartbeats cover it)."""
        lost = []
        for tid, token in held:
            h = self._held.get(tid)
            if (h is None or h.task.state is not TaskState.RUNNING or h.task.token != token
                    or h.node != node):
                lost.append((tid, token))
        return lost

    def running_nodes(self) -> set[str]:
        return {h.node for h in self._held.values()
                if h.node is not None and h.task.state is TaskState.RUNNING}

    # -- leaving memory ----------------------------------------------------------------------

    def due(self, born_before: float, limit: int) -> list[str]:
        """Ids of up to ``limit`` tasks submitted before ``born_before`` that have not ended:
        those the spill window says go to the durable store. Stale entries are dropped as
        they pass."""
        out: list[str] = []
        while self._live and self._live[0][0] < born_before and len(out) < limit:
            born, tid = self._live.popleft()
            held = self._held.get(tid)
            if held is not None and held.born == born and not held.task.state.final:
                out.append(tid)
        return out

    def not_yet(self, task_ids: Sequence[str]) -> None:
        """Put tasks that ``due`` handed out back at the front (their spill failed: the
        next round tries again)."""
        for tid in reversed(task_ids):
            held = self._held.get(tid)
            if held is not None:
                self._live.appendleft((held.born, tid))

    def take(self, task_id: str) -> Held:
        """Remove a task (to be written to the durable store); its counters go with it and
        its key is forgotten here (the durable store keeps it from now on). Its notifier entry
        stays: the shared notifier serves it wherever it lives."""
        held = self._held.pop(task_id)
        t = held.task
        if t.state is TaskState.QUEUED:
            self._queues[(t.preset, t.lane)].count -= 1
        elif t.state is TaskState.RUNNING:
            self._running[(t.preset, t.lane)] -= 1
        if t.idempotency_key is not None and self._keys.get(t.idempotency_key) == task_id:
            del self._keys[t.idempotency_key]
        return held

    def evict(self, ended_before: float) -> int:
        """Forget ended tasks that ended before ``ended_before`` (their results are gone
        from then on: 404); returns how many."""
        n = 0
        while self._ended and self._ended[0][0] < ended_before:
            ended, tid = self._ended.popleft()
            held = self._held.get(tid)
            if held is not None and held.ended == ended and held.task.state.final:
                self.take(tid)
                n += 1
        return n


def _neg_id(task_id: str) -> str:
    """Sorts so that an older id (created earlier: ids start with milliseconds) ranks higher,
    as a higher priority does: "9" - each hex digit."""
    return task_id.translate(_INVERT)


_INVERT = str.maketrans("0123456789abcdef", "fedcba9876543210")
