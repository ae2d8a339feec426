"""gpus: N presets on a node with two simulated GPUs: placement, env, release, fallback,
and an immediate whole-GPU lease that clears a multi-GPU worker."""

from __future__ import annotations

import asyncio

import httpx

from gpulane.node import Node
from tests.conftest import eventually
from tests.integration.conftest import submit, wait_done


async def test_a_two_gpu_task_sees_both_devices_and_frees_them(api: httpx.AsyncClient,
                                                              node: Node) -> None:
    done = await wait_done(api, (await submit(api, "behave-2gpu", {"action": "env"}))["id"])
    assert done["state"] == "succeeded", done
    env = done["output"]
    assert env["CUDA_VISIBLE_DEVICES"] == "0,1"
    assert env["GPU_DEVICE"] == "cuda:0" and env["GPULANE_DEVICE"] == "gpu:0,1"
    assert done["placement"]["device"] == "gpu:0,1"

    async def freed() -> bool:  # the one-off worker exited: both devices are empty again
        return node.ledger.empty_devices() == [0, 1]
    await eventually(freed)


async def test_a_two_gpu_task_waits_for_both_devices(api: httpx.AsyncClient,
                                                     node: Node) -> None:
    # A 1 GiB slice on one GPU is enough to keep a two-GPU task queued.
    lease = (await api.post("/v1/leases", json={"holder": "t", "vram_mb": 1024})).json()
    task = await submit(api, "behave-2gpu", {"action": "ok"})
    await asyncio.sleep(0.3)
    assert (await api.get(f"/v1/tasks/{task['id']}")).json()["state"] == "queued"
    await api.delete(f"/v1/leases/{lease['id']}", params={"token": lease["token"]})
    assert (await wait_done(api, task["id"]))["state"] == "succeeded"


async def test_more_gpus_than_the_node_has(api: httpx.AsyncClient) -> None:
    done = await wait_done(api, (await submit(api, "behave-4gpu", {"action": "ok"}))["id"])
    assert done["state"] == "succeeded"
    assert done["placement"]["device"] == "cpu"
    assert done["placement"]["fallback_reason"] == "not_enough_gpus"
    r = await api.post("/v1/tasks", json={"preset": "behave-4gpu", "device": "gpu"})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == "not_enough_gpus" and err["field"] == "gpus"
    assert "gpus=4" in err["message"] and err["gpus_here"] == 2


async def test_an_immediate_two_gpu_lease_clears_a_two_gpu_worker(api: httpx.AsyncClient,
                                                                  node: Node) -> None:
    done = await wait_done(api, (await submit(api, "behave-2gpu-session",
                                              {"action": "env"}))["id"])
    assert done["output"]["CUDA_VISIBLE_DEVICES"] == "0,1"
    assert node.ledger.empty_devices() == []  # the idle session worker still holds both
    r = await api.post("/v1/leases", json={"holder": "urgent", "gpus": 2,
                                           "priority": "immediate", "wait_s": 10,
                                           "grace_s": 2})
    assert r.status_code == 201, r.text
    lease = r.json()
    assert lease["devices"] == [0, 1] and lease["cuda_visible_devices"] == "0,1"
    assert not [w for w in node.supervisor.workers.values()
                if w.preset_name == "behave-2gpu-session" and w.alive]
    await api.delete(f"/v1/leases/{lease['id']}", params={"token": lease["token"]})
    again = await wait_done(api, (await submit(api, "behave-2gpu-session",
                                               {"action": "ok"}))["id"])
    assert again["state"] == "succeeded" and again["placement"]["device"] == "gpu:0,1"
