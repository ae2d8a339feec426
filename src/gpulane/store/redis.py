"""The fleet's store: every node of a fleet on one Redis server (redis.asyncio, hiredis).

Each store method is one round trip: a Lua script (redis_scripts.py) that checks and writes
atomically on the server, fencing every finish, requeue, heartbeat and takeover by the task's
token. Tasks are hashes (redis_codec.py), queues sorted sets ordered by effective priority
then seq, events a stream per task whose entry ids are the event numbers, so ``events(after)``
and a ``Last-Event-ID`` resume are one XRANGE, and ``follow`` tails a task that another node
runs with ``XREAD BLOCK`` on a pool of connections of its own (redis_follow.py).

Wake-ups: this store's writes notify its TaskNotifier as the SQLite store's do; the other stores'
writes arrive by pub/sub (redis_wakeups.py). Retention: a task that ends gets a TTL (``retain_s``
and half again: the purge normally deletes it first and exactly, the TTL is the backstop when no
node purges), and ``purge`` deletes what finished before its cutoff in small batches. Calls go
through one pipelined connection of the store's own (redis_conn.py says why). Redis unreachable:
every method raises StoreUnavailableError within about a second (a refused connection at once, a
connect timeout of 1 s), and the next call after the server is back connects again by itself.

What fails how (for docs/fleet.md): a write that the server applied but whose answer was lost
raises StoreUnavailableError too; a claim lost so is reaped after the claim TTL, a submit is
made safe by its idempotency key. The ``rows`` of a purge report count what the scripts kept
count of: a task that expired under its TTL before any purge leaves its events in the count.
Timestamps (created, started, heartbeats, finished) are the writing node's clock: a fleet's
clocks must agree (NTP), since skew between two nodes eats into the claim TTL the reaper
compares heartbeats with. ``on_work`` runs in the subscriber's read callback: it must be
quick and must not block (set an event).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from typing import Any

import orjson

from gpulane.errors import StaleTokenError, StoreError
from gpulane.model import ErrorKind, Event, Task, TaskSpec, TaskState, task_error
from gpulane.store import redis_scripts as lua
from gpulane.store import redis_scripts_lanes as lanes
from gpulane.store import redis_scripts_upkeep as upkeep
from gpulane.store.base import (
    Finish,
    LaneStats,
    NewEvent,
    PurgeReport,
    QueuedTask,
    QueueHead,
    QueueStats,
    TaskNotifier,
    finish_one,
    key_reused,
    new_task,
    new_task_id,
    requeued_event,
)
from gpulane.store.group_commit import SubmitGroups
from gpulane.store.redis_codec import (
    decode_entries,
    decode_lane_stats,
    decode_queue_stats,
    decode_queued,
    decode_task,
    event_args,
    spec_args,
)
from gpulane.store.redis_conn import RespConnection
from gpulane.store.redis_follow import Tails, follow
from gpulane.store.redis_guard import guarded as _guarded
from gpulane.store.redis_guard import num as _num
from gpulane.store.redis_wakeups import Wakeups

DEFAULT_RETAIN_S = 7 * 24 * 3600.0
"""How long a finished task is kept when the caller does not say (config's default)."""

DEFAULT_EVENTS_MAX = 10_000
"""Events kept per task when the caller does not say (config's default)."""

TTL_FACTOR = 1.5
"""A finished task's keys expire after this many retention periods (the purge, run every half
period, deletes them first)."""

PAGE_SCAN_MAX = 2_000
"""Most index entries one listing call looks at (a few ms of the server): past it a filter
that few tasks pass answers a short page with a cursor to go on, not a scan of every task."""

AGE_BATCH_TASKS = 1_000
"""Queued tasks one ageing call looks at (a few ms of the server); a deeper backlog takes
several calls."""

PURGE_BATCH_TASKS = 200
"""Finished tasks deleted per script call: each call holds the server a millisecond or so."""

class RedisStore:
    """Store on a Redis server that many nodes share (``redis://host:port/db``)."""

    def __init__(self, url: str, *, retain_s: float = DEFAULT_RETAIN_S,
                 events_max: int = DEFAULT_EVENTS_MAX) -> None:
        self.url = url
        self.notifier = TaskNotifier()
        self.on_work: Callable[[], None] = _nothing
        self.events_max = events_max
        self._ttl = str(max(1, math.ceil(retain_s * TTL_FACTOR)))
        self._instance = os.urandom(6).hex()  # tells this store's messages from the others'
        self._conn = RespConnection(url)  # every call but the blocking ones (redis_conn.py)
        self._tails = Tails(url)  # followers' blocking reads (redis_follow.py)
        self._wakeups = Wakeups(self._conn, self._instance, self.notifier, self._work_heard)
        # Queues that queue_heads found empty and that got no work since: it asks Redis only
        # about the others (the scheduler asks after every change, mostly about empty ones).
        # Work queued by any store comes off it: this one's own writes, the others' by
        # pub/sub (a queue that was empty gets a message), all of them after a reconnect.
        self._empty: set[tuple[str, str]] = set()
        self._work_seen = 0  # rises with each report of work: a stale "empty" is not kept
        self.submit_groups = SubmitGroups(lambda specs: self._submit_now(specs))

    async def _run(self, script: str, *args: Any, at: float | None = None) -> Any:
        """Call one script; the prelude's arguments (instance, now, events cap, TTL) first."""
        now = time.time() if at is None else at
        return await self._conn.script(script, self._instance, _num(now), self.events_max,
                                       self._ttl, *args)

    def _work_heard(self, queues: list[tuple[str, str]] | None) -> None:
        """Another store gave these queues work (None: any queue may have got work)."""
        self._work_here(queues)
        self.on_work()

    def _work_here(self, queues: Iterable[tuple[str, str]] | None) -> None:
        self._work_seen += 1
        if queues is None:
            self._empty.clear()
        else:
            self._empty.difference_update(queues)

    # -- lifecycle -------------------------------------------------------------------------

    @_guarded
    async def open(self) -> None:
        self._conn.open()
        # The first call; it sets the per-lane queued counters (older releases kept none).
        await self._run(lanes.LANE_STATS)
        await self._wakeups.start()

    async def close(self) -> None:
        await self._wakeups.stop()
        await self._tails.close()
        self._conn.close()

    # -- submit ----------------------------------------------------------------------------

    async def submit(self, spec: TaskSpec) -> tuple[Task, bool]:
        return (await self.submit_many([spec]))[0]

    async def submit_many(self, specs: Sequence[TaskSpec]) -> list[tuple[Task, bool]]:
        # Submits made side by side share one script call (store/group_commit.py).
        return await self.submit_groups.submit(specs) if specs else []

    @_guarded
    async def _submit_now(self, specs: Sequence[TaskSpec]) -> list[tuple[Task, bool]]:
        now = time.time()
        ids = [new_task_id() for _ in specs]
        args: list[Any] = [len(specs)]
        for tid, spec in zip(ids, specs, strict=True):
            args += spec_args(tid, spec)
        got = await self._run(lua.SUBMIT, *args, at=now)
        if got[0] == b"conflict":
            raise key_reused(got[1].decode(), got[2].decode())
        self._work_here({(spec.preset, spec.lane) for spec in specs})
        out: list[tuple[Task, bool]] = []
        for tid, spec, (created, value) in zip(ids, specs, got[1], strict=True):
            if created:
                task = new_task(tid, spec, int(value), now)
                self.notifier.notify(task.id, task)
                out.append((task, True))
            else:
                out.append((decode_task(value), False))
        return out

    @_guarded
    async def task_for_key(self, key: str) -> Task | None:
        flat = await self._run(lua.BY_KEY, key)
        return decode_task(flat) if flat else None

    # -- reads -----------------------------------------------------------------------------

    @_guarded
    async def get(self, task_id: str) -> Task | None:
        flat = await self._conn.call("HGETALL", lua.PREFIX + "t:" + task_id)
        return decode_task(flat) if flat else None

    @_guarded
    async def get_many(self, ids: Sequence[str]) -> list[Task | None]:
        if not ids:
            return []
        flats = await self._conn.script(lua.GET_MANY, *ids)
        return [decode_task(flat) if flat else None for flat in flats]

    @_guarded
    async def list_tasks(self, state: TaskState | None = None, preset: str | None = None,
                         limit: int = 50, cursor: str | None = None
                         ) -> tuple[list[Task], str | None]:
        # The smallest index that holds the page: a state's own (all but succeeded have
        # one), else the preset's, else every task's; the script filters the rest.
        if state is not None and state is not TaskState.SUCCEEDED:
            index = "s:" + state.value
        elif preset is not None:
            index = "p:" + preset
        else:
            index = "all"
        below = "+inf" if not cursor else "(" + str(int(cursor))
        *flats, stopped = await self._run(upkeep.PAGE, index, below, limit + 1,
                                          state.value if state else "", preset or "",
                                          PAGE_SCAN_MAX)
        tasks = [decode_task(f) for f in flats[:limit]]
        if len(flats) > limit:
            return tasks, str(tasks[-1].seq)
        # A scan stopped at its budget: a short page (maybe empty) that goes on from there.
        return tasks, stopped.decode() if stopped else None

    @_guarded
    async def queue_heads(self, lanes: Iterable[tuple[str, str]]) -> list[QueueHead]:
        ask = [pair for pair in lanes if pair not in self._empty]
        if not ask:
            return []
        seen = self._work_seen
        rows = await self._run(lua.QUEUE_HEADS, *[x for pair in ask for x in pair])
        heads = [QueueHead(p.decode(), lane.decode(), int(prio), int(seq), tid.decode())
                 for p, lane, prio, seq, tid in rows]
        if seen == self._work_seen:  # no work was reported while the answer was on its way
            self._empty.update(set(ask) - {(h.preset, h.lane) for h in heads})
        return heads

    @_guarded
    async def age_queued(self, step_s: float, at: float | None = None) -> int:
        at = time.time() if at is None else at
        lifted, queue, after = 0, "", ""
        while True:  # in short calls: the others' calls run between them
            n, queue, after = await self._run(lua.AGE, _num(step_s), AGE_BATCH_TASKS, queue,
                                              after, at=at)
            lifted += int(n)
            if not queue:
                return lifted

    async def queued_count(self) -> int:
        return sum(s.queued for s in (await self.queue_stats()).values())

    @_guarded
    async def queue_stats(self) -> Mapping[str, QueueStats]:
        return decode_queue_stats(await self._conn.call("HGETALL", lua.PREFIX + "stats"))

    @_guarded
    async def queued(self, preset: str, lane: str, limit: int) -> list[QueuedTask]:
        return decode_queued(await self._run(lanes.QUEUED, preset, lane, limit))

    @_guarded
    async def move_queued(self, task_ids: Sequence[str], lane: str, reason: str,
                          events: Sequence[NewEvent] = ()) -> list[Task]:
        if not task_ids:
            return []
        flats = await self._run(lanes.MOVE, lane, reason, len(events),
                                *event_args([(e.type, e.data) for e in events]), *task_ids)
        tasks = [decode_task(f) for f in flats]
        self._work_here([(t.preset, lane) for t in tasks])
        for task in tasks:
            self.notifier.notify(task.id, task)
        return tasks

    @_guarded
    async def lane_stats(self) -> Mapping[tuple[str, str], LaneStats]:
        return decode_lane_stats(await self._run(lanes.LANE_STATS))

    # -- claim, events, finish ---------------------------------------------------------------

    @_guarded
    async def claim(self, preset: str, lane: str, limit: int, node: str,
                    device: str) -> list[Task]:
        seen = self._work_seen
        flats = await self._run(lua.CLAIM, preset, lane, limit, node, device)
        if len(flats) < limit and seen == self._work_seen:  # it emptied the queue
            self._empty.add((preset, lane))
        tasks = [decode_task(f) for f in flats]
        for t in tasks:
            self.notifier.notify(t.id, t)
        return tasks

    @_guarded
    async def append_events(self, task_id: str, events: Sequence[NewEvent]) -> list[Event]:
        if not events:
            return []
        now = time.time()
        got = await self._run(lua.APPEND, task_id,
                              *event_args([(e.type, e.data) for e in events]), at=now)
        if got is None:
            raise StoreError(f"no task {task_id!r} to append events to")
        first = int(got[0]) - len(events) + 1
        out = [Event(task_id, first + i, e.type, e.data, now) for i, e in enumerate(events)]
        self.notifier.notify(task_id)
        if TaskState(got[1].decode()).final:  # a late event of an attempt that ended
            self.notifier.forget(task_id)
        return out

    @_guarded
    async def events(self, task_id: str, after: int = 0, limit: int = 1000) -> list[Event]:
        entries = await self._conn.call("XRANGE", lua.PREFIX + "e:" + task_id,
                                         f"{after + 1}-0", "+", "COUNT", limit)
        return decode_entries(task_id, entries)

    def follow(self, task_id: str, after: int, quiet_s: float) -> AsyncIterator[list[Event]]:
        return follow(self, self._tails, task_id, after, quiet_s)

    async def finish(self, task_id: str, token: int, state: TaskState, output: Any = None,
                     error: dict[str, Any] | None = None,
                     events: Sequence[NewEvent] = ()) -> Task:
        return await finish_one(self, task_id, token, state, output, error, events)

    @_guarded
    async def finish_many(self, items: Sequence[Finish]) -> list[Task | StaleTokenError]:
        for item in items:
            if not item.state.final:
                raise StoreError(f"finish() needs a final state, not {item.state.value}")
        if not items:
            return []
        args: list[Any] = [len(items)]
        for item in items:
            # The final state event is the script's to add (it has the state and error).
            args += [item.task_id, item.token, item.state.value, orjson.dumps(item.output),
                     orjson.dumps(item.error) if item.error else "", len(item.events),
                     *event_args([(e.type, e.data) for e in item.events])]
        answers = await self._run(lua.FINISH, *args)
        out = [self._answer(item.task_id, item.token, a) for item, a in zip(items, answers,
                                                                          strict=True)]
        for got in out:
            if isinstance(got, Task):
                self.notifier.notify(got.id, got)
        return out

    @staticmethod
    def _answer(task_id: str, token: int, answer: list[Any]) -> Task | StaleTokenError:
        """A fenced write's answer: the task as it now stands, or why nothing changed."""
        if answer[0] == b"ok":
            return decode_task(answer[1])
        if answer[0] == b"missing":
            return StaleTokenError(f"no task {task_id!r}")
        return StaleTokenError(
            f"task {task_id} token {token} is stale: the task is {answer[1].decode()} with "
            f"token {answer[2].decode()}")

    @_guarded
    async def requeue(self, task_id: str, token: int, error: dict[str, Any] | None,
                      events: Sequence[NewEvent] = (), *, spent: bool = True,
                      lane: str | None = None, fallback_reason: str | None = None) -> Task:
        evs = [(e.type, e.data) for e in [*events, requeued_event(error, lane, fallback_reason)]]
        answer = await self._run(lua.REQUEUE, task_id, token,
                                 orjson.dumps(error) if error else "", "1" if spent else "0",
                                 lane or "", fallback_reason or "", *event_args(evs))
        if answer[0] == b"missing":
            raise StoreError(f"no task {task_id!r}")
        got = self._answer(task_id, token, answer)
        if isinstance(got, StaleTokenError):
            raise got
        self._work_here([(got.preset, got.lane)])
        self.notifier.notify(got.id, got)
        return got

    @_guarded
    async def cancel_queued(self, task_id: str) -> Task | None:
        error = task_error(ErrorKind.CANCELLED, "cancelled by request")
        flat = await self._run(lua.CANCEL, task_id, orjson.dumps(error),
                               orjson.dumps({"state": "cancelled", "error": error}))
        if not flat:
            return None
        task = decode_task(flat)
        self.notifier.notify(task_id, task)
        return task

    @_guarded
    async def retry_failed(self, task_id: str) -> Task | None:
        flat = await self._run(lua.RETRY, task_id)
        if not flat:
            return None
        task = decode_task(flat)
        self._work_here([(task.preset, task.lane)])
        self.notifier.notify(task_id, task)
        return task

    # -- heartbeats, takeovers, retention -----------------------------------------------------

    @_guarded
    async def heartbeat(self, node: str, held: Sequence[tuple[str, int]]
                        ) -> list[tuple[str, int]]:
        if not held:
            return []
        lost = await self._run(upkeep.HEARTBEAT, node, *[x for pair in held for x in pair])
        return [held[int(i) - 1] for i in lost]

    @_guarded
    async def reap(self, stale_before: float,
                   max_attempts: Mapping[str, int] | None = None) -> list[Task]:
        at = time.time()
        rows = await self._run(upkeep.RUNNING, "stale", _num(stale_before))
        return await self._take_back(
            [(tid, token, attempts, preset, task_error(
                ErrorKind.WORKER_DIED,
                f"node {node.decode()} stopped heartbeating this attempt ({at - float(seen):.0f}"
                " s without a word, past the claim TTL): its owner died or no longer holds it",
                code="claim_expired"))
             for tid, token, attempts, preset, node, seen in rows], max_attempts or {})

    @_guarded
    async def reap_node(self, node: str, max_attempts: Mapping[str, int] | None = None
                        ) -> list[Task]:
        rows = await self._run(upkeep.RUNNING, "node", node)
        error = task_error(ErrorKind.WORKER_DIED,
                           f"node {node} died (its registration expired) while running this "
                           "attempt", code="node_lost")
        return await self._take_back([(*r[:4], error) for r in rows], max_attempts or {})

    async def _take_back(self, rows: list[tuple[Any, ...]], limits: Mapping[str, int]
                         ) -> list[Task]:
        """Requeue, or fail past max_attempts, each running attempt (spent), in one script
        call that fences each one by its token: one that moved on since the read is left
        alone."""
        if not rows:
            return []
        args: list[Any] = [len(rows)]
        for tid, token, attempts, preset, error in rows:
            fail = int(attempts) >= limits.get(preset.decode(), int(attempts) + 1)
            ev = ({"state": "failed", "error": error} if fail
                  else {"state": "queued", "retry_after_error": error})
            args += [tid, token, "1" if fail else "0", orjson.dumps(error), orjson.dumps(ev)]
        answers = await self._run(upkeep.TAKE_BACK, *args)
        out = [decode_task(a[1]) for a in answers if a[0] == b"ok"]
        self._work_here([(t.preset, t.lane) for t in out if t.state is TaskState.QUEUED])
        for task in out:
            self.notifier.notify(task.id, task)
        return out

    @_guarded
    async def running_nodes(self) -> set[str]:
        return {n.decode() for n in await self._conn.call("SMEMBERS", lua.PREFIX + "nodes")}

    @_guarded
    async def recover(self, node: str) -> int:
        self._work_here(None)  # which queues it refills is known only after the call
        return int(await self._run(upkeep.RECOVER, node))

    @_guarded
    async def purge(self, finished_before: float, max_batches: int | None = None
                    ) -> PurgeReport:
        tasks = events = keys = batches = 0
        longest = 0.0
        while max_batches is None or batches < max_batches:
            started = time.perf_counter()
            found, t, e, k = await self._run(upkeep.PURGE, _num(finished_before), PURGE_BATCH_TASKS)
            if not found:
                break
            longest = max(longest, time.perf_counter() - started)
            tasks, events, keys, batches = tasks + t, events + e, keys + k, batches + 1
            if found < PURGE_BATCH_TASKS:
                break
        n_tasks, n_events, n_keys = await self._run(upkeep.COUNTS)
        info: bytes = await self._conn.call("INFO", "memory")
        used = next(line for line in info.splitlines() if line.startswith(b"used_memory:"))
        return PurgeReport(tasks=tasks, events=events, keys=keys, batches=batches,
                           longest_batch_s=longest, db_bytes=int(used.split(b":")[1]),
                           rows={"tasks": int(n_tasks), "events": int(n_events),
                                 "idempotency": int(n_keys)})


def _nothing() -> None:
    """``on_work`` until the node sets its own."""
