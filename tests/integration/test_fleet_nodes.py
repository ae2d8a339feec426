"""Two in-process nodes on one redis-server: the fleet in GET /v1/nodes and /v1/gpus, an auto
task submitted to a node without GPUs runs on the other's GPU, warm first, and a drain to
exit asked through the other node (running work requeued unspent, leases ended, the node
gone from the registry)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx

from gpulane.api.app import create_app
from gpulane.model import TaskState
from gpulane.node import Node
from tests.conftest import eventually
from tests.integration.conftest import make_settings, stop_node


@asynccontextmanager
async def fleet(tmp_path: Path, redis_url: str, *specs: dict[str, Any]
                ) -> AsyncIterator[list[Node]]:
    """Nodes started in order on one Redis (each spec: settings overrides, node_name in it)."""
    nodes: list[Node] = []
    try:
        for spec in specs:
            node = Node(make_settings(tmp_path / spec["node_name"], store=redis_url,
                                      worker_stop_grace_s=0.2, **spec))
            await node.start()
            nodes.append(node)
        for node in nodes:  # each sees the others now, not at its next device poll
            await node.fleet_view.refresh()
        yield nodes
    finally:
        for node in reversed(nodes):
            await stop_node(node)


def _client(node: Node) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(
        app=create_app(node, manage_node=False)), base_url="http://t")


async def test_every_node_shows_the_whole_fleet(tmp_path: Path, redis_url: str) -> None:
    async with fleet(tmp_path, redis_url, {"node_name": "a", "simulate_gpus": "none"},
                     {"node_name": "b", "simulate_gpus": "2x24GiB"}) as (a, _b):
        api = _client(a)
        nodes = (await api.get("/v1/nodes")).json()["nodes"]
        assert [(n["name"], len(n["devices"])) for n in nodes] == [("a", 0), ("b", 2)]
        gpus = (await api.get("/v1/gpus")).json()
        assert gpus["node"] == "a" and gpus["devices"] == []
        assert [n["name"] for n in gpus["nodes"]] == ["a", "b"]
        assert [d["total_vram_mb"] for d in gpus["nodes"][1]["devices"]] == [24576, 24576]
        await api.aclose()


async def test_auto_on_a_gpu_less_node_runs_on_the_other_nodes_gpu(tmp_path: Path,
                                                                  redis_url: str) -> None:
    async with fleet(tmp_path, redis_url, {"node_name": "a", "simulate_gpus": "none"},
                     {"node_name": "b", "simulate_gpus": "2x24GiB"}) as (a, _b):
        task, _ = await a.submit(a.build_spec(preset="sleep", input={"ms": 1}))
        done = await a.wait(task.id, 20)
        assert done.state is TaskState.SUCCEEDED
        assert done.placement is not None and done.placement.node == "b"
        assert done.placement.device.startswith("gpu") and done.placement.fallback_reason is None


async def test_a_node_with_the_preset_warm_gets_the_task(tmp_path: Path,
                                                         redis_url: str) -> None:
    async with fleet(tmp_path, redis_url, {"node_name": "a", "warm_window_s": 3600},
                     {"node_name": "b"}) as (a, b):
        a.scheduler.paused = True  # b's first task is b's: it warms b's worker
        first, _ = await b.submit(b.build_spec(preset="sleep", input={"ms": 1}))
        assert (await b.wait(first.id, 20)).state is TaskState.SUCCEEDED
        a.scheduler.paused = False
        await eventually(lambda: _warm(b))
        await b.housekeeper.announce()  # its registry entry now says sleep/gpu is warm
        await a.fleet_view.refresh()
        assert a.fleet_view.warm_elsewhere("sleep", "gpu")
        task, _ = await a.submit(a.build_spec(preset="sleep", input={"ms": 1}))
        done = await a.wait(task.id, 20)
        assert done.placement is not None and done.placement.node == "b"
        assert a.supervisor.session_workers("sleep", "gpu") == []  # a started none


async def _warm(node: Node) -> bool:
    return "sleep/gpu" in node.node_info().warm


async def test_a_drain_to_exit_asked_through_another_node(tmp_path: Path,
                                                          redis_url: str) -> None:
    async with fleet(tmp_path, redis_url, {"node_name": "a"}, {"node_name": "b"}) as (a, b):
        a.scheduler.paused = True  # what b hands back stays queued, to be looked at
        exited = asyncio.Event()
        b.drains.on_exit = exited.set
        task, _ = await b.submit(b.build_spec(preset="sleep", input={"ms": 60_000}))
        await eventually(lambda: _running(b, task.id))
        lease = await b.acquire_lease(holder="svc", vram_mb=1024, gpus=0, device=None,
                                      priority=50, ttl_s=60, preemptible=False, grace_s=1,
                                      wait_s=0)
        async with _client(a) as api:
            r = await api.post("/v1/admin/drain", json={"node": "b", "exit": True,
                                                        "grace_s": 0.2})
            assert r.status_code == 200, r.text
            assert r.json()["node"] == "b" and r.json()["draining"] is True
        await asyncio.wait_for(exited.wait(), 10)
        await b.stop()
        back = await a.get(task.id)
        assert back.state is TaskState.QUEUED and back.attempts == 0
        assert [n.name for n in await a.fleet.nodes()] == ["a"]
        ended = await a.lease(lease["id"])
        assert ended["state"] not in ("held", "waiting"), ended


async def _running(node: Node, task_id: str) -> bool:
    return (await node.get(task_id)).state is TaskState.RUNNING
