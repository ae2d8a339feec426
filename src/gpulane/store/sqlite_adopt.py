"""Writing online tasks into the SQLite store: the spill of the online lane (``tiered.py``).

An online task keeps everything it had in memory: its id, state, attempts, fencing token,
placement, output or error, its events with their numbers, and its idempotency key. A running
one is written as running on this node with a fresh heartbeat, so the runtime's finish
(fenced by the same token) and its heartbeats land on the row, and the reaper takes it back
if the node stops heartbeating it. Synchronous, in one write transaction: nothing else runs
on the event loop between the read of the memory tier and this write.
"""

from __future__ import annotations

from collections.abc import Sequence

from gpulane.model import TaskState, now
from gpulane.store.memory import Held
from gpulane.store.sqlite import SqliteStore
from gpulane.store.sqlite_schema import INSERT_EVENT, dumps

INSERT_TASK = (
    "INSERT INTO tasks (id, preset, state, input, output, error, priority, base_priority, "
    "device_wish, lane, timeout_s, content_type, attempts, node, device, fallback_reason, "
    "idempotency_key, created_at, started_at, finished_at, event_seq, token, submitted_by, "
    "heartbeat_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)")
"""One task row with every column a task carries (the seq is the table's next)."""


def adopt(store: SqliteStore, tasks: Sequence[Held]) -> None:
    """Insert ``tasks`` (taken from the memory tier) with their events and keys, in one
    transaction; the store's queue counters count the queued ones once it commits."""
    if not tasks:
        return
    at = now()
    with store._tx() as db:  # the store's own write gate
        for held in tasks:
            t = held.task
            running = t.state is TaskState.RUNNING
            place = t.placement
            db.execute(INSERT_TASK, (
                t.id, t.preset, t.state.value, dumps(t.input),
                dumps(t.output) if t.output is not None else None,
                dumps(t.error) if t.error else None, t.priority, t.priority,
                t.device_wish.value, t.lane, t.timeout_s, t.content_type, t.attempts,
                held.node if running else (place.node if place else None),
                place.device if place else None, t.fallback_reason, t.idempotency_key,
                t.created_at, t.started_at, t.finished_at, len(held.events), t.token,
                t.submitted_by, at if running else None))
            db.executemany(INSERT_EVENT, [(e.task_id, e.seq, e.type, dumps(e.data), e.ts)
                                          for e in held.events])
            if t.idempotency_key is not None:
                db.execute("INSERT OR REPLACE INTO idempotency (key, body_hash, task_id) "
                           "VALUES (?,?,?)", (t.idempotency_key, held.body_hash, t.id))
    for held in tasks:
        if held.task.state is TaskState.QUEUED:
            lane = (held.task.preset, held.task.lane)
            store._maybe_queued.add(lane)  # counted as its submits are
            store._queued[lane] += 1
