"""The Housekeeper: heartbeats for held attempts, the reaper, retention of finished tasks and
scratch files, a status view, and loops that survive a failing store and stop at once.

Cutoffs count on ``housekeeper.clock``, set by the test; nothing waits out an interval.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from gpulane.errors import StoreError
from gpulane.model import Task, TaskSpec, TaskState
from gpulane.scheduling.housekeeping import Housekeeper
from gpulane.store import Finish, PurgeReport, Store
from gpulane.store.sqlite import SqliteStore

GUARD_S = 10.0
"""Failure guard for what should end at once: never the assertion."""


def keeper(store: Store, held: Sequence[tuple[str, int]] = (), **kw: Any) -> Housekeeper:
    opts: dict[str, Any] = {"retain_s": 3600.0, "claim_ttl_s": 30.0}
    opts.update(kw)
    return Housekeeper(store, "n1", held=lambda: list(held),
                       max_attempts=lambda: {"p": 2}, **opts)


async def test_beat_heartbeats_what_is_held_and_reaps_what_is_not(store: SqliteStore) -> None:
    await store.submit_many([TaskSpec(preset="p", input=i) for i in range(3)])
    a, b, c = await store.claim("p", "gpu", 3, "n1", "gpu:0")
    hk = keeper(store, held=[(a.id, a.token), (b.id, b.token)])
    assert await hk.beat() == []  # every claim is fresh
    assert hk.heartbeats_sent == 2
    # Later: a and b were heartbeat just now, c (no longer held) only at its claim.
    stamped = dict(store.db.execute("SELECT id, heartbeat_at FROM tasks").fetchall())
    hk.clock = lambda: stamped[a.id] + hk.claim_ttl_s  # c's claim is older than the TTL
    reaped = await hk.beat()
    assert [t.id for t in reaped] == [c.id] and reaped[0].state is TaskState.QUEUED
    assert hk.reaped_total == 1 and hk.view()["reaper"]["reaped_total"] == 1
    assert (await store.get(a.id)).state is TaskState.RUNNING  # type: ignore[union-attr]


async def test_attempts_held_in_vain_are_handed_to_the_runtime(store: SqliteStore) -> None:
    """A run reaped while this node still held it (a stall longer than the claim TTL): the
    next heartbeat finds it is no longer the task's attempt, and the runtime is told."""
    await store.submit_many([TaskSpec(preset="p", input=i) for i in range(2)])
    a, b = await store.claim("p", "gpu", 2, "n1", "gpu:0")
    told: list[list[tuple[str, int]]] = []
    hk = keeper(store, held=[(a.id, a.token), (b.id, b.token)], on_lost=told.append)
    await store.reap(time.time() + 1)  # both reaped behind the node's back
    again = await store.claim("p", "gpu", 1, "n2", "gpu:0")  # a runs on another node now
    assert [t.id for t in again] == [a.id]
    await hk.beat()
    assert told == [[(a.id, a.token), (b.id, b.token)]]
    assert hk.heartbeats_sent == 0 and hk.view()["reaper"]["lost_total"] == 2


async def test_a_reaped_last_attempt_fails_by_the_presets_max_attempts(
        store: SqliteStore) -> None:
    await store.submit(TaskSpec(preset="p", input=1))
    [t] = await store.claim("p", "gpu", 1, "n1", "gpu:0")
    await store.requeue(t.id, t.token, None)
    [t] = await store.claim("p", "gpu", 1, "n1", "gpu:0")  # attempt 2 of max_attempts 2
    hk = keeper(store)
    hk.clock = lambda: time.time() + hk.claim_ttl_s + 1
    [dead] = await hk.beat()
    assert dead.state is TaskState.FAILED and dead.error["code"] == "claim_expired"  # type: ignore[index]


async def test_purge_removes_old_finished_tasks_and_old_scratch_files(
        store: SqliteStore, tmp_path: Path) -> None:
    await store.submit_many([TaskSpec(preset="p", input=i, idempotency_key=f"k{i}",
                                      body_hash="h") for i in range(5)])
    claimed = await store.claim("p", "gpu", 4, "n1", "gpu:0")
    await store.finish_many([Finish(t.id, t.token, TaskState.SUCCEEDED) for t in claimed])
    scratch = tmp_path / "scratch"
    (scratch / "sub").mkdir(parents=True)
    old_file, new_file = scratch / "old.input.json", scratch / "new.input.json"
    old_nested = scratch / "sub" / "old.bin"
    for f in (old_file, new_file, old_nested):
        f.write_bytes(b"{}")
    ancient = time.time() - 7200
    for f in (old_file, old_nested, scratch / "sub"):
        os.utime(f, (ancient, ancient))
    outside = tmp_path / "outside.txt"
    outside.write_bytes(b"keep")
    os.utime(outside, (ancient, ancient))
    (scratch / "link").symlink_to(outside)
    os.utime(scratch / "link", (ancient, ancient), follow_symlinks=False)
    later = time.time() + 3600  # written after the cutoff the clock below makes
    os.utime(new_file, (later, later))

    hk = keeper(store, retain_s=3600.0, scratch_dir=scratch)
    hk.clock = lambda: time.time() + 3600.0 + 1  # every finish is now past the retention
    done = await hk.purge()
    assert done is not None
    assert (done["tasks"], done["events"], done["keys"]) == (4, 12, 4)
    assert done["files"] == 3  # old, nested old, and the link itself (never its target)
    assert new_file.exists() and outside.exists() and not old_file.exists()
    assert not (scratch / "link").is_symlink()
    view = hk.view()["retention"]
    assert view["total"] == {"tasks": 4, "events": 12, "keys": 4, "files": 3, "uploads": 0}
    assert view["rows"] == {"tasks": 1, "events": 1, "idempotency": 1}
    assert view["db_bytes"] > 0 and view["last_purge_at"] is not None
    assert (await hk.purge())["tasks"] == 0  # type: ignore[index]
    assert hk.view()["retention"]["total"]["tasks"] == 4


class FailingStore:
    """A store whose every housekeeping call raises, as a broken disk would."""

    def __init__(self) -> None:
        self.calls = 0

    async def heartbeat(self, node: str, held: Sequence[tuple[str, int]]
                        ) -> list[tuple[str, int]]:
        self.calls += 1
        raise StoreError("disk I/O error")

    async def reap(self, stale_before: float,
                   max_attempts: Mapping[str, int] | None = None) -> list[Task]:
        raise AssertionError("not reached: heartbeat failed first")

    async def purge(self, finished_before: float,
                    max_batches: int | None = None) -> PurgeReport:
        self.calls += 1
        raise StoreError("database is locked")


async def test_a_failing_store_is_logged_and_tried_again(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("gpulane.scheduling.housekeeping.PURGE_ERROR_BACKOFF_S", 0)
    failing = FailingStore()
    hk = keeper(failing)  # type: ignore[arg-type]
    assert await hk.beat() == []
    assert await hk.purge() is None
    assert await hk.beat() == []
    assert failing.calls == 3 and hk.errors == 3
    assert hk.view()["last_error"] == "heartbeat/reap: StoreError: disk I/O error"


async def test_the_loops_run_each_round_and_stop_at_once(store: SqliteStore) -> None:
    hk = keeper(store, claim_ttl_s=3.0, purge_every_s=0.0)
    rounds = asyncio.Event()
    real_purge = hk.purge

    async def counted() -> dict[str, Any] | None:
        out = await real_purge()
        rounds.set()
        return out

    hk.purge = counted  # type: ignore[method-assign]
    hk.start()
    await asyncio.wait_for(rounds.wait(), GUARD_S)  # the purge loop ran a round
    # Stopping does not wait out the heartbeat interval (1 s here, hours in a test's terms).
    await asyncio.wait_for(hk.stop(), GUARD_S)
    assert all(t.done() for t in asyncio.all_tasks() if t.get_name().startswith("gpulane-"))
