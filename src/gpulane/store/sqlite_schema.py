"""The SQLite store's tables, and how a row becomes a :class:`~gpulane.model.Task`.

Kept apart from ``sqlite.py`` (the store's operations) so that the layout reads in one place.
"""

from __future__ import annotations

import sqlite3
from typing import Any

import orjson

from gpulane.model import DeviceWish, Placement, Task, TaskState

SCHEMA = """
CREATE TABLE IF NOT EXISTS tasks (
    seq INTEGER PRIMARY KEY,  -- rowid: the newest task has the highest (purges take old ones)
    id TEXT NOT NULL UNIQUE,
    preset TEXT NOT NULL,
    state TEXT NOT NULL,
    input BLOB,
    output BLOB,
    error BLOB,
    priority INTEGER NOT NULL,  -- effective: base_priority lifted by waiting (ageing)
    base_priority INTEGER NOT NULL,  -- what the submitter asked for
    device_wish TEXT NOT NULL,
    lane TEXT NOT NULL,
    timeout_s REAL,
    content_type TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    node TEXT,
    device TEXT,
    fallback_reason TEXT,
    idempotency_key TEXT,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    event_seq INTEGER NOT NULL DEFAULT 0,
    token INTEGER NOT NULL DEFAULT 0,  -- fencing token: +1 on every claim, never lowered
    submitted_by TEXT,  -- the API key's name
    heartbeat_at REAL  -- while running: when its owner last said it still holds it
);
-- Partial indexes: a task is in the queue index only while queued and in the running index
-- only while running, so the writes that end a task touch one index, not two.
DROP INDEX IF EXISTS tasks_queue;
DROP INDEX IF EXISTS tasks_running;
CREATE INDEX IF NOT EXISTS tasks_queued ON tasks (preset, lane, priority DESC, seq)
    WHERE state='queued';
CREATE INDEX IF NOT EXISTS tasks_running_on ON tasks (node) WHERE state='running';
-- Listings (sqlite_listing.py says why no index has the state in it): by preset, an index
-- written once per task; the dead letters (failed, cancelled), partial indexes written only
-- when a task ends so. Retention finds what finished long ago by tasks_finished.
DROP INDEX IF EXISTS tasks_state;
DROP INDEX IF EXISTS tasks_state_preset;
CREATE INDEX IF NOT EXISTS tasks_preset ON tasks (preset, seq);
CREATE INDEX IF NOT EXISTS tasks_failed ON tasks (seq) WHERE state='failed';
CREATE INDEX IF NOT EXISTS tasks_cancelled ON tasks (seq) WHERE state='cancelled';
CREATE INDEX IF NOT EXISTS tasks_finished ON tasks (finished_at)
    WHERE state IN ('succeeded','failed','cancelled');
CREATE TABLE IF NOT EXISTS events (
    task_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    type TEXT NOT NULL,
    data BLOB NOT NULL,
    ts REAL NOT NULL,
    PRIMARY KEY (task_id, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS idempotency (
    key TEXT PRIMARY KEY,
    body_hash TEXT,
    task_id TEXT NOT NULL
) WITHOUT ROWID;
"""

COLUMNS = ("seq, id, preset, state, input, output, error, base_priority, device_wish, lane, "
           "timeout_s, content_type, attempts, node, device, fallback_reason, idempotency_key, "
           "created_at, started_at, finished_at, token, submitted_by")
"""The task columns that :func:`row_to_task` reads, in its order."""

ADDED_COLUMNS = {
    "token": "INTEGER NOT NULL DEFAULT 0",
    "submitted_by": "TEXT",
    "heartbeat_at": "REAL",
}
"""Columns added since the first release: a database made before gets them on open."""


def migrate(db: sqlite3.Connection) -> None:
    """Bring a database made by an older release up to SCHEMA (columns added since)."""
    have = {r[1] for r in db.execute("PRAGMA table_info(tasks)")}
    for name, decl in ADDED_COLUMNS.items():
        if name not in have:
            db.execute(f"ALTER TABLE tasks ADD COLUMN {name} {decl}")
            if name == "token":  # the attempt counter was the fencing token until then
                db.execute("UPDATE tasks SET token=attempts")


INSERT_EVENT = "INSERT INTO events (task_id, seq, type, data, ts) VALUES (?,?,?,?,?)"
"""One event row: every write that appends events uses it."""


def dumps(value: Any) -> bytes:
    return orjson.dumps(value)


def loads(blob: bytes | None) -> Any:
    return None if blob is None else orjson.loads(blob)


def row_to_task(row: sqlite3.Row | tuple[Any, ...]) -> Task:
    (seq, tid, preset, state, inp, out, err, prio, wish, lane, timeout_s, ctype, attempts,
     node, device, reason, key, created, started, finished, token, submitted_by) = row
    placement = Placement(node, device, reason) if device else None
    return Task(id=tid, preset=preset, state=TaskState(state), input=loads(inp),
                priority=prio, device_wish=DeviceWish(wish), created_at=created, seq=seq,
                output=loads(out), error=loads(err), attempts=attempts, timeout_s=timeout_s,
                content_type=ctype, placement=placement, started_at=started,
                finished_at=finished, idempotency_key=key, lane=lane,
                fallback_reason=reason, token=token, submitted_by=submitted_by)
