"""Pages of tasks for ``GET /v1/tasks``, read off the event loop on a connection of their own.

Why not an index per filter: every index a task's state is part of is rewritten on each of a
task's three writes (submit, claim, finish): two such indexes cost a local submit-and-wait
about 50 us of its 1 ms, every task, so that a listing (rare beside them) could read one range.
The indexes here change only when a task is added (by preset) or enters a rare state (failed,
cancelled: the dead letters an operator pages through). Queued and running tasks are read
through the partial indexes the scheduler keeps anyway; succeeded ones, most of any table, by
walking the table newest first, which finds a page of them at once.

What a page may cost beyond that (sorting a deep queue, stepping over a backlog of newer queued
tasks to reach the succeeded ones) is paid here, on a thread with its own connection (WAL: it
reads the last commit and never blocks a writer), so the event loop never waits for a listing.
An in-memory database has no second connection: its pages are read on the loop's.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from typing import Any

from gpulane.model import Task, TaskState
from gpulane.store import sqlite_upkeep
from gpulane.store.sqlite_schema import COLUMNS, row_to_task

Page = tuple[list[Task], str | None]


def page_query(state: TaskState | None, preset: str | None, limit: int,
               cursor: str | None) -> tuple[str, list[object]]:
    """The statement and arguments for one page, newest first."""
    where: list[str] = []
    args: list[object] = []
    if state is not None:
        # Inlined (an enum value, never user text) so that the partial indexes can serve it.
        where.append(f"state='{state.value}'")
    if preset is not None:
        where.append("preset=?")
        args.append(preset)
    if cursor:
        where.append("seq<?")
        args.append(int(cursor))
    sql = f"SELECT {COLUMNS} FROM tasks"
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += " ORDER BY seq DESC LIMIT ?"
    args.append(limit + 1)
    return sql, args


def read_page(conn: sqlite3.Connection, state: TaskState | None, preset: str | None,
              limit: int, cursor: str | None) -> Page:
    """One page and the cursor of the next (None on the last page)."""
    sql, args = page_query(state, preset, limit, cursor)
    rows = conn.execute(sql, args).fetchall()
    tasks = [row_to_task(r) for r in rows[:limit]]
    return tasks, str(tasks[-1].seq) if len(rows) > limit else None


class PageReader:
    """Reads pages on a worker thread through one connection of its own, opened on first use
    (a lock keeps two listings from sharing it at once)."""

    def __init__(self, path: str, synchronous: str) -> None:
        self.path = path
        self.synchronous = synchronous
        self._conn: sqlite3.Connection | None = None
        self._lock = threading.Lock()

    async def page(self, *args: Any) -> Page:
        return await asyncio.to_thread(self._page, *args)

    def _page(self, state: TaskState | None, preset: str | None, limit: int,
              cursor: str | None) -> Page:
        with self._lock:
            if self._conn is None:
                self._conn = sqlite_upkeep.connect(self.path, self.synchronous)
            return read_page(self._conn, state, preset, limit, cursor)

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
