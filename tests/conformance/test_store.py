"""What every Store backend must do: the conformance suite (backends: see conftest.py)."""

from __future__ import annotations

import asyncio
import inspect
import re
import time
from typing import TYPE_CHECKING, Any

import pytest
from tests.conftest import LoopClock, eventually, settle

from gpulane.errors import ConflictError, StaleTokenError, StoreError
from gpulane.model import DeviceWish, Task, TaskSpec, TaskState
from gpulane.store import (
    Finish,
    NewEvent,
    QueueHead,
    Store,
    TaskNotifier,
    body_hash,
    wait_final,
)

if TYPE_CHECKING:
    from tests.conformance.conftest import Backend


def spec(preset: str = "p", input: Any = None, *, priority: int = 50, lane: str = "gpu",
         key: str | None = None, body: Any = None, **kw: Any) -> TaskSpec:
    """A TaskSpec; ``key`` sets an idempotency key hashed over ``body`` (default: the input)."""
    bh = body_hash(body if body is not None else {"input": input}) if key is not None else None
    return TaskSpec(preset=preset, input=input, priority=priority, lane=lane,
                    idempotency_key=key, body_hash=bh, **kw)


async def submit(store: Store, *args: Any, **kw: Any) -> Task:
    task, created = await store.submit(spec(*args, **kw))
    assert created
    return task


async def claim_one(store: Store, preset: str = "p", lane: str = "gpu", node: str = "n1",
                    device: str = "gpu:0") -> Task:
    [task] = await store.claim(preset, lane, 1, node, device)
    return task


async def states(store: Store, task_id: str) -> list[str]:
    return [e.data["state"] for e in await store.events(task_id) if e.type == "state"]


# -- the protocol itself ----------------------------------------------------------------------


def test_backend_implements_every_store_method(store: Store) -> None:
    names = [n for n, v in vars(Store).items() if not n.startswith("_") and callable(v)]
    assert "claim" in names and "recover" in names
    for name in names:
        method = getattr(store, name, None)
        assert method is not None, f"{type(store).__name__} lacks {name}"
        if name == "follow":  # an async generator: iterated, not awaited
            continue
        assert inspect.iscoroutinefunction(method), f"{name} must be async"
    assert isinstance(store.notifier, TaskNotifier)


# -- submit and idempotency -------------------------------------------------------------------


async def test_submit_returns_a_queued_task(store: Store) -> None:
    before = time.time()
    task, created = await store.submit(spec("p", {"x": 1}, priority=70, lane="cpu",
                                            device_wish=DeviceWish.AUTO, timeout_s=12.5,
                                            content_type="application/json",
                                            fallback_reason="no_gpu"))
    assert created is True
    assert re.fullmatch(r"[0-9a-f]{24}", task.id)
    assert task.seq > 0
    # A timestamp, not a duration: created_at is epoch seconds of about now. The bracket reads
    # the same wall clock and times nothing; no clock is injected because a backend may take
    # its time elsewhere (Redis's TIME), and the 1 s slack allows for such a clock's skew.
    assert before - 1 <= task.created_at <= time.time() + 1
    assert task.state is TaskState.QUEUED
    assert (task.preset, task.input, task.priority, task.lane) == ("p", {"x": 1}, 70, "cpu")
    assert task.fallback_reason == "no_gpu"
    assert task.timeout_s == 12.5 and task.content_type == "application/json"
    assert task.attempts == 0 and task.placement is None and task.started_at is None
    assert task.output is None and task.error is None and task.finished_at is None
    assert await store.get(task.id) == task


async def test_submit_gives_each_task_a_new_id_and_a_growing_seq(store: Store) -> None:
    tasks = [await submit(store, input=i) for i in range(5)]
    assert len({t.id for t in tasks}) == 5
    seqs = [t.seq for t in tasks]
    assert seqs == sorted(seqs) and len(set(seqs)) == 5
    assert await store.queued_count() == 5


async def test_first_event_is_state_queued(store: Store) -> None:
    task = await submit(store, lane="cpu", fallback_reason="no_gpu")
    [ev] = await store.events(task.id)
    assert (ev.task_id, ev.seq, ev.type) == (task.id, 1, "state")
    assert ev.data["state"] == "queued"
    assert ev.data["lane"] == "cpu" and ev.data["fallback_reason"] == "no_gpu"
    assert ev.ts == pytest.approx(task.created_at, abs=1)


async def test_same_key_and_body_returns_the_same_task(store: Store) -> None:
    first, created = await store.submit(spec(input={"a": 1}, key="k1"))
    assert created is True
    again, created = await store.submit(spec(input={"a": 1}, key="k1"))
    assert created is False
    assert again == first
    assert await store.queued_count() == 1
    assert len(await store.events(first.id)) == 1  # no second "queued" event


async def test_same_key_returns_the_task_as_it_stands_now(store: Store) -> None:
    first, _ = await store.submit(spec(input=1, key="k1"))
    await claim_one(store)
    again, created = await store.submit(spec(input=1, key="k1"))
    assert created is False
    assert again.id == first.id and again.state is TaskState.RUNNING


async def test_same_key_other_body_is_a_conflict(store: Store) -> None:
    first, _ = await store.submit(spec(input={"a": 1}, key="k1"))
    with pytest.raises(ConflictError) as info:
        await store.submit(spec(input={"a": 2}, key="k1"))
    assert info.value.field == "Idempotency-Key"
    assert info.value.status == 409
    assert info.value.extra.get("task_id") == first.id
    assert await store.queued_count() == 1


async def test_other_keys_make_other_tasks(store: Store) -> None:
    a, _ = await store.submit(spec(input=1, key="k1"))
    b, created = await store.submit(spec(input=1, key="k2"))
    c, created_c = await store.submit(spec(input=1))  # no key: always new
    d, created_d = await store.submit(spec(input=1))
    assert created and created_c and created_d
    assert len({a.id, b.id, c.id, d.id}) == 4


async def test_submit_many_returns_tasks_in_order(store: Store) -> None:
    out = await store.submit_many([spec(input=i) for i in range(3)])
    assert [t.input for t, _ in out] == [0, 1, 2]
    assert all(created for _, created in out)
    assert await store.submit_many([]) == []


async def test_submit_many_same_key_twice_in_one_batch(store: Store) -> None:
    out = await store.submit_many([spec(input=1, key="k"), spec(input=1, key="k")])
    (a, created_a), (b, created_b) = out
    assert created_a is True and created_b is False and a.id == b.id
    assert await store.queued_count() == 1


async def test_submit_many_is_all_or_nothing_on_a_conflict(store: Store) -> None:
    await store.submit(spec(input="old", key="taken"))
    batch = [spec(input="new1", key="fresh"), spec(input="new2"),
             spec(input="different", key="taken")]
    with pytest.raises(ConflictError):
        await store.submit_many(batch)
    tasks, _ = await store.list_tasks()
    assert [t.input for t in tasks] == ["old"]
    assert await store.queued_count() == 1
    # the batch's keys were not kept either: the same spec now makes a new task
    task, created = await store.submit(spec(input="new1", key="fresh"))
    assert created is True and task.input == "new1"


# -- reads ------------------------------------------------------------------------------------


async def test_get_unknown_is_none(store: Store) -> None:
    assert await store.get("0" * 24) is None
    assert await store.get("not-an-id") is None


async def test_list_tasks_newest_first_and_filtered(store: Store) -> None:
    a = await submit(store, "a", 1)
    b = await submit(store, "b", 2)
    c = await submit(store, "a", 3)
    d = await submit(store, "b", 4)
    await claim_one(store, "a")  # a is now running

    tasks, cursor = await store.list_tasks()
    assert [t.id for t in tasks] == [d.id, c.id, b.id, a.id] and cursor is None
    by_preset, _ = await store.list_tasks(preset="a")
    assert [t.id for t in by_preset] == [c.id, a.id]
    running, _ = await store.list_tasks(state=TaskState.RUNNING)
    assert [t.id for t in running] == [a.id]
    assert running[0].state is TaskState.RUNNING
    both, _ = await store.list_tasks(state=TaskState.QUEUED, preset="a")
    assert [t.id for t in both] == [c.id]
    none, cursor = await store.list_tasks(state=TaskState.FAILED)
    assert none == [] and cursor is None
    unknown, _ = await store.list_tasks(preset="nope")
    assert unknown == []


@pytest.mark.parametrize(("count", "limit"), [(7, 3), (6, 3), (3, 3), (1, 5), (0, 2)])
async def test_list_tasks_pages_to_the_end(store: Store, count: int, limit: int) -> None:
    ids = [(await submit(store, input=i)).id for i in range(count)]
    seen: list[str] = []
    cursor: str | None = None
    pages = 0
    while True:
        page, cursor = await store.list_tasks(limit=limit, cursor=cursor)
        pages += 1
        assert len(page) <= limit
        if cursor is not None:
            assert len(page) == limit  # a page with a next_cursor is full
        seen += [t.id for t in page]
        if cursor is None:
            break
        assert pages <= count + 1, "pagination does not end"
    assert seen == ids[::-1]
    assert pages == max(1, -(-count // limit))  # no empty trailing page


async def test_list_tasks_pages_within_a_filter(store: Store) -> None:
    want = []
    for i in range(7):
        t = await submit(store, "a" if i % 2 == 0 else "b", i)
        if t.preset == "a":
            want.append(t.id)
    seen: list[str] = []
    page, cursor = await store.list_tasks(preset="a", limit=3)
    seen += [t.id for t in page]
    while cursor is not None:
        page, cursor = await store.list_tasks(preset="a", limit=3, cursor=cursor)
        seen += [t.id for t in page]
    assert seen == want[::-1]


async def test_queue_heads_priority_then_fifo_per_preset_and_lane(store: Store) -> None:
    await submit(store, "p", "p-low", priority=10)
    p_hi1 = await submit(store, "p", "p-hi1", priority=80)
    await submit(store, "p", "p-hi2", priority=80)
    p_cpu = await submit(store, "p", "p-cpu", priority=5, lane="cpu")
    q1 = await submit(store, "q", "q1")
    await submit(store, "q", "q2")
    r = await submit(store, "r", "r")
    await claim_one(store, "r")  # r's only task runs: its queue is empty

    lanes = [("p", "gpu"), ("p", "cpu"), ("q", "gpu"), ("q", "cpu"), ("r", "gpu"),
             ("none", "gpu")]
    heads = {(h.preset, h.lane): h for h in await store.queue_heads(lanes)}
    assert set(heads) == {("p", "gpu"), ("p", "cpu"), ("q", "gpu")}
    assert heads["p", "gpu"] == QueueHead("p", "gpu", 80, p_hi1.seq, p_hi1.id)
    assert heads["p", "cpu"] == QueueHead("p", "cpu", 5, p_cpu.seq, p_cpu.id)
    assert heads["q", "gpu"] == QueueHead("q", "gpu", 50, q1.seq, q1.id)
    assert r.id not in {h.task_id for h in heads.values()}
    assert await store.queue_heads([]) == []


# -- claim ------------------------------------------------------------------------------------


async def test_claim_takes_highest_priority_then_fifo(store: Store) -> None:
    low = await submit(store, input="low", priority=10)
    mid1 = await submit(store, input="mid1", priority=50)
    mid2 = await submit(store, input="mid2", priority=50)
    top = await submit(store, input="top", priority=90)
    await submit(store, "other", "other preset", priority=100)
    await submit(store, input="other lane", priority=100, lane="cpu")

    first = await store.claim("p", "gpu", 2, "n1", "gpu:0")
    assert [t.id for t in first] == [top.id, mid1.id]
    rest = await store.claim("p", "gpu", 10, "n1", "gpu:0")
    assert [t.id for t in rest] == [mid2.id, low.id]
    assert await store.claim("p", "gpu", 10, "n1", "gpu:0") == []
    assert await store.queued_count() == 2  # the other preset's and the cpu lane's


async def test_claim_only_its_lane(store: Store) -> None:
    gpu = await submit(store, input="g", lane="gpu")
    cpu = await submit(store, input="c", lane="cpu", fallback_reason="no_gpu")
    [got] = await store.claim("p", "cpu", 5, "n1", "cpu")
    assert got.id == cpu.id
    assert (await store.get(gpu.id)).state is TaskState.QUEUED  # type: ignore[union-attr]


async def test_claim_marks_running_with_placement(store: Store) -> None:
    task = await submit(store, lane="cpu", fallback_reason="vram_exceeds_largest_gpu")
    before = time.time()
    got = await claim_one(store, lane="cpu", node="node-a", device="cpu")
    assert got.id == task.id
    assert got.state is TaskState.RUNNING
    assert got.attempts == 1 and got.token == 1
    assert got.placement is not None
    assert (got.placement.node, got.placement.device) == ("node-a", "cpu")
    assert got.placement.fallback_reason == "vram_exceeds_largest_gpu"
    # Epoch seconds of about now (a timestamp, not a duration: see the submit test).
    assert got.started_at is not None and before - 1 <= got.started_at <= time.time() + 1
    stored = await store.get(task.id)
    assert stored is not None
    assert (stored.state, stored.attempts, stored.placement, stored.started_at) == (
        TaskState.RUNNING, 1, got.placement, got.started_at)
    events = await store.events(task.id)
    assert [e.seq for e in events] == [1, 2]
    assert events[1].type == "state"
    assert events[1].data["state"] == "running"
    assert events[1].data["attempt"] == 1
    assert events[1].data["node"] == "node-a" and events[1].data["device"] == "cpu"


async def test_claim_skips_cancelled_and_finished_tasks(store: Store) -> None:
    cancelled = await submit(store, input="c")
    done = await submit(store, input="d")
    waiting = await submit(store, input="w")
    assert await store.cancel_queued(cancelled.id) is not None
    await claim_one(store)  # the oldest queued task: `done`
    await store.finish(done.id, 1, TaskState.SUCCEEDED)
    assert [t.id for t in await store.claim("p", "gpu", 10, "n1", "gpu:0")] == [waiting.id]


# -- finish and requeue -----------------------------------------------------------------------


async def test_finish_writes_state_events_and_output(store: Store) -> None:
    task = await submit(store)
    running = await claim_one(store)
    done = await store.finish(task.id, running.token, TaskState.SUCCEEDED,
                              output={"text": "hi", "n": [1, 2]},
                              events=[NewEvent("progress", {"pct": 100}),
                                      NewEvent("result", {"ok": True})])
    assert done.state is TaskState.SUCCEEDED
    assert done.output == {"text": "hi", "n": [1, 2]} and done.error is None
    assert done.finished_at is not None and done.finished_at >= running.started_at  # type: ignore[operator]
    assert done.attempts == 1
    assert await store.get(task.id) == done
    events = await store.events(task.id)
    assert [(e.seq, e.type) for e in events] == [
        (1, "state"), (2, "state"), (3, "progress"), (4, "result"), (5, "state")]
    assert events[2].data == {"pct": 100} and events[3].data == {"ok": True}
    assert events[4].data["state"] == "succeeded"
    assert await store.queued_count() == 0


@pytest.mark.parametrize("state", [TaskState.FAILED, TaskState.CANCELLED])
async def test_finish_with_an_error(store: Store, state: TaskState) -> None:
    task = await submit(store)
    await claim_one(store)
    err = {"code": "oom", "kind": "oom", "message": "out of memory"}
    done = await store.finish(task.id, 1, state, error=err)
    assert done.state is state and done.error == err and done.output is None
    assert (await store.events(task.id))[-1].data == {"state": state.value, "error": err}


async def test_finish_with_a_wrong_attempt_is_stale(store: Store) -> None:
    task = await submit(store)
    await claim_one(store)
    for token in (0, 2):
        with pytest.raises(StaleTokenError):
            await store.finish(task.id, token, TaskState.SUCCEEDED, output="x",
                               events=[NewEvent("text", {"text": "zombie"})])
    stored = await store.get(task.id)
    assert stored is not None and stored.state is TaskState.RUNNING and stored.output is None
    assert len(await store.events(task.id)) == 2  # nothing of the stale call was kept


async def test_finish_a_task_not_running_is_stale(store: Store) -> None:
    task = await submit(store)
    with pytest.raises(StaleTokenError):  # queued: attempts is 0, but it is not running
        await store.finish(task.id, 0, TaskState.SUCCEEDED)
    await claim_one(store)
    await store.finish(task.id, 1, TaskState.SUCCEEDED, output=1)
    with pytest.raises(StaleTokenError):  # finished already
        await store.finish(task.id, 1, TaskState.FAILED, error={"message": "late"})
    stored = await store.get(task.id)
    assert stored is not None and stored.state is TaskState.SUCCEEDED and stored.output == 1


async def test_finish_unknown_task_or_non_final_state_is_refused(store: Store) -> None:
    with pytest.raises(StoreError):
        await store.finish("0" * 24, 1, TaskState.SUCCEEDED)
    task = await submit(store)
    await claim_one(store)
    for state in (TaskState.QUEUED, TaskState.RUNNING):
        with pytest.raises(StoreError):
            await store.finish(task.id, 1, state)
    assert (await store.get(task.id)).state is TaskState.RUNNING  # type: ignore[union-attr]


async def test_requeue_puts_the_task_back(store: Store) -> None:
    task = await submit(store, priority=70)
    await claim_one(store)
    err = {"code": "worker_died", "kind": "worker_died", "message": "exit 137"}
    back = await store.requeue(task.id, 1, err, events=[NewEvent("log", {"line": "bye"})])
    assert back.state is TaskState.QUEUED and back.error == err
    assert back.placement is None and back.attempts == 1
    assert await store.get(task.id) == back
    assert await store.queued_count() == 1
    [head] = await store.queue_heads([("p", "gpu")])
    assert head.task_id == task.id and head.priority == 70
    events = await store.events(task.id)
    assert [e.type for e in events[2:]] == ["log", "state"]
    assert events[-1].data["state"] == "queued"

    again = await claim_one(store, node="n2", device="gpu:1")
    assert again.id == task.id and again.attempts == 2 and again.token == 2
    assert again.placement is not None and again.placement.node == "n2"
    with pytest.raises(StaleTokenError):  # the first attempt is fenced off
        await store.finish(task.id, 1, TaskState.SUCCEEDED)
    with pytest.raises(StaleTokenError):
        await store.requeue(task.id, 1, None)


async def test_requeue_with_a_stale_token_changes_nothing(store: Store) -> None:
    task = await submit(store)
    with pytest.raises(StaleTokenError):
        await store.requeue(task.id, 0, None)  # queued, not running
    await claim_one(store)
    with pytest.raises(StaleTokenError):
        await store.requeue(task.id, 5, {"message": "x"})
    stored = await store.get(task.id)
    assert stored is not None and stored.state is TaskState.RUNNING and stored.error is None


async def test_success_after_a_retry_clears_the_error(store: Store) -> None:
    task = await submit(store)
    await claim_one(store)
    await store.requeue(task.id, 1, {"code": "oom", "message": "retry me"})
    await claim_one(store)
    done = await store.finish(task.id, 2, TaskState.SUCCEEDED, output="ok")
    assert done.error is None and done.output == "ok" and done.attempts == 2
    assert (await store.get(task.id)).error is None  # type: ignore[union-attr]
    assert await states(store, task.id) == [
        "queued", "running", "queued", "running", "succeeded"]


# -- events -----------------------------------------------------------------------------------


async def test_events_are_numbered_without_gaps_and_resume(store: Store) -> None:
    task = await submit(store)
    other = await submit(store)
    await claim_one(store)  # claims `task`, the older one
    appended = await store.append_events(task.id, [NewEvent("progress", {"i": i})
                                                    for i in range(3)])
    assert [e.seq for e in appended] == [3, 4, 5]
    assert all(e.task_id == task.id for e in appended)
    assert await store.append_events(task.id, []) == []
    await store.append_events(other.id, [NewEvent("log", {"line": "x"})])
    await store.append_events(task.id, [NewEvent("text_delta", {"text": "é ✓"})])
    await store.finish(task.id, 1, TaskState.SUCCEEDED, events=[NewEvent("result", {})])

    events = await store.events(task.id)
    assert [e.seq for e in events] == list(range(1, 9))
    assert [e.type for e in events] == ["state", "state", "progress", "progress", "progress",
                                        "text_delta", "result", "state"]
    assert events[5].data == {"text": "é ✓"}
    assert [e.data for e in events[2:5]] == [{"i": 0}, {"i": 1}, {"i": 2}]
    assert [e.seq for e in await store.events(other.id)] == [1, 2]  # numbered per task

    for k in range(9):
        assert [e.seq for e in await store.events(task.id, after=k)] == list(range(k + 1, 9))
    assert [e.seq for e in await store.events(task.id, after=2, limit=2)] == [3, 4]
    assert [e.seq for e in await store.events(task.id, after=4, limit=2)] == [5, 6]
    assert [e.seq for e in await store.events(task.id, after=100)] == []
    assert await store.events("0" * 24) == []


async def test_append_events_to_an_unknown_task_is_refused(store: Store) -> None:
    with pytest.raises(StoreError):
        await store.append_events("0" * 24, [NewEvent("log", {"line": "x"})])


# -- cancel and recover -----------------------------------------------------------------------


async def test_cancel_queued(store: Store) -> None:
    task = await submit(store)
    cancelled = await store.cancel_queued(task.id)
    assert cancelled is not None
    assert cancelled.id == task.id and cancelled.state is TaskState.CANCELLED
    assert cancelled.finished_at is not None
    assert await store.get(task.id) == cancelled
    assert await store.queued_count() == 0
    assert await states(store, task.id) == ["queued", "cancelled"]
    assert await store.cancel_queued(task.id) is None  # not queued any more
    assert await states(store, task.id) == ["queued", "cancelled"]


async def test_cancel_queued_refuses_running_finished_and_unknown(store: Store) -> None:
    running = await submit(store, "r")
    await claim_one(store, "r")
    done = await submit(store, "d")
    await claim_one(store, "d")
    await store.finish(done.id, 1, TaskState.SUCCEEDED)
    assert await store.cancel_queued(running.id) is None
    assert await store.cancel_queued(done.id) is None
    assert await store.cancel_queued("0" * 24) is None
    assert (await store.get(running.id)).state is TaskState.RUNNING  # type: ignore[union-attr]
    assert (await store.get(done.id)).state is TaskState.SUCCEEDED  # type: ignore[union-attr]


async def test_recover_requeues_only_that_nodes_running_tasks(store: Store) -> None:
    mine1 = await submit(store, input=1)
    mine2 = await submit(store, input=2)
    theirs = await submit(store, input=3)
    finished = await submit(store, input=4)
    waiting = await submit(store, input=5)
    await store.claim("p", "gpu", 2, "n1", "gpu:0")
    await claim_one(store, node="n2")
    await claim_one(store, node="n1")
    await store.finish(finished.id, 1, TaskState.SUCCEEDED)

    assert await store.recover("n1") == 2
    for t in (mine1, mine2):
        got = await store.get(t.id)
        assert got is not None
        # A restart gives the attempt back; the fencing token stays risen.
        assert got.state is TaskState.QUEUED and got.placement is None and got.attempts == 0
        assert got.token == 1
        assert await states(store, t.id) == ["queued", "running", "queued"]
    assert (await store.get(theirs.id)).state is TaskState.RUNNING  # type: ignore[union-attr]
    assert (await store.get(finished.id)).state is TaskState.SUCCEEDED  # type: ignore[union-attr]
    assert (await store.get(waiting.id)).state is TaskState.QUEUED  # type: ignore[union-attr]
    assert await store.recover("n1") == 0
    assert await store.recover("never-seen") == 0

    with pytest.raises(StaleTokenError):  # the lost attempt cannot finish any more
        await store.finish(mine1.id, 1, TaskState.SUCCEEDED)
    again = await store.claim("p", "gpu", 10, "n1", "gpu:0")
    assert [t.id for t in again] == [mine1.id, mine2.id, waiting.id]
    assert [t.attempts for t in again] == [1, 1, 1]
    assert [t.token for t in again] == [2, 2, 1]


# -- durability -------------------------------------------------------------------------------


async def test_reopened_store_keeps_tasks_events_and_keys(durable_backend: Backend) -> None:
    first = durable_backend.make()
    await first.open()
    try:
        keyed, _ = await first.submit(spec(input={"a": 1}, key="k1"))
        running, _ = await first.submit(spec(input=2, priority=90))
        queued, _ = await first.submit(spec(input=3))
        await claim_one(first)  # `running` has the highest priority
        await first.append_events(running.id, [NewEvent("progress", {"pct": 50})])
        await claim_one(first)
        done = await first.finish(keyed.id, 1, TaskState.SUCCEEDED, output={"y": 2})
    finally:
        await first.close()

    second = durable_backend.make()
    await second.open()
    try:
        assert await second.get(keyed.id) == done
        got = await second.get(running.id)
        assert got is not None and got.state is TaskState.RUNNING and got.attempts == 1
        assert (await second.get(queued.id)).state is TaskState.QUEUED  # type: ignore[union-attr]
        events = await second.events(running.id)
        assert [(e.seq, e.type) for e in events] == [(1, "state"), (2, "state"),
                                                     (3, "progress")]
        assert events[2].data == {"pct": 50}
        again, created = await second.submit(spec(input={"a": 1}, key="k1"))
        assert created is False and again.id == keyed.id
        with pytest.raises(ConflictError):
            await second.submit(spec(input={"a": 9}, key="k1"))
        # numbering goes on where it stopped
        [ev] = await second.append_events(running.id, [NewEvent("progress", {"pct": 60})])
        assert ev.seq == 4
        newer = await submit(second)
        assert newer.seq > queued.seq
        assert await second.recover("n1") == 1
        assert await second.queued_count() == 3
    finally:
        await second.close()


async def test_finish_many_ends_a_batch_in_one_call_and_reports_stale_items(
        store: Store) -> None:
    tasks = [await submit(store, input={"i": i}) for i in range(3)]
    claimed = await store.claim("p", "gpu", 10, "n1", "gpu:0")
    assert [t.id for t in claimed] == [t.id for t in tasks]  # queue order kept
    await store.finish(tasks[1].id, 1, TaskState.CANCELLED)  # ended elsewhere meanwhile
    got = await store.finish_many([
        Finish(tasks[0].id, 1, TaskState.SUCCEEDED, output={"ok": 0},
               events=[NewEvent("result", {"output": {"ok": 0}})]),
        Finish(tasks[1].id, 1, TaskState.SUCCEEDED, output={"ok": 1}),
        Finish(tasks[2].id, 1, TaskState.FAILED, error={"kind": "bad_input", "message": "x"}),
        Finish("0" * 24, 1, TaskState.SUCCEEDED),
    ])
    assert isinstance(got[0], Task) and got[0].state is TaskState.SUCCEEDED
    assert got[0].output == {"ok": 0} and got[0].finished_at is not None
    assert isinstance(got[1], StaleTokenError) and isinstance(got[3], StaleTokenError)
    assert isinstance(got[2], Task) and got[2].error == {"kind": "bad_input", "message": "x"}
    assert await states(store, tasks[0].id) == ["queued", "running", "succeeded"]
    assert [e.type for e in await store.events(tasks[0].id)] == [
        "state", "state", "result", "state"]
    assert (await store.get(tasks[1].id)).state is TaskState.CANCELLED  # type: ignore[union-attr]
    with pytest.raises(StoreError):
        await store.finish_many([Finish(tasks[0].id, 1, TaskState.RUNNING)])


# -- notifier and wait_final ------------------------------------------------------------------
# Timeouts here are driven by ``loop_clock`` (tests/conftest.py), never waited out; a waiter
# that must not wait is given an hour and a GUARD_S guard, so returning at all proves it did
# not wait for its timeout. (The generic Notifier's own tests: tests/unit/test_notify.py.)

GUARD_S = 10.0
"""Failure guard for awaiting an answer that should come at once: never the assertion."""
LONG_S = 3600.0
"""A timeout that no test run reaches unless the test advances the clock past it."""


def _task(state: TaskState, output: Any = None) -> Task:
    return Task(id="t", preset="p", state=state, input=None, priority=50,
                device_wish=DeviceWish.AUTO, created_at=0.0, output=output)


async def test_until_final_sleeps_through_changes_and_hands_over_the_final_task(
        loop_clock: LoopClock) -> None:
    n = TaskNotifier()
    running, done = _task(TaskState.RUNNING), _task(TaskState.SUCCEEDED, output=1)
    waiter = asyncio.create_task(n.until_final("t", n.version("t"), timeout=LONG_S))
    await settle()
    n.notify("t", running)  # claimed: not what a result waiter waits for
    await settle()
    assert not waiter.done()
    n.notify("t", done)
    assert await asyncio.wait_for(waiter, GUARD_S) is done
    # A notify that carries no task wakes result waiters to re-read.
    waiter = asyncio.create_task(n.until_final("t", n.version("t"), timeout=LONG_S))
    await settle()
    n.notify("t")
    assert await asyncio.wait_for(waiter, GUARD_S) is True
    # Nothing happens: False once the timeout passes, and not before.
    waiter = asyncio.create_task(n.until_final("t", n.version("t"), timeout=60))
    await settle()  # parked: its 60 s count from here
    await loop_clock.advance(50)
    assert not waiter.done()
    await loop_clock.advance(20)
    assert await asyncio.wait_for(waiter, GUARD_S) is False
    # Changed since the version was read: True without parking (a parked wait with no time
    # left would answer False).
    assert await n.until_final("t", n.version("t") - 1, timeout=0) is True


async def test_task_notifier_drops_a_task_once_final_after_waking_its_waiters() -> None:
    n = TaskNotifier()
    n.notify("t", _task(TaskState.RUNNING))
    seen = n.version("t")
    result = asyncio.create_task(n.until_final("t", seen, timeout=LONG_S))
    follower = asyncio.create_task(n.wait("t", seen, timeout=LONG_S))
    await settle()
    assert len(n) == 1
    n.notify("t", _task(TaskState.FAILED))
    assert (await asyncio.wait_for(result, GUARD_S)).state is TaskState.FAILED  # type: ignore[union-attr]
    assert await asyncio.wait_for(follower, GUARD_S) is True
    assert len(n) == 0 and n.version("t") != seen


async def test_every_write_notifies_the_task(store: Store) -> None:
    n = store.notifier
    task = await submit(store)
    v = n.version(task.id)
    assert v >= 1  # submit
    await claim_one(store)
    assert n.version(task.id) > v
    v = n.version(task.id)
    await store.append_events(task.id, [NewEvent("progress", {})])
    assert n.version(task.id) > v
    v = n.version(task.id)
    await store.requeue(task.id, 1, None)
    assert n.version(task.id) > v
    v = n.version(task.id)
    assert await store.cancel_queued(task.id) is not None
    assert n.version(task.id) > v

    other = await submit(store)
    await claim_one(store)
    v = n.version(other.id)
    await store.finish(other.id, 1, TaskState.SUCCEEDED)
    assert n.version(other.id) > v


async def _parked(store: Store, task_id: str) -> None:
    """Until a result waiter on the task is parked: the store's read before it is done, so
    moving the loop clock now cannot time out a backend's own I/O (a server backend's client
    times its reads on that same clock)."""
    async def check() -> bool:
        return store.notifier.waited_on(task_id)

    await eventually(check)


async def test_wait_final_returns_once_finished(store: Store) -> None:
    """The finish wakes the waiter: with an hour's timeout, an answer within the guard can
    only come from the finish, and a progress event before it does not end the wait."""
    task = await submit(store)
    await claim_one(store)
    waiter = asyncio.create_task(wait_final(store, task.id, timeout=LONG_S))
    await settle()
    assert not waiter.done()
    await store.append_events(task.id, [NewEvent("progress", {"pct": 50})])  # not final
    await settle()
    assert not waiter.done()
    await store.finish(task.id, 1, TaskState.SUCCEEDED, output="done")
    got = await asyncio.wait_for(waiter, GUARD_S)
    assert got is not None and got.state is TaskState.SUCCEEDED and got.output == "done"


async def test_wait_final_returns_at_once_for_final_and_unknown(store: Store) -> None:
    """A final or unknown task is answered without waiting (an hour's timeout, the guard)."""
    task = await submit(store)
    await store.cancel_queued(task.id)
    got = await asyncio.wait_for(wait_final(store, task.id, timeout=LONG_S), GUARD_S)
    assert got is not None and got.state is TaskState.CANCELLED
    assert await asyncio.wait_for(wait_final(store, "0" * 24, timeout=LONG_S), GUARD_S) is None


async def test_wait_final_returns_the_unfinished_task_after_the_timeout(
        store: Store, loop_clock: LoopClock) -> None:
    """Not before the timeout, and then the task as it stands."""
    task = await submit(store)
    waiter = asyncio.create_task(wait_final(store, task.id, timeout=60))
    await _parked(store, task.id)
    await loop_clock.advance(50)
    assert not waiter.done()
    await loop_clock.advance(20)
    got = await asyncio.wait_for(waiter, GUARD_S)
    assert got is not None and got.id == task.id and got.state is TaskState.QUEUED
    assert await wait_final(store, task.id, timeout=0) == got


async def test_wait_final_counts_its_timeout_on_the_loop_clock(
        store: Store, loop_clock: LoopClock) -> None:
    """The deadline and what is left of it both read the loop's clock (the one the wait's
    asyncio.timeout counts on): the clock starts far from time.monotonic, and a change that
    carries no task makes the waiter re-read and measure what is left mid-wait."""
    task = await submit(store)
    await loop_clock.advance(1000)
    waiter = asyncio.create_task(wait_final(store, task.id, timeout=60))
    await _parked(store, task.id)
    await loop_clock.advance(50)
    store.notifier.notify(task.id)  # wakes it to re-read: 10 s left, on the loop's clock
    await _parked(store, task.id)
    assert not waiter.done()
    await loop_clock.advance(20)
    got = await asyncio.wait_for(waiter, GUARD_S)
    assert got is not None and got.state is TaskState.QUEUED


# -- the harness itself -----------------------------------------------------------------------


def test_redis_fixture_serves_an_empty_database(redis_url: str) -> None:
    """The fixture the redis backend runs on starts a server and empties it (FLUSHALL)."""
    assert redis_url.startswith("redis://127.0.0.1:")


async def test_ageing_lifts_long_waiting_work_above_fresh_work(store: Store) -> None:
    old, _ = await store.submit(spec(priority=10))
    # 45 s later at one point per second, the background task stands at 10 + 45 = 55 ...
    assert await store.age_queued(1.0, at=old.created_at + 45) == 1
    new, _ = await store.submit(spec(priority=50))
    # ... ahead of normal work submitted just now.
    heads = await store.queue_heads([("p", "gpu")])
    assert (heads[0].task_id, heads[0].priority) == (old.id, 55)
    claimed = await store.claim("p", "gpu", 2, "n", "gpu:0")
    assert [t.id for t in claimed] == [old.id, new.id]
    assert [t.priority for t in claimed] == [10, 50]  # the asked priorities are kept


async def test_ageing_is_capped_and_keeps_the_asked_priority(store: Store) -> None:
    bg, _ = await store.submit(spec(priority=10))
    fresh, _ = await store.submit(spec(priority=90))
    await store.age_queued(1.0, at=bg.created_at + 10_000)
    heads = await store.queue_heads([("p", "gpu")])
    assert heads[0].priority == 100
    assert heads[0].task_id == bg.id  # equal effective priority: the older one first
    got = await store.get(bg.id)
    assert got is not None and got.priority == 10
    del fresh
