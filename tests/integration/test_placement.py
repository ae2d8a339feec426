"""Placement: VRAM is never over-committed, idle workers unload, idle ones make room."""

from __future__ import annotations

import asyncio

import httpx

from gpulane.node import Node
from tests.conftest import eventually
from tests.integration.conftest import submit, wait_done


def _declared(node: Node) -> list[int]:
    return [acct.declared_mb for acct in node.ledger.gpus.values()]


async def test_never_over_commits_a_device(api: httpx.AsyncClient, node: Node) -> None:
    # 14000 MB one-offs on 2 x 24576 MB: at most one per GPU at any moment.
    ids = [(await submit(api, "big-oneoff", {"action": "slow", "s": 0.3}))["id"]
           for _ in range(5)]
    peak = [0, 0]
    pending = set(ids)
    while pending:
        for i, used in enumerate(_declared(node)):
            assert used <= node.ledger.gpus[i].total_vram_mb
            peak[i] = max(peak[i], used)
        done = await asyncio.gather(*(api.get(f"/v1/tasks/{t}") for t in pending))
        pending = {r.json()["id"] for r in done if r.json()["state"] in ("queued", "running")}
        await asyncio.sleep(0.02)
    assert peak == [14000, 14000]  # both GPUs were used, each by one task at a time
    results = [await wait_done(api, t) for t in ids]
    assert all(r["state"] == "succeeded" for r in results)


async def test_idle_session_worker_unloads_after_idle_unload_s(api: httpx.AsyncClient,
                                                               node: Node) -> None:
    await wait_done(api, (await submit(api, "behave-brief", {"action": "ok"}))["id"])
    assert any(w.preset_name == "behave-brief" for w in node.supervisor.workers.values())

    async def unloaded() -> bool:
        return not any(w.preset_name == "behave-brief"
                       for w in node.supervisor.workers.values())
    await eventually(unloaded, timeout=10)
    assert sum(_declared(node)) == 0 or all(
        not h.holder.startswith("behave-brief") for a in node.ledger.gpus.values()
        for h in a.holdings.values())


async def test_idle_workers_are_unloaded_to_make_room(api: httpx.AsyncClient,
                                                      node: Node) -> None:
    # A warm, idle 1024 MB worker plus outside holders leave < 20000 MB on both GPUs;
    # only unloading that idle worker makes room for the 20000 MB preset.
    first = await wait_done(api, (await submit(api, "behave", {"action": "ok"}))["id"])
    warm_gpu = int(first["placement"]["device"].split(":")[1])
    other = 1 - warm_gpu
    node.ledger.acquire("test-filler-a", warm_gpu, 4000)
    node.ledger.acquire("test-filler-b", other, 5000)
    try:
        done = await wait_done(api, (await submit(api, "big", {"action": "ok"}))["id"])
        assert done["state"] == "succeeded"
        assert done["placement"]["device"] == f"gpu:{warm_gpu}"
        assert not any(w.preset_name == "behave" for w in node.supervisor.workers.values())
    finally:
        node.ledger.release("test-filler-a")
        node.ledger.release("test-filler-b")


async def test_cpu_only_node_falls_back_with_no_gpu_reason(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from gpulane.api.app import create_app
    from tests.integration.conftest import make_settings, stop_node

    node = Node(make_settings(tmp_path, simulate_gpus="none"))
    await node.start()
    try:
        app = create_app(node, manage_node=False)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                     base_url="http://t") as api:
            done = await wait_done(api, (await submit(api, "sleep", {"ms": 0}))["id"])
            assert done["placement"]["device"] == "cpu"
            assert done["placement"]["fallback_reason"] == "no_gpu"
            r = await api.post("/v1/tasks", json={"preset": "big"})
            assert r.status_code == 400 and r.json()["error"]["code"] == "no_gpu"
    finally:
        await stop_node(node)
