"""What every Store backend must do to keep its state bounded and its queues countable:
queue counters, dead-letter retry, heartbeats and the reaper, retention, a notifier that holds
live tasks only (backends: see conftest.py)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import pytest
from tests.conformance.test_store import claim_one, spec, states, submit

from gpulane.errors import StaleTokenError
from gpulane.model import TaskState
from gpulane.store import Finish, NewEvent, QueueStats, Store, wait_final

if TYPE_CHECKING:
    from tests.conformance.conftest import Backend

# -- queue counters ---------------------------------------------------------------------------


async def stats(store: Store) -> dict[str, tuple[int, int]]:
    return {p: (s.queued, s.claimed_total) for p, s in (await store.queue_stats()).items()}


async def test_queue_stats_follow_every_write(store: Store) -> None:
    assert await store.queue_stats() == {}
    assert await store.queued_count() == 0
    a1 = await submit(store, "a", input=1)
    await submit(store, "a", input=2, lane="cpu")
    b1 = await submit(store, "b")
    assert await stats(store) == {"a": (2, 0), "b": (1, 0)}
    assert await store.queued_count() == 3

    await claim_one(store, "a")  # a1
    assert await stats(store) == {"a": (1, 1), "b": (1, 0)}
    await store.requeue(a1.id, 1, None)
    assert await stats(store) == {"a": (2, 1), "b": (1, 0)}
    await claim_one(store, "a")
    await store.finish(a1.id, 2, TaskState.FAILED, error={"message": "x"})
    assert await stats(store) == {"a": (1, 2), "b": (1, 0)}
    await store.cancel_queued(b1.id)
    assert await stats(store) == {"a": (1, 2), "b": (0, 0)}
    await store.retry_failed(a1.id)
    assert await stats(store) == {"a": (2, 2), "b": (0, 0)}
    assert await store.queued_count() == 2
    assert isinstance((await store.queue_stats())["a"], QueueStats)


async def test_queue_stats_ignore_writes_that_change_nothing(store: Store) -> None:
    task = await submit(store, key="k", input=1)
    again, created = await store.submit(spec(key="k", input=1))
    assert not created and again.id == task.id
    assert await store.cancel_queued("0" * 24) is None
    with pytest.raises(StaleTokenError):
        await store.requeue(task.id, 7, None)
    assert await store.claim("p", "cpu", 5, "n1", "cpu") == []
    assert await stats(store) == {"p": (1, 0)}


async def test_queue_stats_count_recovered_tasks_and_survive_a_reopen(
        durable_backend: Backend) -> None:
    first = durable_backend.make()
    await first.open()
    try:
        for i in range(3):
            await submit(first, "a", input=i)
        await submit(first, "b")
        await first.claim("a", "gpu", 2, "n1", "gpu:0")
        assert await stats(first) == {"a": (1, 2), "b": (1, 0)}
    finally:
        await first.close()
    second = durable_backend.make()
    await second.open()
    try:
        # Queued tasks are counted from the table on open; claims count from then on.
        assert (await second.queue_stats())["a"].queued == 1
        assert await second.queued_count() == 2
        before = (await second.queue_stats())["a"].claimed_total
        assert await second.recover("n1") == 2
        assert (await second.queue_stats())["a"].queued == 3
        await second.claim("a", "gpu", 3, "n1", "gpu:0")
        after = await second.queue_stats()
        assert after["a"].queued == 0 and after["a"].claimed_total == before + 3
    finally:
        await second.close()


# -- dead letters -----------------------------------------------------------------------------


@pytest.mark.parametrize("end", ["failed", "cancelled"])
async def test_retry_failed_requeues_a_dead_letter_with_fresh_attempts(
        store: Store, end: str) -> None:
    task = await submit(store, priority=60)
    if end == "failed":
        await claim_one(store)
        await store.requeue(task.id, 1, {"message": "try again"})
        await claim_one(store)
        dead = await store.finish(task.id, 2, TaskState.FAILED,
                                  error={"kind": "worker_died", "message": "exit 139"})
        assert dead.attempts == 2
    else:
        await store.cancel_queued(task.id)
    back = await store.retry_failed(task.id)
    assert back is not None and back.id == task.id
    assert back.state is TaskState.QUEUED and back.attempts == 0
    assert back.error is None and back.output is None and back.finished_at is None
    assert back.placement is None
    assert await store.get(task.id) == back
    events = await store.events(task.id)
    assert events[-1].data == {"state": "queued", "reason": f"retried after {end}"}
    [head] = await store.queue_heads([("p", "gpu")])
    assert head.task_id == task.id

    again = await claim_one(store)
    assert again.attempts == 1
    assert again.token == back.token + 1  # fencing tokens keep rising across the retry
    with pytest.raises(StaleTokenError):  # an attempt from before the retry stays fenced off
        await store.finish(task.id, back.token, TaskState.SUCCEEDED)
    done = await store.finish(task.id, again.token, TaskState.SUCCEEDED, output="ok")
    assert done.state is TaskState.SUCCEEDED and done.error is None
    assert (await states(store, task.id))[-3:] == ["queued", "running", "succeeded"]


async def test_retry_failed_refuses_live_succeeded_and_unknown_tasks(store: Store) -> None:
    queued = await submit(store, "q")
    running = await submit(store, "r")
    await claim_one(store, "r")
    done = await submit(store, "d")
    await claim_one(store, "d")
    await store.finish(done.id, 1, TaskState.SUCCEEDED, output=1)
    for task in (queued, running, done):
        before = await store.get(task.id)
        assert await store.retry_failed(task.id) is None
        assert await store.get(task.id) == before
    assert await store.retry_failed("0" * 24) is None
    assert await stats(store) == {"q": (1, 0), "r": (0, 1), "d": (0, 1)}


# -- heartbeats and the reaper ----------------------------------------------------------------


async def test_heartbeat_stamps_only_the_attempts_a_node_holds(store: Store) -> None:
    a = await submit(store, input=1)
    b = await submit(store, input=2)
    c = await submit(store, input=3)
    await store.claim("p", "gpu", 2, "n1", "gpu:0")  # a, b
    await claim_one(store, node="n2")  # c
    assert await store.heartbeat("n1", []) == []
    # b's token is wrong, c is another node's, and an unknown id matches nothing: held in
    # vain, and said so (the runtime stops working on them).
    held = [(a.id, 1), (b.id, 9), (c.id, 1), ("0" * 24, 1)]
    assert await store.heartbeat("n1", held) == held[1:]
    await store.finish(a.id, 1, TaskState.SUCCEEDED)
    assert await store.heartbeat("n1", [(a.id, 1)]) == [(a.id, 1)]  # finished: not held


def _after(moment: float) -> None:
    """Until the wall clock is past ``moment``: a microsecond or so, so a spin, not a wait."""
    while time.time() <= moment:
        pass


async def test_reap_requeues_attempts_unheard_of_past_the_ttl_and_spends_them(
        store: Store) -> None:
    quiet = await submit(store, input=1)
    alive = await submit(store, input=2)
    claimed = await store.claim("p", "gpu", 2, "n1", "gpu:0")
    cutoff = max(t.started_at or 0 for t in claimed) + 1e-6
    assert await store.reap(cutoff - 3600) == []  # nobody is that late
    _after(cutoff)
    assert await store.heartbeat("n1", [(alive.id, 1)]) == []  # its node still holds it
    reaped = await store.reap(cutoff)
    assert [t.id for t in reaped] == [quiet.id]
    [back] = reaped
    assert back.state is TaskState.QUEUED and back.placement is None
    assert back.attempts == 1  # spent: the attempt ran, perhaps it is what wedged the worker
    assert back.error is not None and back.error["code"] == "claim_expired"
    assert back.error["kind"] == "worker_died" and "n1" in back.error["message"]
    assert await store.get(quiet.id) == back
    assert (await store.get(alive.id)).state is TaskState.RUNNING  # type: ignore[union-attr]
    assert (await store.queue_stats())["p"].queued == 1
    with pytest.raises(StaleTokenError):  # the lost holder's late outcome is fenced off
        await store.finish(quiet.id, 1, TaskState.SUCCEEDED, output="late")
    _after(cutoff)
    again = await claim_one(store, node="n2")
    assert again.id == quiet.id and again.token == 2 and again.attempts == 2
    assert await store.reap(cutoff) == []  # a new claim starts a new heartbeat
    assert await states(store, quiet.id) == ["queued", "running", "queued", "running"]


async def test_reap_fails_an_attempt_that_was_the_last_one(store: Store) -> None:
    last = await submit(store, "p", input=1)
    other = await submit(store, "q", input=2)
    await claim_one(store, "p")
    await claim_one(store, "q")
    reaped = await store.reap(time.time() + 1, max_attempts={"p": 1, "q": 2})
    by_id = {t.id: t for t in reaped}
    assert by_id[last.id].state is TaskState.FAILED
    assert by_id[last.id].error["code"] == "claim_expired"  # type: ignore[index]
    assert by_id[last.id].finished_at is not None
    assert by_id[other.id].state is TaskState.QUEUED  # 1 attempt of 2 spent
    assert await states(store, last.id) == ["queued", "running", "failed"]
    # The dead letter can be retried like any other.
    assert (await store.retry_failed(last.id)) is not None


async def test_reap_leaves_queued_and_finished_tasks_alone(store: Store) -> None:
    running = await submit(store, input=1)
    done = await submit(store, input=2)
    queued = await submit(store, input=3)
    await store.claim("p", "gpu", 2, "n1", "gpu:0")
    await store.finish(done.id, 1, TaskState.SUCCEEDED)
    assert [t.id for t in await store.reap(time.time() + 1)] == [running.id]
    assert await store.reap(time.time() + 1) == []
    assert (await store.get(done.id)).state is TaskState.SUCCEEDED  # type: ignore[union-attr]
    assert (await store.get(queued.id)).state is TaskState.QUEUED  # type: ignore[union-attr]


# -- retention --------------------------------------------------------------------------------


async def test_purge_deletes_what_finished_before_the_cutoff_with_its_events_and_key(
        store: Store) -> None:
    old = [await submit(store, input=i, key=f"k{i}") for i in range(3)]
    for _ in old:
        await claim_one(store)
    await store.finish(old[0].id, 1, TaskState.SUCCEEDED, output=1)
    await store.finish(old[1].id, 1, TaskState.FAILED, error={"message": "x"})
    cancelled = await submit(store, input="c")
    await store.cancel_queued(cancelled.id)
    cutoff = time.time() + 1e-6
    _after(cutoff)
    running = old[2]  # claimed before the cutoff, still running: kept
    queued = await submit(store, input="q")
    recent = await submit(store, input="r")
    await claim_one(store)  # the oldest queued: `queued`
    await store.finish(queued.id, 1, TaskState.SUCCEEDED)  # finished after the cutoff: kept

    report = await store.purge(cutoff)
    assert (report.tasks, report.keys) == (3, 2)
    assert report.events == 3 + 3 + 2  # queued, running, final; queued, cancelled
    assert report.batches >= 1 and report.longest_batch_s >= 0 and report.db_bytes > 0
    assert report.rows["tasks"] == 3
    for gone in (old[0], old[1], cancelled):
        assert await store.get(gone.id) is None
        assert await store.events(gone.id) == []
    assert await store.task_for_key("k0") is None
    for kept in (running, queued, recent):
        assert await store.get(kept.id) is not None
    assert await store.task_for_key("k2") is not None
    # A purged task's key may name a new task; the kept ones still dedupe.
    fresh, created = await store.submit(spec(key="k0", input="new body"))
    assert created and fresh.id != old[0].id
    same, created = await store.submit(spec(key="k2", input=2))
    assert not created and same.id == running.id
    listed, _ = await store.list_tasks(limit=10)
    assert {t.id for t in listed} == {running.id, queued.id, recent.id, fresh.id}
    assert (await store.purge(cutoff)).tasks == 0  # nothing left to purge


async def test_purge_empties_the_store_in_batches_and_keeps_counters(store: Store) -> None:
    n = 1200  # more than one batch
    await store.submit_many([spec("p", input=i) for i in range(n)])
    claimed = await store.claim("p", "gpu", n, "n1", "gpu:0")
    await store.finish_many([Finish(t.id, t.token, TaskState.SUCCEEDED, output=t.input)
                             for t in claimed])
    await submit(store, "p", input="after")
    report = await store.purge(time.time() + 1)
    assert report.tasks == n and report.events == 3 * n and report.batches >= 2
    assert report.rows == {"tasks": 1, "events": 1, "idempotency": 0}
    assert (await store.queue_stats())["p"].queued == 1


async def test_notifier_is_back_to_idle_after_2000_tasks(store: Store) -> None:
    idle = len(store.notifier)
    for _ in range(4):
        await store.submit_many([spec("p", input=i) for i in range(500)])
        claimed = await store.claim("p", "gpu", 500, "n1", "gpu:0")
        await store.finish_many([Finish(t.id, t.token, TaskState.SUCCEEDED)
                                 for t in claimed[:250]])
        for t in claimed[250:]:
            await store.append_events(t.id, [NewEvent("progress", {"done": 1})])
            await store.finish(t.id, t.token, TaskState.FAILED, error={"message": "x"})
    assert len(store.notifier) == idle == 0


async def test_a_waiter_racing_a_finish_still_sees_the_final_task(store: Store) -> None:
    """A follower (Node.follow, wait_final) reads the version, then the task; if the task is
    claimed, finished and dropped from the notifier in between, its wait must not park on a
    version that looks unchanged."""
    task = await submit(store)
    seen = store.notifier.version(task.id)
    read = await store.get(task.id)
    assert read is not None and not read.state.final
    [claimed] = await store.claim("p", "gpu", 1, "n1", "gpu:0")
    await store.finish(task.id, claimed.token, TaskState.SUCCEEDED, output=1)
    assert await store.notifier.wait(task.id, seen, timeout=0) is True
    assert await store.notifier.until_final(task.id, seen, timeout=0) is True
    final = await wait_final(store, task.id, timeout=0)
    assert final is not None and final.state is TaskState.SUCCEEDED
    assert len(store.notifier) == 0


async def test_purge_with_max_batches_leaves_the_rest_for_the_next_call(store: Store) -> None:
    n = 1100  # three batches' worth
    await store.submit_many([spec("p", input=i) for i in range(n)])
    claimed = await store.claim("p", "gpu", n, "n1", "gpu:0")
    await store.finish_many([Finish(t.id, t.token, TaskState.SUCCEEDED) for t in claimed])
    first = await store.purge(time.time() + 1, max_batches=1)
    assert first.batches == 1 and 0 < first.tasks < n
    assert first.rows["tasks"] == n - first.tasks
    rest = await store.purge(time.time() + 1)
    assert first.tasks + rest.tasks == n and rest.rows["tasks"] == 0


async def test_a_late_event_for_a_finished_task_leaves_no_notifier_entry(store: Store) -> None:
    """A cancelled or reaped attempt's worker may still stream an event after the end."""
    task = await submit(store)
    [claimed] = await store.claim("p", "gpu", 1, "n1", "gpu:0")
    seen = store.notifier.version(task.id)
    await store.finish(task.id, claimed.token, TaskState.CANCELLED, error={"message": "x"})
    late = await store.append_events(task.id, [NewEvent("text_delta", {"delta": "late"})])
    assert [e.type for e in late] == ["text_delta"]
    assert len(store.notifier) == 0
    assert store.notifier.version(task.id) != seen  # a follower that read before re-reads
