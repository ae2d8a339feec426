"""A node's face to the fleet, on one node: GET /v1/nodes, the fleet-wide GET /v1/gpus, the
drain body (another node, exit), and a drain that exits with running work requeued unspent."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx

from gpulane.api.app import create_app
from gpulane.model import Task, TaskState
from gpulane.node import Node
from gpulane.store import open_store
from tests.conftest import eventually
from tests.integration.conftest import make_settings, stop_node


def _client(node: Node) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(
        app=create_app(node, manage_node=False)), base_url="http://t")


async def test_nodes_and_gpus_show_the_fleet(tmp_path: Path) -> None:
    node = Node(make_settings(tmp_path, node_name="a", advertise_url="http://a.example:8765"))
    await node.start()
    try:
        async with _client(node) as api:
            r = await api.get("/v1/nodes")
            assert r.status_code == 200
            [me] = r.json()["nodes"]
            assert me["name"] == "a" and me["url"] == "http://a.example:8765"
            assert me["draining"] is False and me["running"] == 0
            assert [d["total_vram_mb"] for d in me["devices"]] == [24576, 24576]
            assert all(d["schedulable_free_vram_mb"] == 24576 for d in me["devices"])
            assert me["heartbeat_age_s"] >= 0
            gpus = (await api.get("/v1/gpus")).json()
            # This node's keys stay as they were; the fleet is added beside them.
            assert gpus["node"] == "a" and len(gpus["devices"]) == 2 and "cpu" in gpus
            assert [n["name"] for n in gpus["nodes"]] == ["a"]
            assert gpus["nodes"][0]["cpu"]["in_use"] == 0
    finally:
        await stop_node(node)


async def test_a_warm_worker_shows_in_the_registry(tmp_path: Path) -> None:
    node = Node(make_settings(tmp_path))
    await node.start()
    try:
        task, _ = await node.submit(node.build_spec(preset="sleep", input={"ms": 1}))
        assert (await node.wait(task.id, 10)).state is TaskState.SUCCEEDED
        info = await eventually(lambda: _warm(node))
        assert info == ["sleep/gpu"]
    finally:
        await stop_node(node)


async def _warm(node: Node) -> list[str]:
    return node.node_info().warm


async def test_the_drain_body_names_a_node_and_checks_its_fields(tmp_path: Path) -> None:
    node = Node(make_settings(tmp_path, node_name="a"))
    await node.start()
    try:
        async with _client(node) as api:
            r = await api.post("/v1/admin/drain", json={"node": "nope"})
            assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_node"
            r = await api.post("/v1/admin/drain", json={"grace_s": -1})
            assert r.status_code == 422
            assert r.json()["error"]["field"] == "grace_s"
            r = await api.post("/v1/admin/drain", json={"node": "a"})
            assert r.status_code == 200 and r.json()["draining"] is True
            r = await api.post("/v1/admin/resume", json={"node": "a"})
            assert r.status_code == 200 and r.json()["draining"] is False
    finally:
        await stop_node(node)


async def test_drain_and_exit_requeues_running_work_unspent(tmp_path: Path) -> None:
    # The worker is killed soon after its stop is asked: the test need not wait out a grace.
    node = Node(make_settings(tmp_path, node_name="a", worker_stop_grace_s=0.2))
    exited = asyncio.Event()
    node.drains.on_exit = exited.set
    await node.start()
    stopped = False
    try:
        # A task that outlives the grace: it is still running when the node exits.
        task, _ = await node.submit(node.build_spec(preset="sleep", input={"ms": 60_000}))
        await eventually(lambda: _state(node, task.id, TaskState.RUNNING))
        async with _client(node) as api:
            r = await api.post("/v1/admin/drain", json={"exit": True, "grace_s": 0.2})
            assert r.status_code == 200 and r.json()["draining"] is True
            r = await api.post("/v1/tasks", json={"preset": "sleep", "input": {"ms": 1}})
            assert r.status_code == 503 and r.json()["error"]["code"] == "draining"
            r = await api.post("/v1/admin/resume")
            assert r.status_code == 409 and r.json()["error"]["code"] == "exiting"
        await asyncio.wait_for(exited.wait(), 10)
        await stop_node(node)
        stopped = True
        back = await _stored(tmp_path, task.id)
        assert back is not None and back.state is TaskState.QUEUED and back.attempts == 0
        assert node.fleet_view.others == []
    finally:
        if not stopped:
            await stop_node(node)


async def test_drain_and_exit_waits_for_running_work_within_the_grace(tmp_path: Path) -> None:
    node = Node(make_settings(tmp_path))
    exited = asyncio.Event()
    node.drains.on_exit = exited.set
    await node.start()
    try:
        task, _ = await node.submit(node.build_spec(preset="sleep", input={"ms": 300}))
        await eventually(lambda: _state(node, task.id, TaskState.RUNNING))
        node.drain(exit=True, grace_s=60)
        await asyncio.wait_for(exited.wait(), 30)
        assert (await node.get(task.id)).state is TaskState.SUCCEEDED
    finally:
        await stop_node(node)


async def _state(node: Node, task_id: str, state: TaskState) -> bool:
    return (await node.get(task_id)).state is state


async def _stored(tmp_path: Path, task_id: str) -> Task | None:
    """A task as the stopped node's database holds it."""
    store = open_store(make_settings(tmp_path).store_url)
    await store.open()
    try:
        return await store.get(task_id)
    finally:
        await store.close()
