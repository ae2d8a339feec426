"""Group commit (store/group_commit.py), per backend: submits made together (singles and bulks)
are written in one store call, each answered only after that write, a failed write fails them
all, and an idempotency key behaves within a group as it does across submits."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest
from tests.conformance.test_store import spec

from gpulane.errors import ConflictError, StoreError
from gpulane.model import Task, TaskSpec
from gpulane.store import Store


def _groups(store: Store) -> int:
    writes: int = store.submit_groups.writes  # type: ignore[attr-defined]
    return writes


async def test_concurrent_submits_are_one_write_and_all_land(store: Store) -> None:
    before = _groups(store)
    got = await asyncio.gather(*(store.submit(spec(input=i)) for i in range(50)))
    assert _groups(store) - before == 1
    assert all(created for _, created in got)
    assert len({t.id for t, _ in got}) == 50
    stored = await store.get_many([t.id for t, _ in got])
    assert [t.input for t in stored if t is not None] == list(range(50))
    assert (await store.queue_stats())["p"].queued == 50


async def test_a_lone_submit_is_written_at_once_on_its_own(store: Store) -> None:
    before = _groups(store)
    for i in range(3):
        task, created = await store.submit(spec(input=i))
        assert created and (await store.get(task.id)) is not None
    assert _groups(store) - before == 3


async def test_a_failed_write_fails_every_submit_of_the_group(
        store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    written: list[int] = []

    async def broken(specs: Sequence[TaskSpec]) -> list[tuple[Task, bool]]:
        written.append(len(specs))
        raise StoreError("disk I/O error")

    monkeypatch.setattr(store, "_submit_now", broken)
    got = await asyncio.gather(*(store.submit(spec(input=i)) for i in range(10)),
                               return_exceptions=True)
    assert written == [10]
    assert all(isinstance(e, StoreError) and "disk I/O" in str(e) for e in got)
    monkeypatch.undo()
    tasks, _ = await store.list_tasks()
    assert tasks == []


async def test_idempotency_keys_within_one_group(store: Store) -> None:
    """The same key twice in a group is one task; a key reused with another body is a 409 for
    that submit alone, the others of the group written all the same."""
    got = await asyncio.gather(
        store.submit(spec(input=1, key="order-1")),
        store.submit(spec(input=1, key="order-1")),
        store.submit(spec(input=2)),
        store.submit(spec(input=3, key="order-1")),
        store.submit(spec(input=4, key="order-4")),
        return_exceptions=True)
    first, again, plain, clash, other = got
    assert isinstance(first, tuple) and isinstance(again, tuple)
    assert first[1] is True and again == (again[0], False) and again[0].id == first[0].id
    assert isinstance(clash, ConflictError) and clash.extra["task_id"] == first[0].id
    assert isinstance(plain, tuple) and plain[1] and isinstance(other, tuple) and other[1]
    tasks, _ = await store.list_tasks()
    assert sorted(t.input for t in tasks) == [1, 2, 4]


async def test_a_cancelled_submitter_does_not_stop_its_group(store: Store) -> None:
    waiting = [asyncio.create_task(store.submit(spec(input=i))) for i in range(3)]
    await asyncio.sleep(0)  # every submit has joined the group
    waiting[0].cancel()
    done = await asyncio.gather(*waiting, return_exceptions=True)
    assert isinstance(done[0], asyncio.CancelledError)
    tasks, _ = await store.list_tasks()
    assert sorted(t.input for t in tasks) == [0, 1, 2]  # written: its answer had nowhere to go


async def test_bulks_and_singles_share_a_write_each_all_or_none(store: Store) -> None:
    """A bulk refused for a reused key takes nothing of the others down with it."""
    await store.submit(spec(input=0, key="used"))
    before = _groups(store)
    got = await asyncio.gather(
        store.submit_many([spec(input=1), spec(input=2)]),
        store.submit_many([spec(input=3), spec(input=9, key="used")]),
        store.submit(spec(input=4)),
        return_exceptions=True)
    bulk, refused, single = got
    assert isinstance(refused, ConflictError)
    assert isinstance(bulk, list) and [t.input for t, _ in bulk] == [1, 2]
    assert isinstance(single, tuple) and single[0].input == 4
    assert _groups(store) - before == 4  # the group, refused; then each call alone
    tasks, _ = await store.list_tasks()
    assert sorted(t.input for t in tasks) == [0, 1, 2, 4]
    assert await store.submit_many([]) == []
