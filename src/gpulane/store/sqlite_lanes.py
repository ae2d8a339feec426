"""The SQLite store's lane reads and moves: a queue's tasks in claim order, tasks moved to
another lane's queue (a fallback), and each (preset, lane)'s running count and oldest wait.

Functions over the store's connection, called by ``sqlite.py`` inside its own transactions (the
writes) or on the loop (the reads). Every statement reads an index range: the queue index
(preset, lane, priority DESC, seq) for queued tasks, the running index for running ones.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Mapping, Sequence

from gpulane.model import DeviceWish, Task, now
from gpulane.store.base import LaneStats, NewEvent, QueuedTask, QueueStats
from gpulane.store.sqlite_schema import COLUMNS, INSERT_EVENT, dumps, row_to_task

MOVE_CHUNK = 500
"""Tasks one move statement names (SQLite caps a statement's parameters)."""

QUEUED = ("SELECT id, device_wish, created_at FROM tasks WHERE state='queued' AND preset=? "
          "AND lane=? ORDER BY priority DESC, seq LIMIT ?")
"""Up to N queued tasks of one (preset, lane), in the order claim takes them: what a mover
weighs, not their inputs."""

# The longest-waiting task is not the head when priorities differ (ageing lifts old tasks, but
# not above 100 nor at once): it is the oldest head among the queue's priority bands. The
# recursive part walks the bands down the queue index (one index seek each, at most 101
# bands), so the cost does not grow with the backlog and no index of its own is written on
# every submit and claim.
OLDEST = """
WITH RECURSIVE bands(prio) AS (
    SELECT MAX(priority) FROM tasks WHERE state='queued' AND preset=?1 AND lane=?2
    UNION ALL
    SELECT (SELECT MAX(priority) FROM tasks
            WHERE state='queued' AND preset=?1 AND lane=?2 AND priority < bands.prio)
    FROM bands WHERE bands.prio IS NOT NULL
)
SELECT MIN((SELECT created_at FROM tasks
            WHERE state='queued' AND preset=?1 AND lane=?2 AND priority=bands.prio
            ORDER BY seq LIMIT 1))
FROM bands WHERE bands.prio IS NOT NULL
"""
"""``created_at`` of the longest-waiting queued task of one (preset, lane), or NULL."""

RUNNING = ("SELECT preset, lane, COUNT(*) FROM tasks INDEXED BY tasks_running_on "
           "WHERE state='running' GROUP BY preset, lane")
"""Running tasks per (preset, lane). Named, the partial running index (only running tasks)
is walked; left to itself the planner walks the preset index, every task."""


def queued(db: sqlite3.Connection, preset: str, lane: str, limit: int) -> list[QueuedTask]:
    return [QueuedTask(tid, DeviceWish(wish), created)
            for tid, wish, created in db.execute(QUEUED, (preset, lane, limit))]


def oldest_queued_at(db: sqlite3.Connection, preset: str, lane: str) -> float | None:
    row = db.execute(OLDEST, (preset, lane)).fetchone()
    return None if row is None or row[0] is None else float(row[0])


def running(db: sqlite3.Connection) -> dict[tuple[str, str], int]:
    return {(preset, lane): n for preset, lane, n in db.execute(RUNNING)}


def move(db: sqlite3.Connection, task_ids: Sequence[str], lane: str, reason: str,
         events: Sequence[NewEvent]) -> list[tuple[str, Task]]:
    """Inside the caller's transaction: point each task still queued in another lane at
    ``lane``, its priority and seq (its place) kept, and append ``events`` to each. Returns
    each one moved with the lane it left, as it now stands, in the order asked; the caller
    counts them. A few statements per chunk of tasks, not per task: a mover may hand a
    whole backlog over at once, on the event loop."""
    order = {tid: i for i, tid in enumerate(dict.fromkeys(task_ids))}
    ids = list(order)
    moved: list[tuple[str, Task]] = []
    ts = now()
    for at in range(0, len(ids), MOVE_CHUNK):
        chunk = ids[at:at + MOVE_CHUNK]
        where = f"id IN ({','.join('?' * len(chunk))}) AND state='queued' AND lane != ?"
        left = dict(db.execute(f"SELECT id, lane FROM tasks WHERE {where}", (*chunk, lane)))
        if not left:
            continue
        rows = db.execute(
            f"UPDATE tasks SET lane=?, fallback_reason=?, event_seq=event_seq+? "
            f"WHERE {where} RETURNING {COLUMNS}, event_seq",
            (lane, reason, len(events), *chunk, lane)).fetchall()
        tasks = [(row_to_task(r[:-1]), r[-1] - len(events) + 1) for r in rows]
        db.executemany(INSERT_EVENT, [(t.id, first + i, e.type, dumps(e.data), ts)
                                      for t, first in tasks for i, e in enumerate(events)])
        moved += [(left[t.id], t) for t, _ in tasks]
    moved.sort(key=lambda m: order[m[1].id])
    return moved


def queue_stats(queued: Mapping[tuple[str, str], int],
                claimed: Mapping[str, int]) -> dict[str, QueueStats]:
    """Per preset, from the store's counters: queued (every lane and per lane), claims."""
    lanes: dict[str, dict[str, int]] = {p: {} for p in claimed}
    for (preset, lane), n in queued.items():
        by_lane = lanes.setdefault(preset, {})
        if n:
            by_lane[lane] = n
    return {p: QueueStats(sum(by_lane.values()), claimed.get(p, 0), by_lane)
            for p, by_lane in lanes.items()}


def lane_stats(db: sqlite3.Connection, queued: Mapping[tuple[str, str], int]
               ) -> dict[tuple[str, str], LaneStats]:
    """Per (preset, lane) with work: queued (the store's counter), running, oldest wait."""
    busy = running(db)
    return {key: LaneStats(queued.get(key, 0), busy.get(key, 0),
                           oldest_queued_at(db, *key) if queued.get(key, 0) else None)
            for key in {k for k, n in queued.items() if n} | busy.keys()}
