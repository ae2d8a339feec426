"""Dynamic fallbacks on a node with simulated GPUs: a busy GPU queue (gpu_busy), an open GPU
start circuit (gpu_unavailable), a lost GPU (device_lost) and an OOM in a batch of one
(gpu_oom). Each moved task runs on the CPU with its reason on the task, a ``fallback`` event
and no attempt spent; strict tasks (device gpu, a policy without the kind) never move."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from gpulane.devices.simulated import SimulatedProvider
from gpulane.model import Task, TaskState
from gpulane.node import Node
from gpulane.scheduling.leases import LeaseState
from tests.conftest import eventually
from tests.integration.conftest import make_settings, stop_node

WORKER = Path(__file__).parent / "workers" / "fallbacky.py"


def _presets(tmp_path: Path) -> Path:
    """The test presets, written for this test (absolute worker path, a broken-file path)."""
    common = f"argv: [python, {WORKER}]\n    vram_mb: 1024\n    timeout_s: 30\n"
    text = f"""presets:
  - name: fb-busy
    {common}    fallback: [busy, error, oom]
    fallback_after_ms: 300
    batch: {{max_size: 1, adaptive: false}}
  - name: fb-nobusy
    {common}    fallback_after_ms: 300
    batch: {{max_size: 1, adaptive: false}}
  - name: fb-flaky
    {common}    env: {{FALLBACKY_BROKEN: "{tmp_path / 'broken'}"}}
    max_attempts: 10
  - name: fb-pair
    {common}    replicas: 2
  - name: fb-lost
    {common}    batch: {{max_size: 2, adaptive: false, max_wait_ms: 200}}
  - name: fb-strict
    {common}    fallback: false
"""
    path = tmp_path / "presets" / "fallback.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path.parent


@contextlib.asynccontextmanager
async def started(tmp_path: Path, gpus: str = "1x24GiB",
                  **settings: Any) -> AsyncIterator[Node]:
    node = Node(make_settings(tmp_path, simulate_gpus=gpus, presets=[str(_presets(tmp_path))],
                              examples=False, **settings))
    await node.start()
    try:
        yield node
    finally:
        await stop_node(node)


async def submit(node: Node, preset: str, inp: dict[str, Any], device: str = "auto") -> Task:
    task, _ = await node.submit(node.build_spec(preset=preset, input=inp, device=device))
    return task


async def done(node: Node, task_id: str) -> Task:
    task = await node.wait(task_id, 30)
    assert task.state.final, task
    return task


async def fallback_events(node: Node, task_id: str) -> list[dict[str, Any]]:
    return [e.data for e in await node.store.events(task_id) if e.type == "fallback"]


def where(task: Task) -> str:
    assert task.placement is not None, task
    return task.placement.device


async def test_a_gpu_backlog_moves_to_the_cpu_with_gpu_busy(tmp_path: Path) -> None:
    async with started(tmp_path) as node:
        # Both lanes warm and measured first: one task each, as long as the burst's.
        warm = [await submit(node, "fb-busy", {"ms": 150}),
                await submit(node, "fb-busy", {"ms": 150}, device="cpu")]
        assert [where(await done(node, t.id)) for t in warm] == ["gpu:0", "cpu"]
        strict = [await submit(node, "fb-busy", {"ms": 150}, device="gpu") for _ in range(3)]
        burst = [await submit(node, "fb-busy", {"ms": 150}) for _ in range(16)]
        ended = [await done(node, t.id) for t in [*strict, *burst]]
        assert all(t.state is TaskState.SUCCEEDED for t in ended)
        for t in ended[:3]:  # device gpu: never moved
            assert (where(t), t.lane, t.fallback_reason) == ("gpu:0", "gpu", None)
        moved = [t for t in ended[3:] if t.fallback_reason is not None]
        assert moved, "a 16-task backlog of 150 ms tasks past 300 ms moved nothing"
        for t in moved:
            assert (t.fallback_reason, t.lane, where(t), t.attempts) == (
                "gpu_busy", "cpu", "cpu", 1)
            [event] = await fallback_events(node, t.id)
            assert (event["reason"], event["from"], event["to"]) == ("gpu_busy", "gpu", "cpu")
            assert event["expected_wait_ms"] >= event["fallback_after_ms"] == 300
        assert node.fallbacks.totals == {"gpu_busy": len(moved)}
        # The CPU takes no more than it can start before the GPU would have: some stay.
        assert len(moved) < len(burst)


async def test_a_healthy_gpu_under_moderate_load_moves_nothing(tmp_path: Path) -> None:
    async with started(tmp_path) as node:
        await done(node, (await submit(node, "fb-busy", {"ms": 20})).id)
        for _ in range(3):  # waves of a few short tasks: the GPU drains each well in time
            wave = [await submit(node, "fb-busy", {"ms": 20}) for _ in range(4)]
            for t in wave:
                assert where(await done(node, t.id)) == "gpu:0"
        assert node.fallbacks.totals == {}
        assert node.movers.moved == 0


async def test_a_policy_without_busy_never_moves(tmp_path: Path) -> None:
    async with started(tmp_path) as node:
        await done(node, (await submit(node, "fb-nobusy", {"ms": 100}, device="cpu")).id)
        tasks = [await submit(node, "fb-nobusy", {"ms": 100}) for _ in range(8)]
        for t in tasks:
            got = await done(node, t.id)
            assert (where(got), got.fallback_reason) == ("gpu:0", None)
        assert node.fallbacks.totals == {}


async def test_an_open_gpu_circuit_moves_queued_tasks_and_a_closed_one_takes_new_ones(
        tmp_path: Path) -> None:
    (tmp_path / "broken").write_text("")
    async with started(tmp_path) as node:
        circuit = node.supervisor.circuit("fb-flaky", "gpu")
        circuit.cooldown_s = 0.5
        task = await done(node, (await submit(node, "fb-flaky", {})).id)
        assert task.state is TaskState.SUCCEEDED, task.error
        assert (task.fallback_reason, where(task)) == ("gpu_unavailable", "cpu")
        assert task.attempts == circuit.threshold + 1  # the start failures, then the CPU's
        [event] = await fallback_events(node, task.id)
        assert event["reason"] == "gpu_unavailable" and event["from"] == "gpu"
        assert event["start_failures"] == circuit.threshold
        assert "CUDA driver error" in event["last_error"]
        assert node.fallbacks.totals["gpu_unavailable"] >= 1
        # The GPU works again: once the cooldown ends, a new task probes it and runs there.
        (tmp_path / "broken").unlink()

        async def cooled() -> bool:
            return not circuit.is_open()
        await eventually(cooled)
        again = await done(node, (await submit(node, "fb-flaky", {})).id)
        assert (again.state, where(again), again.fallback_reason) == (
            TaskState.SUCCEEDED, "gpu:0", None)
        assert circuit.to_json()["state"] == "closed"
        later = await done(node, (await submit(node, "fb-flaky", {})).id)
        assert (where(later), later.fallback_reason) == ("gpu:0", None)


async def _running_on_gpu(node: Node, task_id: str) -> Task:
    async def check() -> Task | None:
        task = await node.get(task_id)
        return task if task.state is TaskState.RUNNING and where(task) == "gpu:0" else None
    return await eventually(check)


@pytest.fixture(params=["sqlite", "redis"])
def store(request: pytest.FixtureRequest) -> dict[str, Any]:
    """Settings for each store: the moves and requeues to another lane are the store's."""
    if request.param == "sqlite":
        return {}
    return {"store": request.getfixturevalue("redis_url")}


async def test_a_lost_gpu_requeues_its_tasks_unspent_and_takes_work_after_restore(
        tmp_path: Path, store: dict[str, Any]) -> None:
    async with started(tmp_path, **store) as node:
        provider = node.provider
        assert isinstance(provider, SimulatedProvider)
        # One batch of two on gpu:0: an auto task and a device gpu one.
        release = tmp_path / "released"  # once it exists, a rerun on the GPU is quick
        specs = [node.build_spec(preset="fb-lost", input={"gpu_ms": 20000,
                                                          "until": str(release)},
                                 device=device) for device in ("auto", "gpu")]
        auto, strict = [t for t, _ in await node.submit_many(specs)]
        for t in (auto, strict):
            await _running_on_gpu(node, t.id)
        lease = await node.acquire_lease(
            holder="svc", vram_mb=1024, gpus=0, device=0, priority=50, ttl_s=60,
            preemptible=True, grace_s=5, wait_s=5)

        provider.lose(0)
        await node.check_devices()
        assert node.ledger.fits(0) == [] and node.ledger.gpus[0].lost
        assert node.leases.get(lease["id"]).state is LeaseState.REVOKED
        moved = await done(node, auto.id)  # the auto task reruns on the CPU, at once
        assert (moved.state, where(moved), moved.fallback_reason, moved.attempts) == (
            TaskState.SUCCEEDED, "cpu", "device_lost", 1)
        [event] = await fallback_events(node, auto.id)
        assert (event["reason"], event["from"], event["to"]) == ("device_lost", "gpu:0", "cpu")

        async def requeued() -> Task | None:  # device gpu: back in the GPU lane, unspent
            task = await node.get(strict.id)
            return task if task.state is TaskState.QUEUED else None
        back = await eventually(requeued)
        assert (back.lane, back.attempts, back.fallback_reason) == ("gpu", 0, None)
        errors = [e.data for e in await node.store.events(strict.id) if e.type == "error"]
        assert errors and errors[-1]["kind"] == "device_lost"

        async def gone() -> bool:
            return not any(w.device.kind == "gpu" for w in node.supervisor.workers.values())
        await eventually(gone)
        # Every GPU of the node lost, no other node: a new auto task goes to the CPU lane at
        # submit (the router reads the lost GPUs), not through the GPU lane and the mover.
        new = await submit(node, "fb-lost", {"gpu_ms": 20000})
        assert (new.lane, new.fallback_reason) == ("cpu", "device_lost")
        new = await done(node, new.id)
        assert (where(new), new.fallback_reason) == ("cpu", "device_lost")
        assert await fallback_events(node, new.id) == []  # never moved
        assert node.fallbacks.totals == {"device_lost": 2}
        assert (await node.get(strict.id)).state is TaskState.QUEUED  # waits for a GPU

        release.write_text("")
        provider.restore(0)
        await node.check_devices()
        assert not node.ledger.gpus[0].lost
        ran = await done(node, strict.id)
        assert (ran.state, where(ran), ran.attempts) == (TaskState.SUCCEEDED, "gpu:0", 1)
        fresh = await done(node, (await submit(node, "fb-lost", {})).id)
        assert (where(fresh), fresh.fallback_reason) == ("gpu:0", None)


async def test_an_oom_in_a_batch_of_one_reruns_on_the_cpu(
        tmp_path: Path, store: dict[str, Any]) -> None:
    async with started(tmp_path, **store) as node:
        task = await done(node, (await submit(node, "fb-pair", {"oom_on_gpu": True})).id)
        assert (task.state, where(task), task.fallback_reason, task.attempts) == (
            TaskState.SUCCEEDED, "cpu", "gpu_oom", 1)
        assert task.output["device"] == "cpu"
        events = await node.store.events(task.id)
        assert [e.data["kind"] for e in events if e.type == "error"] == ["oom"]
        [fb] = [e.data for e in events if e.type == "fallback"]
        assert (fb["reason"], fb["from"], fb["to"], fb["batch_size"]) == (
            "gpu_oom", "gpu:0", "cpu", 1)
        assert node.fallbacks.totals == {"gpu_oom": 1}


@pytest.mark.parametrize(("preset", "device"), [("fb-pair", "gpu"), ("fb-strict", "auto")])
async def test_an_oom_that_may_not_fall_back_fails_as_before(
        tmp_path: Path, preset: str, device: str) -> None:
    async with started(tmp_path) as node:
        task = await done(node, (await submit(node, preset, {"oom_on_gpu": True},
                                              device=device)).id)
        assert (task.state, where(task), task.fallback_reason) == (
            TaskState.FAILED, "gpu:0", None)
        assert task.error is not None and task.error["kind"] == "oom"
        assert node.fallbacks.totals == {}
