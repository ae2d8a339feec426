"""Poison isolation through a running node (issue 11's trial): 16 tasks in one bulk, one of
which kills its worker whatever batch it is in. Its 15 batch-mates succeed on their first
attempt, even with ``max_attempts: 1``; the poison alone spends attempts and ends ``failed``
with kind ``worker_died`` and the worker's last stderr lines; the preset's crash ceiling lifts
once it is resolved. Fixed batching (one batch of 16) and adaptive alike."""

from __future__ import annotations

import math
from typing import Any

import httpx
import pytest

from gpulane.node import Node
from tests.integration.conftest import wait_done

TRIAL_TASKS = 16
"""The issue's trial: one bulk of 16, as big as the presets' max_size."""
POISON_AT = 7
"""Where the poison sits in the bulk: inside the first halves, not at an edge."""


@pytest.mark.parametrize(("preset", "max_attempts"), [
    ("batchy-poison-fixed", 1), ("batchy-poison-fixed3", 3),
    ("batchy-poison-adaptive", 1), ("batchy-poison-adaptive3", 3)])
async def test_a_poison_input_dies_alone_and_its_batch_mates_succeed(
        api: httpx.AsyncClient, node: Node, preset: str, max_attempts: int) -> None:
    inputs: list[dict[str, Any]] = [{"n": i, "crash": i == POISON_AT}
                                    for i in range(TRIAL_TASKS)]
    await node.scheduler.stop()  # one backlog: a fixed batcher takes all 16 in one batch
    r = await api.post("/v1/tasks/bulk", json={"tasks": [
        {"preset": preset, "input": inp} for inp in inputs]})
    assert r.status_code == 202, r.text
    ids = [t["id"] for t in r.json()["tasks"]]
    node.scheduler.start()
    done = [await wait_done(api, tid, wait=60) for tid in ids]

    poison = done.pop(POISON_AT)
    assert poison["state"] == "failed" and poison["attempts"] == max_attempts, poison
    assert poison["error"]["kind"] == "worker_died"
    assert "Segmentation fault" in poison["error"]["message"]  # the worker's stderr tail
    assert [t["state"] for t in done] == ["succeeded"] * (TRIAL_TASKS - 1)
    assert all(t["attempts"] == 1 for t in done), [t["attempts"] for t in done]

    ceiling = node.supervisor.pipeline.crash_ceiling(preset)
    # Halving ends: at most log2(16) crashes that spend nothing, then one per attempt.
    assert 1 <= ceiling.crashes - max_attempts <= math.log2(TRIAL_TASKS)
    assert ceiling.cap is None and not ceiling.suspects  # lifted: the poison is resolved


async def test_batch_mates_of_a_poison_get_their_attempts_back_in_their_events(
        api: httpx.AsyncClient, node: Node) -> None:
    # What a client reading a batch-mate's event stream sees: the crash, and that it runs
    # again without an attempt spent.
    await node.scheduler.stop()
    r = await api.post("/v1/tasks/bulk", json={"tasks": [
        {"preset": "batchy-poison-fixed", "input": {"crash": i == 0}} for i in range(4)]})
    ids = [t["id"] for t in r.json()["tasks"]]
    node.scheduler.start()
    mate = await wait_done(api, ids[1], wait=60)
    assert mate["state"] == "succeeded"
    events = (await api.get(f"/v1/tasks/{ids[1]}/events")).text
    assert "worker_died" in events and "no attempt spent" in events


async def test_batch_mates_of_a_task_killed_for_its_timeout_run_again_unspent(
        api: httpx.AsyncClient, node: Node) -> None:
    # behave-batch: one batch of 8, run item by item, timeout_s 1, max_attempts 1. The hang
    # is failed for its timeout and its worker killed; the two after it had not run, and
    # succeed on the next worker without an attempt spent.
    await node.scheduler.stop()
    r = await api.post("/v1/tasks/bulk", json={"tasks": [
        {"preset": "behave-batch", "input": {"action": action}}
        for action in ("ok", "hang", "ok", "ok")]})
    ids = [t["id"] for t in r.json()["tasks"]]
    node.scheduler.start()
    done = [await wait_done(api, tid, wait=60) for tid in ids]
    assert [t["state"] for t in done] == ["succeeded", "failed", "succeeded", "succeeded"]
    assert done[1]["error"]["kind"] == "timeout"
    assert [t["attempts"] for t in done] == [1, 1, 1, 1]
