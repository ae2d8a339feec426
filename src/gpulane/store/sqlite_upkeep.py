"""Keeping the SQLite file bounded, from threads with connections of their own: WAL
checkpoints, and retention (finished tasks past the retention period go, with their events and
idempotency keys, in small write transactions).

The event loop's connection keeps serving meanwhile: reads never wait (WAL), and a write on the
loop waits at most one batch's write transaction (about 2 ms for 200 tasks on an idle machine).
The store's writers take turns on an in-process lock (the store's write gate) rather than on
SQLite's busy handler, which sleeps in steps of up to tens of milliseconds; a batch finds and
reads its rows before it takes the gate, deletes with one statement per table (no row-by-row
trading of the interpreter lock), and a short pause between batches lets the loop's writes in.

Space: a database made by this release uses ``auto_vacuum=INCREMENTAL``. Under steady load
deleted pages are simply reused by new rows, so the file stops growing once retention keeps
pace; after a burst (a backlog purged), pages free beyond ``FREE_PAGES_KEPT`` are given back
to the file system a bounded number per pass, so no pass holds the write lock long. A database
made before keeps auto_vacuum off (switching needs a full VACUUM): its free pages are reused
the same way but the file never shrinks. The WAL file is truncated back to the store's
``journal_size_limit`` once a checkpoint has emptied it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import threading
import time
from contextlib import AbstractContextManager
from typing import Any

from gpulane.store.base import PurgeReport

log = logging.getLogger("gpulane.store")

CHECKPOINT_INTERVAL_S = 1.0
"""How often the background thread folds the WAL back into the database file."""

BUSY_TIMEOUT_MS = 5000
"""How long a connection waits for SQLite's write lock (another process's) before failing."""

WAL_SIZE_LIMIT_BYTES = 64 * 1024 * 1024
"""A WAL file grown past this by a burst is truncated back to it once checkpointed."""

PURGE_BATCH_TASKS = 200
"""Finished tasks deleted per write transaction (their events and keys in the same one)."""

PURGE_PAUSE_S = 0.002
"""Pause between two batches, so writes waiting on the event loop take the lock first."""

FREE_PAGES_KEPT = 2048
"""Free pages left in the file for new rows to reuse (8 MiB at SQLite's 4 KiB pages)."""

VACUUM_PAGES_PER_PASS = 4096
"""At most this many free pages are given back to the file system per pass (16 MiB)."""

VACUUM_PAGES_PER_STEP = 256
"""Free pages given back per write transaction (1 MiB): a short hold of the write lock."""

FINISHED = "state IN ('succeeded','failed','cancelled')"
"""Final states, spelled as the partial index ``tasks_finished`` is (the planner then can use
it)."""

TABLES = ("tasks", "events", "idempotency")
"""The tables whose rows a report counts."""


def connect_main(path: str, synchronous: str) -> sqlite3.Connection:
    """The store's own connection (the event loop's), set up to keep the file bounded."""
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    # First: it takes effect only on a new database, before its first table.
    db.execute("PRAGMA auto_vacuum=INCREMENTAL")
    db.execute("PRAGMA journal_mode=WAL")
    db.execute(f"PRAGMA synchronous={synchronous}")
    db.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
    db.execute("PRAGMA temp_store=MEMORY")
    db.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT_BYTES}")
    return db


def connect(path: str, synchronous: str = "NORMAL") -> sqlite3.Connection:
    """A connection for a thread of its own (autocommit: transactions are explicit), syncing
    as the store's own does: left at SQLite's default (FULL), its first commit would flush
    the whole WAL to disk (some 30 ms on a 60 MiB WAL) with the write lock held. Nor do its
    commits checkpoint (SQLite's default past 1,000 WAL pages): a purge batch's commit would
    fold the WAL into the file and sync it (30 ms) holding the write gate the loop waits on;
    the checkpoint thread does that, holding nothing the loop needs."""
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
    conn.execute(f"PRAGMA synchronous={synchronous}")
    conn.execute("PRAGMA wal_autocheckpoint=0")
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
          batch: int = PURGE_BATCH_TASKS, max_batches: int | None = None,
          gate: AbstractContextManager[Any] | None = None) -> PurgeReport:
    """Delete what finished before ``finished_before``, one batch per transaction, until none
    is left, ``max_batches`` ran or ``stop`` is set; then give back excess free pages and
    measure the database. ``gate``, held around each write transaction, is the store's own
    write lock: the loop's next write gets it the moment a batch commits."""
    tasks = events = keys = batches = 0
    longest = 0.0
    while (stop is None or not stop.is_set()) and (max_batches is None
                                                   or batches < max_batches):
        found, counts, took = _purge_batch(conn, finished_before, batch, gate)
        if not found:
            break
        tasks, events, keys = tasks + counts[0], events + counts[1], keys + counts[2]
        batches += 1
        longest = max(longest, took)
        if found < batch:
            break
        time.sleep(PURGE_PAUSE_S)
    give_back_free_pages(conn, gate)
    return PurgeReport(tasks=tasks, events=events, keys=keys, batches=batches,
                       longest_batch_s=longest, db_bytes=db_bytes(conn), rows=count_rows(conn))


def _purge_batch(conn: sqlite3.Connection, finished_before: float, batch: int,
                 gate: AbstractContextManager[Any] | None
                 ) -> tuple[int, tuple[int, int, int], float]:
    """One batch: up to ``batch`` tasks, their events and keys. The candidates are found, and
    their pages read into this connection's cache, before the write lock is taken (a cold
    read of a big WAL costs tens of milliseconds); the deletes under it re-check that each
    task is still finished (a dead-letter retry may have re-queued it meanwhile). Returns the
    candidates found, what was deleted (tasks, events, keys) and how long the lock was held."""
    found = conn.execute(
        # INDEXED BY: without statistics the planner would read every task of the state and
        # sort; this index holds the finished ones by finish time.
        f"SELECT seq FROM tasks INDEXED BY tasks_finished WHERE {FINISHED} "
        "AND finished_at < ? ORDER BY finished_at LIMIT ?", (finished_before, batch)).fetchall()
    if not found:
        return 0, (0, 0, 0), 0.0
    seqs = [r[0] for r in found]
    # Still finished (a dead-letter retry may have re-queued one since the read above).
    doomed = (f"SELECT {{col}} FROM tasks WHERE seq IN ({','.join('?' * len(seqs))}) "
              f"AND {FINISHED} AND finished_at < ?")
    args = [*seqs, finished_before]
    conn.execute(f"SELECT COUNT(*) FROM events WHERE task_id IN ({doomed.format(col='id')})",
                 args).fetchone()  # reads their pages into the cache, outside the lock
    with gate if gate is not None else contextlib.nullcontext():
        started = time.perf_counter()
        # One statement per table: each runs in SQLite without the GIL, so the event loop
        # (waiting on the gate) and this thread do not trade the interpreter row by row.
        conn.execute("BEGIN IMMEDIATE")
        try:
            # A key goes only with its own task: one re-used after a purge names a newer one.
            keys = conn.execute(
                f"DELETE FROM idempotency WHERE key IN ({doomed.format(col='idempotency_key')})"
                f" AND task_id IN ({doomed.format(col='id')})", args + args).rowcount
            events = conn.execute(
                f"DELETE FROM events WHERE task_id IN ({doomed.format(col='id')})",
                args).rowcount
            gone = conn.execute(
                f"DELETE FROM tasks WHERE seq IN ({doomed.format(col='seq')})", args).rowcount
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:  # a failed COMMIT may leave it open (see SqliteStore._tx)
                conn.execute("ROLLBACK")
            raise
        held = time.perf_counter() - started
    return len(found), (gone, events, keys), held


def give_back_free_pages(conn: sqlite3.Connection,
                         gate: AbstractContextManager[Any] | None = None) -> int:
    """Shrink the file by the free pages past ``FREE_PAGES_KEPT`` (at most
    ``VACUUM_PAGES_PER_PASS``), ``VACUUM_PAGES_PER_STEP`` per transaction under ``gate``; 0
    when the database was made without incremental auto_vacuum. Returns pages given back."""
    if conn.execute("PRAGMA auto_vacuum").fetchone()[0] != 2:  # 2: INCREMENTAL
        return 0
    wanted = min(conn.execute("PRAGMA freelist_count").fetchone()[0] - FREE_PAGES_KEPT,
                 VACUUM_PAGES_PER_PASS)
    done = 0
    while done < wanted:
        step = min(VACUUM_PAGES_PER_STEP, wanted - done)
        with gate if gate is not None else contextlib.nullcontext():
            # The pragma frees one page per step of its statement, and returns no rows, so
            # execute() would step it once (one page); executescript() runs it to the end.
            conn.executescript(f"PRAGMA incremental_vacuum({int(step)})")
        done += step
        time.sleep(PURGE_PAUSE_S)
    return done


def db_bytes(conn: sqlite3.Connection) -> int:
    """The database's size: its pages, plus its WAL file when it has one on disk."""
    size = int(conn.execute("PRAGMA page_count").fetchone()[0]) * int(
        conn.execute("PRAGMA page_size").fetchone()[0])
    path = conn.execute("PRAGMA database_list").fetchone()[2]
    if path:
        with contextlib.suppress(OSError):  # no WAL file right now
            size += os.path.getsize(path + "-wal")
    return size


def count_rows(conn: sqlite3.Connection) -> dict[str, int]:
    """Rows per table. A count walks the table's smallest index: this runs in the purge's
    thread, never on the event loop."""
    return {t: int(conn.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0]) for t in TABLES}
