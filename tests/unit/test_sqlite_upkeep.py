"""The SQLite store's own upkeep: listings read indexes (EXPLAIN QUERY PLAN), retention runs
off the event loop on its own connection, and the file stays bounded under steady load."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from gpulane.model import TaskSpec, TaskState
from gpulane.store import Finish, PurgeReport, sqlite_upkeep
from gpulane.store.sqlite import SqliteStore
from gpulane.store.sqlite_schema import COLUMNS


def plan(store: SqliteStore, sql: str) -> str:
    return " | ".join(r[3] for r in store.db.execute("EXPLAIN QUERY PLAN " + sql))


@pytest.mark.parametrize(("where", "index"), [
    ("preset='embed'", "tasks_preset"),
    ("preset='embed' AND seq<1000", "tasks_preset"),
    ("state='failed'", "tasks_failed"),
    ("state='failed' AND seq<1000", "tasks_failed"),
    ("state='cancelled'", "tasks_cancelled"),
])
async def test_task_listings_read_an_index_in_order(store: SqliteStore, where: str,
                                                    index: str) -> None:
    """By preset, and the dead letters: one index range, newest first, no sort."""
    got = plan(store, f"SELECT {COLUMNS} FROM tasks WHERE {where} ORDER BY seq DESC LIMIT 51")
    assert f"USING INDEX {index}" in got, got
    assert "TEMP B-TREE" not in got, got


@pytest.mark.parametrize("where", ["state='failed' AND preset='embed'",
                                   "state='running' AND preset='embed' AND seq<1000"])
async def test_state_and_preset_listings_read_an_index(store: SqliteStore, where: str) -> None:
    got = plan(store, f"SELECT {COLUMNS} FROM tasks WHERE {where} ORDER BY seq DESC LIMIT 51")
    assert "USING INDEX" in got, got


async def test_no_index_on_the_hot_path_has_the_state_in_it(store: SqliteStore) -> None:
    """A task's three writes must not rewrite listing indexes (sqlite_listing.py says why):
    besides the scheduler's partial ones, only indexes on what never changes or on a rare
    end (failed, cancelled, finished) exist."""
    indexes = {r[0]: r[1] for r in store.db.execute(
        "SELECT name, sql FROM sqlite_master WHERE type='index' AND tbl_name='tasks' "
        "AND sql IS NOT NULL")}
    assert set(indexes) == {"tasks_queued", "tasks_running_on", "tasks_preset", "tasks_failed",
                            "tasks_cancelled", "tasks_finished"}, indexes


async def test_listings_are_read_off_the_event_loop(store: SqliteStore,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever a page costs (sorting a deep queue, stepping over newer queued tasks to the
    succeeded ones), it is paid on a thread with its own connection."""
    from gpulane.store import sqlite_listing

    threads: list[int] = []
    real = sqlite_listing.read_page

    def spy(conn: sqlite3.Connection, *args: Any) -> sqlite_listing.Page:
        threads.append(threading.get_ident())
        assert conn is not store.db
        return real(conn, *args)

    monkeypatch.setattr(sqlite_listing, "read_page", spy)
    await store.submit_many([TaskSpec(preset="embed", input=i) for i in range(5)])
    page, cursor = await store.list_tasks(TaskState.QUEUED, None, 3)
    assert [t.input for t in page] == [4, 3, 2] and cursor is not None
    page, cursor = await store.list_tasks(TaskState.QUEUED, "embed", 3, cursor)
    assert [t.input for t in page] == [1, 0] and cursor is None
    assert len(threads) == 2 and threading.get_ident() not in threads


async def test_retention_and_reaper_queries_read_indexes(store: SqliteStore) -> None:
    got = plan(store, "SELECT seq FROM tasks INDEXED BY tasks_finished WHERE "
                      f"{sqlite_upkeep.FINISHED} AND finished_at < 1 ORDER BY finished_at")
    assert got == "SEARCH tasks USING INDEX tasks_finished (finished_at<?)"
    got = plan(store, "SELECT id FROM tasks WHERE state='running' AND node IS NOT NULL")
    assert got.startswith("SEARCH tasks USING INDEX"), got


async def test_a_new_database_gives_free_pages_back(store: SqliteStore) -> None:
    assert store.db.execute("PRAGMA auto_vacuum").fetchone()[0] == 2  # incremental


async def test_purge_runs_on_a_thread_of_its_own(store: SqliteStore,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    threads: list[int] = []
    real = sqlite_upkeep.purge

    def spy(conn: sqlite3.Connection, finished_before: float, **kw: Any) -> PurgeReport:
        threads.append(threading.get_ident())
        assert conn is not store.db  # a connection of its own
        assert kw["gate"] is store._write_gate  # and the store's writers take turns
        return real(conn, finished_before, **kw)

    monkeypatch.setattr(sqlite_upkeep, "purge", spy)
    await store.purge(time.time())
    assert threads and threads[0] != threading.get_ident()


async def test_the_file_stays_bounded_under_steady_load_with_retention(
        store: SqliteStore) -> None:
    """Rounds of work, each purged once finished: deleted pages are reused, so after the
    first rounds the file stops growing (it may wobble by a few pages, never climb)."""
    sizes = []
    for _ in range(12):
        await store.submit_many([TaskSpec(preset="p", input={"text": "x" * 500})
                                 for _ in range(300)])
        claimed = await store.claim("p", "gpu", 300, "n1", "gpu:0")
        await store.finish_many([Finish(t.id, t.token, TaskState.SUCCEEDED,
                                        output={"vec": [0.5] * 64}) for t in claimed])
        report = await store.purge(time.time() + 1)
        assert report.tasks == 300
        sizes.append(store.db.execute("PRAGMA page_count").fetchone()[0])
    assert max(sizes[4:]) <= max(sizes[:4]) * 1.1, sizes


async def test_a_purge_stops_between_batches_when_the_store_closes(tmp_path: Path) -> None:
    s = SqliteStore(tmp_path / "g.db")
    await s.open()
    await s.submit_many([TaskSpec(preset="p", input=i) for i in range(30)])
    claimed = await s.claim("p", "gpu", 30, "n1", "gpu:0")
    await s.finish_many([Finish(t.id, t.token, TaskState.SUCCEEDED) for t in claimed])
    conn = sqlite_upkeep.connect(s.path)
    stop = threading.Event()
    stop.set()
    try:
        report = await asyncio.to_thread(sqlite_upkeep.purge, conn, time.time() + 1, stop, 10)
    finally:
        conn.close()
    assert report.tasks == 0 and report.batches == 0
    await s.close()
