"""The batcher through a running node: adaptive growth, max_wait_ms filling, OOM shrinking."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable, Callable
from typing import Any

import httpx

from gpulane.node import Node


async def _bulk(api: httpx.AsyncClient, preset: str, n: int,
                input: dict[str, Any] | None = None) -> list[str]:
    r = await api.post("/v1/tasks/bulk", json={"tasks": [
        {"preset": preset, "input": input or {}} for _ in range(n)]})
    assert r.status_code == 202, r.text
    return [t["id"] for t in r.json()["tasks"]]


async def _results(api: httpx.AsyncClient, ids: list[str]) -> list[dict[str, Any]]:
    out = []
    for tid in ids:
        r = await api.get(f"/v1/tasks/{tid}/result", params={"wait": 30})
        out.append(r.json())
    return out


async def _backlog(api: httpx.AsyncClient, node: Node, preset: str, n: int,
                   input: Any = None) -> list[str]:
    """Queue n tasks with the scheduler stopped, then start it: the worker sees a backlog."""
    await node.scheduler.stop()
    ids = await _bulk(api, preset, n, input)
    node.scheduler.start()
    return ids


POLL_S = 0.01
"""How often a test looks again at what it waits for."""
WAIT_S = 30.0
"""How long a test waits for a condition before it fails."""


async def _until(check: Callable[[], Awaitable[bool]], what: str) -> None:
    """Poll ``check`` until it holds; fail, naming ``what``, after WAIT_S."""
    deadline = asyncio.get_running_loop().time() + WAIT_S
    while not await check():
        assert asyncio.get_running_loop().time() < deadline, f"never saw {what}"
        await asyncio.sleep(POLL_S)


async def _state(api: httpx.AsyncClient, tid: str) -> str:
    state: str = (await api.get(f"/v1/tasks/{tid}")).json()["state"]
    return state


async def _claimed(api: httpx.AsyncClient, tid: str) -> bool:
    return await _state(api, tid) != "queued"


async def _workers(api: httpx.AsyncClient, preset: str) -> list[dict[str, Any]]:
    return [w for w in (await api.get("/v1/workers")).json()["workers"]
            if w["preset"] == preset]


async def _worker_view(api: httpx.AsyncClient, preset: str) -> dict[str, Any]:
    [worker] = await _workers(api, preset)
    return worker


async def _batch_view(api: httpx.AsyncClient, preset: str) -> dict[str, Any]:
    batch: dict[str, Any] = (await _worker_view(api, preset))["batch"]
    return batch


async def test_adaptive_batches_start_at_one_and_grow_to_max_size_under_a_backlog(
        api: httpx.AsyncClient, node: Node) -> None:
    ids = await _backlog(api, node, "batchy", 300, {"ms": 2})
    done = await _results(api, ids)
    assert all(t["state"] == "succeeded" for t in done)
    sizes = [t["output"]["batch_size"] for t in done]
    assert sizes[0] == 1 and max(sizes) == 32
    batches = []  # FIFO: the tasks in order, cut into the batches they ran in
    i = 0
    while i < len(sizes):
        batches.append(sizes[i])
        i += sizes[i]
    # Growth at most doubles per batch. The next batch is claimed while one runs, so it
    # may take the size from before that batch's outcome: a size can repeat once.
    assert batches[:2] in ([1, 1], [1, 2])
    full = batches[:-1]  # the last one takes what is left
    assert all(a <= b <= 2 * a for a, b in itertools.pairwise(full)), batches
    for size in (2, 4, 8, 16):
        assert 1 <= batches.count(size) <= 2, batches
    view = await _batch_view(api, "batchy")
    assert view["mode"] == "adaptive" and view["size"] == 32 and view["tasks"] == 300


async def test_an_oom_batch_is_halved_rerun_and_its_ceiling_remembered(
        api: httpx.AsyncClient, node: Node) -> None:
    ids = await _backlog(api, node, "batchy-fixed-oom", 16)
    done = await _results(api, ids)
    assert [t["state"] for t in done] == ["succeeded"] * 16
    assert {t["output"]["batch_size"] for t in done} == {4}  # 16 -> 8 -> 4, then it fits
    view = await _batch_view(api, "batchy-fixed-oom")
    assert view["ceiling"] == 4 and view["ooms"] == 2
    events = (await api.get(f"/v1/tasks/{ids[0]}/events")).text
    assert '"kind":"oom"' in events and "runs again in a batch of at most 8" in events
    # The ceiling holds for the next tasks: no more OOMs.
    more = await _results(api, await _bulk(api, "batchy-fixed-oom", 8))
    assert {t["output"]["batch_size"] for t in more} == {4}
    assert (await _batch_view(api, "batchy-fixed-oom"))["ooms"] == 2


async def test_a_batch_of_one_that_runs_out_of_memory_fails_with_kind_oom(
        api: httpx.AsyncClient, node: Node) -> None:
    ids = await _backlog(api, node, "batchy-oom-always", 4)
    done = await _results(api, ids)
    assert [t["state"] for t in done] == ["failed"] * 4  # 4 -> 2 -> 1, then nothing is left
    assert {t["error"]["kind"] for t in done} == {"oom"}
    assert (await _batch_view(api, "batchy-oom-always"))["ceiling"] == 1


async def test_a_batch_waits_max_wait_ms_to_fill(api: httpx.AsyncClient) -> None:
    warm = await api.post("/v1/tasks", params={"wait": 30},
                          json={"preset": "batchy-wait", "input": {}})
    assert warm.json()["state"] == "succeeded"  # the worker is up: no start-up in the way
    ids: list[str] = []
    for _ in range(3):  # one at a time: each is claimed before the next one comes
        ids.append((await api.post("/v1/tasks", json={"preset": "batchy-wait",
                                                       "input": {}})).json()["id"])
        await _until(lambda: _claimed(api, ids[-1]), "the task claimed")
    done = await _results(api, ids)
    assert [t["output"]["batch_size"] for t in done] == [3, 3, 3]


async def test_a_task_cancelled_while_its_batch_forms_is_never_sent_and_frees_the_worker(
        api: httpx.AsyncClient, node: Node) -> None:
    warm = await api.post("/v1/tasks", params={"wait": 30},
                          json={"preset": "batchy-wait", "input": {}})
    assert warm.json()["state"] == "succeeded"
    tid = (await api.post("/v1/tasks", json={"preset": "batchy-wait", "input": {}})).json()["id"]
    [worker] = node.supervisor.workers.values()

    async def forming() -> bool:  # claimed into a batch that waits max_wait_ms (400) for more
        return tid in worker.runs

    await _until(forming, "the task in the forming batch")
    assert worker.forming is not None
    assert (await api.post(f"/v1/tasks/{tid}/cancel")).json()["state"] == "cancelled"

    async def freed() -> bool:  # the wait ends with nothing left to send
        return worker.forming is None and not worker.runs

    await _until(freed, "the forming batch end")
    assert node.ledger.cpu_used == 0  # its CPU slot came back
    after = await api.post("/v1/tasks", params={"wait": 30},
                           json={"preset": "batchy-wait", "input": {}})
    assert after.json()["state"] == "succeeded"
    assert (await _batch_view(api, "batchy-wait"))["tasks"] == 2  # the cancelled one never ran


async def _watch_held(api: httpx.AsyncClient, preset: str, last_id: str) -> tuple[int, int]:
    """Poll the worker's view until the last task is done: the most batches it held sent at
    once, and the most tasks its next batch held on the node."""
    most_sent = most_next = 0

    async def last_done() -> bool:
        nonlocal most_sent, most_next
        for worker in await _workers(api, preset):  # none until the first one starts
            most_sent = max(most_sent, worker["batch"]["sent_batches"])
            most_next = max(most_next, worker["batch"]["next_batch_tasks"])
        return await _state(api, last_id) == "succeeded"

    await _until(last_done, "the last task succeed")
    return most_sent, most_next


async def test_a_pipelining_worker_gets_its_next_full_batch_before_the_running_one_ends(
        api: httpx.AsyncClient, node: Node) -> None:
    # The first batch measures the latency; from the second on, the next batch forms
    # while one runs and, once full, is sent ahead: the SDK worker queues it.
    ids = await _backlog(api, node, "sdk-batchy", 16, {"ms": 400})
    most_sent, _ = await _watch_held(api, "sdk-batchy", ids[-1])
    done = await _results(api, ids)
    assert [t["output"]["batch_size"] for t in done] == [4] * 16
    assert most_sent == 2
    worker = await _worker_view(api, "sdk-batchy")
    assert worker["pipelines"] is True
    assert worker["batch"]["sent_batches"] == 0 and worker["batch"]["next_batch_tasks"] == 0
    # That a queued batch's latency counts from when the worker could start it (not from
    # when it was sent) is tested on a fake clock in tests/unit/test_pipeline.py.
    assert worker["batch"]["batches"] == 4 and worker["batch"]["tasks"] == 16


async def test_a_worker_that_does_not_pipeline_gets_its_next_batch_only_as_one_ends(
        api: httpx.AsyncClient, node: Node) -> None:
    ids = await _backlog(api, node, "batchy-fixed4", 16, {"ms": 400})
    most_sent, most_next = await _watch_held(api, "batchy-fixed4", ids[-1])
    done = await _results(api, ids)
    assert [t["output"]["batch_size"] for t in done] == [4] * 16
    assert most_sent == 1  # never a second run op before the first one's tasks ended
    assert most_next == 4  # the next batch formed on the node meanwhile
