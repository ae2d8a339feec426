"""After a burst is purged, the free pages past FREE_PAGES_KEPT go back to the file system, a
bounded number per pass. ``PRAGMA incremental_vacuum(N)`` frees one page per step of its
statement and returns no rows, so run through ``execute`` it freed one page per call: a pass
gave back 16 pages, not 4,096, and the file never shrank."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from gpulane.model import TaskSpec, TaskState
from gpulane.store import Finish, sqlite_upkeep
from gpulane.store.sqlite import SqliteStore

KEPT = 16
PER_PASS = 100


@pytest.mark.parametrize("where", ["file", "memory"])
async def test_a_purge_gives_free_pages_back_up_to_its_bound_per_pass(
        tmp_path: Path, where: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sqlite_upkeep, "FREE_PAGES_KEPT", KEPT)
    monkeypatch.setattr(sqlite_upkeep, "VACUUM_PAGES_PER_PASS", PER_PASS)
    store = SqliteStore(tmp_path / "gpulane.db" if where == "file" else ":memory:")
    await store.open()
    try:
        await store.submit_many([TaskSpec("embed", {"pad": "x" * 4000}, lane="cpu")
                                 for _ in range(300)])
        got = await store.claim("embed", "cpu", 300, "node-a", "cpu")
        await store.finish_many([Finish(t.id, t.token, TaskState.SUCCEEDED) for t in got])

        def pages() -> tuple[int, int]:
            return (store.db.execute("PRAGMA page_count").fetchone()[0],
                    store.db.execute("PRAGMA freelist_count").fetchone()[0])

        full, _ = pages()
        report = await store.purge(time.time() + 3600)
        assert report.tasks == 300
        after, free = pages()
        assert full - after == PER_PASS, (full, after, free)  # one pass's worth, no more
        assert free > KEPT  # the rest waits for the next passes
        while free > KEPT:
            await store.purge(time.time() + 3600)
            after, free = pages()
        assert free == KEPT and after < full - 300  # the burst's pages are back
    finally:
        await store.close()
