"""Scheduling in a fleet, on one node: warm goes first (a head younger than the window is left
to the node that has its preset warm), and a node without GPUs claims nothing of a GPU lane."""

from __future__ import annotations

from pathlib import Path

from gpulane.fleet import NodeInfo
from gpulane.model import DeviceWish, TaskState
from gpulane.node import Node
from gpulane.scheduling.router import GPU_LANE
from tests.integration.conftest import make_settings, stop_node


async def _queued(node: Node, device: str = "auto") -> str:
    task, _ = await node.submit(node.build_spec(preset="sleep", input={"ms": 1}, device=device))
    return task.id


async def test_a_young_head_is_left_to_the_node_with_it_warm(tmp_path: Path) -> None:
    node = Node(make_settings(tmp_path, warm_window_s=3600))
    await node.start()
    try:
        node.scheduler.paused = True  # passes are run by hand below
        node.scheduler.warm_elsewhere = lambda preset, lane: preset == "sleep"
        node.scheduler.warm_window_s = 3600
        task_id = await _queued(node)
        node.scheduler.paused = False
        assert await node.scheduler.run_pass() == 0
        assert (await node.get(task_id)).state is TaskState.QUEUED
        assert node.supervisor.session_workers("sleep", GPU_LANE) == []
        assert node.scheduler._window_wake is not None  # a pass looks again at its end
        # Nobody has it warm any more: this node starts a worker of its own.
        node.scheduler.warm_elsewhere = lambda preset, lane: False
        assert await node.scheduler.run_pass() == 1
        assert (await node.wait(task_id, 10)).state is TaskState.SUCCEEDED
    finally:
        await stop_node(node)


async def test_a_head_older_than_the_window_starts_a_worker_here(tmp_path: Path) -> None:
    node = Node(make_settings(tmp_path))
    await node.start()
    try:
        node.scheduler.paused = True
        node.scheduler.warm_elsewhere = lambda preset, lane: True
        node.scheduler.warm_window_s = 1e-9  # every head is older than this
        task_id = await _queued(node)
        node.scheduler.paused = False
        assert await node.scheduler.run_pass() == 1
        assert (await node.wait(task_id, 10)).state is TaskState.SUCCEEDED
    finally:
        await stop_node(node)


async def test_a_node_without_gpus_claims_nothing_of_a_gpu_lane(tmp_path: Path) -> None:
    node = Node(make_settings(tmp_path, simulate_gpus="none"))
    await node.start()
    try:
        assert node.ledger.gpus == {}
        # As if another node had a 24 GiB GPU: auto goes to the GPU lane, for that node.
        spec = node.build_spec(preset="sleep", input={"ms": 1})
        assert spec.lane == "cpu"
        node.fleet_view.others = [_gpu_node()]
        spec = node.build_spec(preset="sleep", input={"ms": 1})
        assert spec.lane == GPU_LANE and spec.device_wish is DeviceWish.AUTO
        task, _ = await node.submit(spec)
        assert await node.scheduler.run_pass() == 0
        assert (await node.get(task.id)).state is TaskState.QUEUED
    finally:
        await stop_node(node)


def _gpu_node() -> NodeInfo:
    return NodeInfo(name="other", url=None, started_at=0.0, heartbeat_at=0.0,
                    devices=[{"index": 0, "total_vram_mb": 24576}])
