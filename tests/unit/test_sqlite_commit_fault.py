"""A write that fails inside SQLite (a full disk, an I/O error at COMMIT) loses that write only:
the store's connection is left out of any transaction, so the next write goes through instead
of failing for good with "cannot start a transaction within a transaction". And a store closed
and opened again runs its upkeep threads again."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from gpulane.model import TaskSpec, TaskState
from gpulane.store import Finish
from gpulane.store.sqlite import SqliteStore


class FailingConnection:
    """The store's connection, except that a statement starting with ``prefix`` raises
    (once); ``rolled_back``: SQLite has rolled the transaction back itself before the error,
    as it may on SQLITE_FULL or SQLITE_IOERR."""

    def __init__(self, db: sqlite3.Connection, prefix: str, *, rolled_back: bool = False
                 ) -> None:
        self.db = db
        self.prefix = prefix
        self.rolled_back = rolled_back
        self.raised = 0

    def execute(self, sql: str, *args: Any) -> sqlite3.Cursor:
        if not self.raised and sql.lstrip().startswith(self.prefix):
            self.raised += 1
            if self.rolled_back:
                self.db.execute("ROLLBACK")
            raise sqlite3.OperationalError("database or disk is full")
        return self.db.execute(sql, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.db, name)


@pytest.fixture(params=["file", "memory"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[SqliteStore]:
    s = SqliteStore(tmp_path / "gpulane.db" if request.param == "file" else ":memory:")
    await s.open()
    real = s.db
    yield s
    s._db = real
    await s.close()


def fail(store: SqliteStore, prefix: str, *, rolled_back: bool = False) -> FailingConnection:
    conn = FailingConnection(store.db, prefix, rolled_back=rolled_back)
    store._db = conn  # type: ignore[assignment]
    return conn


async def test_a_failed_commit_loses_that_write_only(store: SqliteStore) -> None:
    conn = fail(store, "COMMIT")
    with pytest.raises(sqlite3.OperationalError, match="disk is full"):
        await store.submit(TaskSpec("embed", {"n": 1}, lane="cpu"))
    assert conn.raised == 1
    assert not conn.db.in_transaction
    _, created = await store.submit(TaskSpec("embed", {"n": 2}, lane="cpu"))
    assert created
    listed, _ = await store.list_tasks()
    assert [t.input for t in listed] == [{"n": 2}]
    assert await store.queued_count() == 1  # the lost submit never counted


async def test_the_original_error_survives_a_rollback_sqlite_did_itself(
        store: SqliteStore) -> None:
    fail(store, "INSERT INTO tasks", rolled_back=True)
    # Not "cannot rollback - no transaction is active": the caller hears what went wrong.
    with pytest.raises(sqlite3.OperationalError, match="disk is full"):
        await store.submit(TaskSpec("embed", {"n": 1}, lane="cpu"))
    task, _ = await store.submit(TaskSpec("embed", {"n": 2}, lane="cpu"))
    (claimed,) = await store.claim("embed", "cpu", 1, "node-a", "cpu")
    assert claimed.id == task.id


async def test_a_failed_purge_commit_leaves_the_store_writable(store: SqliteStore) -> None:
    task, _ = await store.submit(TaskSpec("embed", {}, lane="cpu"))
    (claimed,) = await store.claim("embed", "cpu", 1, "node-a", "cpu")
    await store.finish_many([Finish(claimed.id, claimed.token, TaskState.SUCCEEDED, output=1)])
    if store.path == ":memory:":  # purged on the store's own connection
        fail(store, "COMMIT")
        with pytest.raises(sqlite3.OperationalError, match="disk is full"):
            await store.purge(finished_before=claimed.started_at + 3600)  # type: ignore[operator]
    again, created = await store.submit(TaskSpec("embed", {"n": 2}, lane="cpu"))
    assert created and (await store.get(again.id)) is not None
    report = await store.purge(finished_before=claimed.started_at + 3600)  # type: ignore[operator]
    assert report.tasks == 1
    assert await store.get(task.id) is None


async def test_a_reopened_store_purges_and_checkpoints_again(tmp_path: Path) -> None:
    s = SqliteStore(tmp_path / "gpulane.db")
    await s.open()
    await s.close()
    await s.open()  # its close once stopped its threads: this open's must run
    try:
        await s.submit(TaskSpec("embed", {}, lane="cpu"))
        (claimed,) = await s.claim("embed", "cpu", 1, "node-a", "cpu")
        await s.finish_many([Finish(claimed.id, claimed.token, TaskState.SUCCEEDED)])
        report = await s.purge(finished_before=claimed.started_at + 3600)  # type: ignore[operator]
        assert report.tasks == 1
        assert s._checkpointer is not None and not s._closing.is_set()
    finally:
        await s.close()
