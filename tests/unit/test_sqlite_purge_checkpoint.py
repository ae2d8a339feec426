"""A purge batch's commit does not checkpoint the WAL. SQLite's connections checkpoint on
commit once the WAL passes 1,000 pages; the purge's connection did, so its first batch after a
burst folded the whole WAL into the file and synced it (30-40 ms) while holding the write gate
the event loop's writes wait on. Checkpoints are the checkpoint thread's, which holds no gate."""

from __future__ import annotations

import os
import time
from pathlib import Path

from gpulane.model import TaskSpec, TaskState
from gpulane.store import Finish, sqlite_upkeep
from gpulane.store.sqlite import SqliteStore

BURST = 2000
"""Tasks written in the burst: a WAL well past 1,000 pages."""


async def test_a_purge_batch_leaves_the_wal_to_the_checkpoint_thread(tmp_path: Path) -> None:
    path = tmp_path / "gpulane.db"
    store = SqliteStore(path)
    await store.open()
    store._closing.set()  # stop the checkpoint thread: this test watches the WAL alone
    assert store._checkpointer is not None
    store._checkpointer.join()
    try:
        for _ in range(BURST // 500):
            await store.submit_many([TaskSpec("embed", {"pad": "x" * 1000}, lane="cpu")
                                     for _ in range(500)])
            got = await store.claim("embed", "cpu", 500, "node-a", "cpu")
            await store.finish_many([Finish(t.id, t.token, TaskState.SUCCEEDED) for t in got])
        wal_pages = os.path.getsize(f"{path}-wal") // 4096
        assert wal_pages > 1000, wal_pages
        file_bytes = os.path.getsize(path)

        conn = sqlite_upkeep.connect(str(path))
        try:
            report = sqlite_upkeep.purge(conn, time.time() + 3600, max_batches=1)
        finally:
            conn.close()
        assert report.tasks == sqlite_upkeep.PURGE_BATCH_TASKS
        # Nothing was folded into the database file: its pages are still the WAL's.
        assert os.path.getsize(path) == file_bytes
    finally:
        await store.close()
