"""Keeping the SQLite file bounded, from threads with connections of their own: WAL
checkpoints, and retention (finished tasks past the retention period go, with their events and
idempotency keys, in small write transactions).

The event loop's connection keeps serving meanwhile: reads never wait (WAL), and a write on the
loop waits at most one batch's transaction for the write lock. Batches are small and a short
pause between them lets the loop's writes go first.

Space: a database made by this release uses ``auto_vacuum=INCREMENTAL``. Under steady load
deleted pages are simply reused by new rows, so the file stops growing once retention keeps
pace; after a burst (a backlog purged), pages free beyond ``FREE_PAGES_KEPT`` are given back
to the file system a bounded number per pass, so no pass holds the write lock long. A database
made before keeps auto_vacuum off (switching needs a full VACUUM): its free pages are reused
the same way but the file never shrinks. The WAL file is truncated back to the store's
``journal_size_limit`` once a checkpoint has emptied it.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from collections.abc import Sequence

from gpulane.store.base import PurgeReport

log = logging.getLogger("gpulane.store")

CHECKPOINT_INTERVAL_S = 1.0
"""How often the background thread folds the WAL back into the database file."""

BUSY_TIMEOUT_MS = 5000
"""How long a thread's connection waits for the write lock before giving up a round."""

PURGE_BATCH_TASKS = 500
"""Finished tasks deleted per write transaction (their events and keys in the same one)."""

PURGE_PAUSE_S = 0.002
"""Pause between two batches, so writes waiting on the event loop take the lock first."""

FREE_PAGES_KEPT = 2048
"""Free pages left in the file for new rows to reuse (8 MiB at SQLite's 4 KiB pages)."""

VACUUM_PAGES_PER_PASS = 4096
"""At most this many free pages are given back to the file system per pass (16 MiB)."""

FINISHED = "state IN ('succeeded','failed','cancelled')"
"""Final states, spelled as the partial index ``tasks_finished`` is, so the planner uses it."""

TABLES = ("tasks", "events", "idempotency")
"""The tables whose rows a report counts."""


def connect(path: str) -> sqlite3.Connection:
    """A connection for a thread of its own (autocommit: transactions are explicit)."""
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
    return conn


def checkpoint_until(conn: sqlite3.Connection, closing: threading.Event) -> None:
    """Fold the WAL into the database every ``CHECKPOINT_INTERVAL_S`` until ``closing``: a
    checkpoint syncs the file to disk (15-20 ms) and must not stall the event loop."""
    while not closing.wait(CHECKPOINT_INTERVAL_S):
        try:
            conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
        except sqlite3.Error as exc:  # busy now; the next round catches up
            log.debug("WAL checkpoint skipped: %s", exc)


def purge(conn: sqlite3.Connection, finished_before: float, stop: threading.Event | None = None,
          batch: int = PURGE_BATCH_TASKS, max_batches: int | None = None) -> PurgeReport:
    """Delete what finished before ``finished_before``, one batch per transaction, until none
    is left, ``max_batches`` ran or ``stop`` is set; then give back excess free pages and
    measure the database."""
    tasks = events = keys = batches = 0
    longest = 0.0
    while (stop is None or not stop.is_set()) and (max_batches is None
                                                   or batches < max_batches):
        started = time.perf_counter()
        conn.execute("BEGIN IMMEDIATE")
        try:
            rows: Sequence[tuple[int, str, str | None]] = conn.execute(
                # INDEXED BY: without statistics the planner would read every task of the
                # state and sort; this index holds the finished ones by finish time.
                f"SELECT seq, id, idempotency_key FROM tasks INDEXED BY tasks_finished "
                f"WHERE {FINISHED} "
                "AND finished_at < ? ORDER BY finished_at LIMIT ?",
                (finished_before, batch)).fetchall()
            if rows:
                events += conn.executemany("DELETE FROM events WHERE task_id=?",
                                           [(r[1],) for r in rows]).rowcount
                # Only the key's own task: a key re-used after a purge names a newer one.
                keys += conn.executemany("DELETE FROM idempotency WHERE key=? AND task_id=?",
                                         [(r[2], r[1]) for r in rows if r[2]]).rowcount
                tasks += conn.executemany("DELETE FROM tasks WHERE seq=?",
                                          [(r[0],) for r in rows]).rowcount
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
        batches += 1
        longest = max(longest, time.perf_counter() - started)
        if len(rows) < batch:
            break
        time.sleep(PURGE_PAUSE_S)
    give_back_free_pages(conn)
    return PurgeReport(tasks=tasks, events=events, keys=keys, batches=batches,
                       longest_batch_s=longest, db_bytes=db_bytes(conn), rows=count_rows(conn))


def give_back_free_pages(conn: sqlite3.Connection) -> int:
    """Shrink the file by the free pages past ``FREE_PAGES_KEPT`` (bounded per call); 0 when
    the database was made without incremental auto_vacuum. Returns pages given back."""
    if conn.execute("PRAGMA auto_vacuum").fetchone()[0] != 2:  # 2: INCREMENTAL
        return 0
    excess = conn.execute("PRAGMA freelist_count").fetchone()[0] - FREE_PAGES_KEPT
    if excess <= 0:
        return 0
    pages = min(excess, VACUUM_PAGES_PER_PASS)
    # The pragma frees one page per step: fetchall() runs it to the end.
    conn.execute(f"PRAGMA incremental_vacuum({int(pages)})").fetchall()
    return int(pages)


def db_bytes(conn: sqlite3.Connection) -> int:
    """The database's size: its pages, plus its WAL file when it has one on disk."""
    size = int(conn.execute("PRAGMA page_count").fetchone()[0]) * int(
        conn.execute("PRAGMA page_size").fetchone()[0])
    path = conn.execute("PRAGMA database_list").fetchone()[2]
    if path:
        try:
            size += os.path.getsize(path + "-wal")
        except OSError:  # no WAL file right now
            pass
    return size


def count_rows(conn: sqlite3.Connection) -> dict[str, int]:
    """Rows per table. A count walks the table's smallest index: this runs in the purge's
    thread, never on the event loop."""
    return {t: int(conn.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0]) for t in TABLES}
