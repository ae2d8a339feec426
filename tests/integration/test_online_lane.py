"""The online lane end to end on a real node: a ``durable: false`` preset (the example
``sleep-online``) through HTTP, SSE and both SDKs, kept out of the SQLite file unless it fails
or outlives the spill window, and counted by GET /v1/status and /metrics like any other."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx

from gpulane.client import AsyncClient, Client
from gpulane.errors import TaskFailedError
from gpulane.model import TaskState
from gpulane.node import Node
from gpulane.store.tiered import TieredStore
from tests.conftest import eventually
from tests.integration.conftest import node_with_api, serve_live, wait_done


def tiers(node: Node) -> TieredStore:
    assert isinstance(node.store, TieredStore)
    return node.store


async def test_an_online_task_runs_with_events_and_sse_and_is_never_written(
        tmp_path: Path) -> None:
    async with node_with_api(tmp_path) as (node, api), serve_live(node) as url:
        r = await api.post("/v1/tasks?wait=20", json={"preset": "sleep-online",
                                                      "input": {"ms": 1}})
        assert r.status_code == 200, r.text
        task = r.json()
        assert task["state"] == "succeeded" and task["output"] == {"slept_ms": 1}
        assert (await api.get(f"/v1/tasks/{task['id']}")).json()["state"] == "succeeded"
        assert await tiers(node).durable.get(task["id"]) is None  # in memory only
        async with httpx.AsyncClient(base_url=url, timeout=20) as http:
            sse = (await http.get(f"/v1/tasks/{task['id']}/events")).text
        assert "event: result" in sse and '"succeeded"' in sse and sse.count("id: ") >= 4

        def sync_sdk() -> dict[str, Any]:
            with Client(url) as c:
                out = c.run("sleep-online", {"ms": 2})
                try:
                    c.run("sleep-online", {"ms": -1})
                except TaskFailedError as exc:
                    return {"ok": out, "failed": exc.task}
                raise AssertionError("a bad input did not fail")

        got = await asyncio.to_thread(sync_sdk)
        assert got["ok"]["output"] == {"slept_ms": 2}
        failed = got["failed"]
        # The failed one is a dead letter in the store, with its events; the other is not.
        kept = await tiers(node).durable.get(failed["id"])
        assert kept is not None and kept.state is TaskState.FAILED
        assert [e.type for e in await tiers(node).durable.events(failed["id"])][-1] == "state"
        assert await tiers(node).durable.get(got["ok"]["id"]) is None
        listed = (await api.get("/v1/tasks", params={"state": "failed"})).json()
        assert failed["id"] in [t["id"] for t in listed["tasks"]]

        async with AsyncClient(url) as ac:
            many = await asyncio.gather(*(ac.run("sleep-online", {"ms": 1}) for _ in range(8)))
        assert {t["state"] for t in many} == {"succeeded"}


async def test_status_and_metrics_count_online_tasks(tmp_path: Path) -> None:
    async with node_with_api(tmp_path, paused=True) as (node, api):
        ids = [(await api.post("/v1/tasks", json={"preset": "sleep-online",
                                                  "input": {"ms": 1}})).json()["id"]
               for _ in range(3)]
        assert all(i in tiers(node).memory for i in ids)
        body = (await api.get("/v1/status")).json()
        [lane] = [x for x in body["lanes"] if (x["preset"], x["lane"]) == ("sleep-online",
                                                                           "gpu")]
        assert lane["queued"] == 3 and lane["oldest_wait_s"] is not None
        assert body["queued"] >= 3
        assert (await api.get("/readyz")).json()["queued"] == 3
        metrics = (await api.get("/metrics")).text
        assert any(line.startswith("gpulane_queue_depth{") and 'preset="sleep-online"' in line
                   and 'lane="gpu"' in line and line.endswith(" 3.0")
                   for line in metrics.splitlines()), metrics
        # What a crash would lose now, and what was written to the store (nothing yet).
        assert any(line.startswith("gpulane_online_tasks{") and line.endswith(" 3.0")
                   for line in metrics.splitlines()), metrics
        assert any(line.startswith("gpulane_online_spilled_total{") and 'reason="window"' in line
                   and line.endswith(" 0.0") for line in metrics.splitlines()), metrics
        cancelled = (await api.post(f"/v1/tasks/{ids[0]}/cancel")).json()
        assert cancelled["state"] == "cancelled"
        node.scheduler.paused = False
        node.scheduler.wake()
        for tid in ids[1:]:
            assert (await wait_done(api, tid))["state"] == "succeeded"


async def test_a_task_that_outlives_the_window_lands_in_the_store(tmp_path: Path) -> None:
    async with node_with_api(tmp_path, online_spill_after_s=0.2) as (node, api):
        tid = (await api.post("/v1/tasks", json={"preset": "sleep-online",
                                                 "input": {"ms": 1500}})).json()["id"]

        async def spilled() -> bool:
            return await tiers(node).durable.get(tid) is not None

        await eventually(spilled)
        assert tid not in tiers(node).memory
        done = await wait_done(api, tid)
        assert done["state"] == "succeeded" and done["output"] == {"slept_ms": 1500}
        kept = await tiers(node).durable.get(tid)
        assert kept is not None and kept.state is TaskState.SUCCEEDED  # finished on disk


async def test_idempotency_key_over_http(tmp_path: Path) -> None:
    async with node_with_api(tmp_path, paused=True) as (_node, api):
        body = {"preset": "sleep-online", "input": {"ms": 1}}
        a = await api.post("/v1/tasks", json=body, headers={"Idempotency-Key": "k1"})
        b = await api.post("/v1/tasks", json=body, headers={"Idempotency-Key": "k1"})
        assert a.status_code == 202 and b.status_code in (200, 202)
        assert a.json()["id"] == b.json()["id"]
        c = await api.post("/v1/tasks", json={**body, "input": {"ms": 2}},
                           headers={"Idempotency-Key": "k1"})
        assert c.status_code == 409 and c.json()["error"]["field"] == "Idempotency-Key"


async def test_the_lane_off_keeps_every_task_in_the_store(tmp_path: Path) -> None:
    async with node_with_api(tmp_path, online_max_tasks=0) as (node, api):
        assert not isinstance(node.store, TieredStore)
        r = await api.post("/v1/tasks?wait=20", json={"preset": "sleep-online",
                                                      "input": {"ms": 1}})
        assert r.json()["state"] == "succeeded"


async def test_bulk_and_many_results_of_online_tasks(tmp_path: Path) -> None:
    async with node_with_api(tmp_path) as (node, api):
        r = await api.post("/v1/tasks/bulk", params={"wait": 20}, json={"tasks": [
            {"preset": "sleep-online", "input": {"ms": 1}},
            {"preset": "sleep", "input": {"ms": 1}},
            {"preset": "sleep-online", "input": {"ms": -1}}]})
        assert r.status_code == 200, r.text
        tasks = r.json()["tasks"]
        assert [t["state"] for t in tasks] == ["succeeded", "succeeded", "failed"]
        ids = [t["id"] for t in tasks]
        assert ids[0] in tiers(node).memory and ids[2] not in tiers(node).memory
        got = await api.post("/v1/tasks/results", params={"wait": 5},
                             json={"ids": [*ids, "0" * 24]})
        assert got.status_code == 200, got.text
        body = got.json()
        assert [t["id"] for t in body["tasks"]] == ids
        assert body["pending"] == [] and body["missing"] == ["0" * 24]
