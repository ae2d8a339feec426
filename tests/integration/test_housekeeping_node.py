"""Housekeeping on a running node: a task left running by a node that died is reaped after
the claim TTL and run here; finished work past the retention period is purged and then
answers 404; the notifier and lease table are back to idle afterwards.

Cutoffs count on the housekeeper's clock, moved by the test; rounds are run by hand.
"""

from __future__ import annotations

import time

import httpx

from gpulane.model import TaskState
from gpulane.node import Node
from tests.conftest import eventually


async def test_a_dead_nodes_running_task_is_reaped_and_run_here(node: Node) -> None:
    spec = node.build_spec(preset="sleep", input={"ms": 1})
    task, _ = await node.store.submit(spec)
    # Claimed by "ghost", a node that then died: nobody will ever heartbeat it.
    [lost] = await node.store.claim(spec.preset, spec.lane, 1, "ghost", "gpu:0")
    assert lost.id == task.id and lost.placement is not None
    hk = node.housekeeper
    assert await hk.beat() == []  # within its claim TTL: left alone
    hk.clock = lambda: time.time() + hk.claim_ttl_s + 1
    [reaped] = await hk.beat()
    assert reaped.id == task.id and reaped.error["code"] == "claim_expired"  # type: ignore[index]

    async def succeeded() -> bool:
        got = await node.store.get(task.id)
        return got is not None and got.state is TaskState.SUCCEEDED

    await eventually(succeeded)
    done = await node.store.get(task.id)
    assert done is not None and done.attempts == 2 and done.token == 2
    assert done.placement is not None and done.placement.node == node.name
    assert node.housekeeper.view()["reaper"]["reaped_total"] == 1


async def test_retention_purges_finished_tasks_on_a_live_node(
        node: Node, api: httpx.AsyncClient) -> None:
    ids = []
    for i in range(5):
        r = await api.post("/v1/tasks", json={"preset": "sleep", "input": {"ms": 1}},
                           headers={"Idempotency-Key": f"key-{i}"})
        assert r.status_code == 202, r.text
        ids.append(r.json()["id"])
    for tid in ids:
        r = await api.get(f"/v1/tasks/{tid}/result", params={"wait": 30})
        assert r.json()["state"] == "succeeded"
    hk = node.housekeeper
    assert (await hk.purge())["tasks"] == 0  # type: ignore[index]
    hk.clock = lambda: time.time() + hk.retain_s + 1
    purged = await hk.purge()
    assert purged is not None and purged["tasks"] == 5 and purged["keys"] == 5
    for tid in ids:
        assert (await api.get(f"/v1/tasks/{tid}")).status_code == 404
    page = (await api.get("/v1/tasks")).json()
    assert page["tasks"] == []
    # The key names no task any more: the same submit makes a new one.
    r = await api.post("/v1/tasks", json={"preset": "sleep", "input": {"ms": 1}},
                       headers={"Idempotency-Key": "key-0"})
    assert r.status_code == 202 and r.json()["id"] not in ids
    await api.get(f"/v1/tasks/{r.json()['id']}/result", params={"wait": 30})
    assert len(node.store.notifier) == 0
    assert node.leases.table_size()["holding"] == 0
