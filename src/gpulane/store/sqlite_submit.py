"""How a submit becomes rows in the SQLite store: the idempotency check and the insert; and
the read of many tasks at once that a collector of their results makes.

Functions over the store's connection, called by ``sqlite.py`` (the writes inside its write
transaction); the store counts what they add after the commit.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence

import orjson

from gpulane.model import Task, TaskSpec, TaskState, now
from gpulane.store.base import key_reused, new_task, new_task_id
from gpulane.store.sqlite_schema import COLUMNS, INSERT_EVENT, dumps, row_to_task


def known(db: sqlite3.Connection, spec: TaskSpec) -> Task | None:
    """The task that ``spec``'s idempotency key made already, if it is still kept; raises
    ConflictError when the key was used for a different body."""
    if spec.idempotency_key is None:
        return None
    row = db.execute("SELECT body_hash, task_id FROM idempotency WHERE key=?",
                     (spec.idempotency_key,)).fetchone()
    if row is None:
        return None
    if row[0] != spec.body_hash:
        raise key_reused(spec.idempotency_key, row[1])
    got = db.execute(f"SELECT {COLUMNS} FROM tasks WHERE id=?", (row[1],)).fetchone()
    return row_to_task(got) if got else None


def insert(db: sqlite3.Connection, spec: TaskSpec) -> Task:
    """A new queued task, its first event and its idempotency key."""
    tid = new_task_id()
    created = now()
    cur = db.execute(
        "INSERT INTO tasks (id, preset, state, input, priority, base_priority, device_wish, "
        "lane, fallback_reason, timeout_s, content_type, idempotency_key, created_at, "
        "submitted_by, event_seq) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,1)",
        (tid, spec.preset, TaskState.QUEUED.value, dumps(spec.input), spec.priority,
         spec.priority, spec.device_wish.value, spec.lane, spec.fallback_reason, spec.timeout_s,
         spec.content_type, spec.idempotency_key, created, spec.submitted_by))
    db.execute(INSERT_EVENT,
               (tid, 1, "state", dumps({"state": "queued", "lane": spec.lane,
                                         "fallback_reason": spec.fallback_reason}), created))
    if spec.idempotency_key is not None:
        db.execute("INSERT INTO idempotency (key, body_hash, task_id) VALUES (?,?,?)",
                   (spec.idempotency_key, spec.body_hash, tid))
    return new_task(tid, spec, cur.lastrowid or 0, created)


def get_many(db: sqlite3.Connection, ids: Sequence[str]) -> list[Task | None]:
    """Each id's task (None if unknown), in the order asked, in one statement whatever the
    count: the ids travel as one JSON array, so the statement cache holds one query."""
    found = {row[1]: row_to_task(row) for row in db.execute(
        f"SELECT {COLUMNS} FROM tasks WHERE id IN (SELECT value FROM json_each(?))",
        (orjson.dumps(list(ids)).decode(),))}
    return [found.get(i) for i in ids]
