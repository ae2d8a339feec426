"""Leases over HTTP: grant, wait, renew, release, expire, preempt, resume, bad input."""

from __future__ import annotations

import asyncio

import httpx

from gpulane.node import Node
from tests.conftest import eventually
from tests.integration.conftest import submit, wait_done


async def _lease(api: httpx.AsyncClient, **body: object) -> httpx.Response:
    return await api.post("/v1/leases", json={"holder": "ml-service", **body})


async def test_grant_renew_release(api: httpx.AsyncClient, node: Node) -> None:
    r = await _lease(api, vram_mb=4096, ttl_s=5)
    assert r.status_code == 201, r.text
    lease = r.json()
    assert lease["state"] == "granted" and lease["cuda_visible_devices"] == str(lease["device"])
    assert lease["uuid"].startswith("GPU-")
    assert node.ledger.gpus[lease["device"]].declared_mb == 4096
    renewed = (await api.post(f"/v1/leases/{lease['id']}/renew",
                              json={"token": lease["token"]})).json()
    assert renewed["expires_at"] >= lease["expires_at"]
    gone = await api.delete(f"/v1/leases/{lease['id']}", params={"token": lease["token"]})
    assert gone.json()["state"] == "released"
    assert node.ledger.gpus[lease["device"]].declared_mb == 0
    stale = await api.post(f"/v1/leases/{lease['id']}/renew", json={"token": lease["token"]})
    assert stale.status_code == 409 and stale.json()["error"]["code"] == "stale_token"


async def test_vram_as_a_size_string(api: httpx.AsyncClient) -> None:
    r = await _lease(api, vram_mb="2GiB")
    assert r.status_code == 201 and r.json()["vram_mb"] == 2048


async def test_waits_then_times_out_with_holders(api: httpx.AsyncClient) -> None:
    a = (await _lease(api, gpus=2, ttl_s=30)).json()
    r = await _lease(api, vram_mb=1024, wait_s=0.3)
    assert r.status_code == 408
    holders = r.json()["error"]["holders"]
    assert {h["holder"] for h in holders} == {a["id"]}


async def test_a_waiter_is_granted_when_room_frees(api: httpx.AsyncClient) -> None:
    a = (await _lease(api, gpus=2)).json()
    waiter = asyncio.create_task(_lease(api, vram_mb=1024, wait_s=10))
    await asyncio.sleep(0)  # let the request reach the node and start waiting
    await api.delete(f"/v1/leases/{a['id']}", params={"token": a["token"]})
    r = await waiter
    assert r.status_code == 201 and r.json()["state"] == "granted"


async def test_an_unrenewed_lease_expires_and_its_token_dies(api: httpx.AsyncClient,
                                                            node: Node) -> None:
    lease = (await _lease(api, vram_mb=1024, ttl_s=1)).json()

    async def expired() -> bool:
        return bool((await api.get(f"/v1/leases/{lease['id']}")).json()["state"] == "expired")
    await eventually(expired, timeout=5)
    assert node.ledger.gpus[lease["device"]].declared_mb == 0
    r = await api.delete(f"/v1/leases/{lease['id']}", params={"token": lease["token"]})
    assert r.status_code == 409


async def test_immediate_request_preempts_a_background_lease(api: httpx.AsyncClient,
                                                             live_url: str) -> None:
    bg = [(await _lease(api, gpus=1, priority="background", grace_s=5)).json()
          for _ in range(2)]
    events: list[str] = []

    async def watch(lease_id: str) -> None:
        async with httpx.AsyncClient(base_url=live_url, timeout=20) as http, \
                http.stream("GET", f"/v1/leases/{lease_id}/events") as r:
            async for line in r.aiter_lines():
                if line.startswith("event: "):
                    events.append(line[7:])
    watchers = [asyncio.create_task(watch(b["id"])) for b in bg]
    urgent_req = asyncio.create_task(_lease(api, vram_mb=8192, priority="immediate",
                                            wait_s=10))

    async def preempted() -> bool:
        return "preempt" in events
    await eventually(preempted)
    states = [(await api.get(f"/v1/leases/{b['id']}")).json()["state"] for b in bg]
    victim = bg[states.index("preempting")]
    await api.delete(f"/v1/leases/{victim['id']}", params={"token": victim["token"]})
    urgent = (await urgent_req).json()
    assert urgent["state"] == "granted" and urgent["device"] == victim["device"]
    await api.delete(f"/v1/leases/{urgent['id']}", params={"token": urgent["token"]})

    async def resumed() -> bool:
        return "resume" in events
    await eventually(resumed)
    for w in watchers:
        w.cancel()


async def test_a_holder_that_ignores_preempt_is_revoked(api: httpx.AsyncClient) -> None:
    bg = (await _lease(api, gpus=2, priority="background", grace_s=0.3)).json()
    urgent = await _lease(api, vram_mb=1024, priority="immediate", wait_s=10)
    assert urgent.status_code == 201
    assert (await api.get(f"/v1/leases/{bg['id']}")).json()["state"] == "revoked"


async def test_a_non_preemptible_lease_is_never_preempted(api: httpx.AsyncClient) -> None:
    await _lease(api, gpus=2, priority="background", preemptible=False)
    r = await _lease(api, vram_mb=1024, priority="immediate", wait_s=0.3)
    assert r.status_code == 408


async def test_preempting_a_task_worker_requeues_its_work(api: httpx.AsyncClient,
                                                          node: Node) -> None:
    tid = (await submit(api, "behave", {"action": "slow", "s": 0.5}))["id"]

    async def running() -> bool:
        return bool((await api.get(f"/v1/tasks/{tid}")).json()["state"] == "running")
    await eventually(running)
    # Fill everything else so the urgent lease must take the worker's GPU.
    busy = int((await api.get(f"/v1/tasks/{tid}")).json()["placement"]["device"][4:])
    other = (await _lease(api, device=1 - busy, vram_mb=24576, preemptible=False)).json()
    filler = (await _lease(api, device=busy, vram_mb=24576 - 1024,
                            preemptible=False)).json()
    r = await _lease(api, device=busy, vram_mb=1024, priority="immediate", wait_s=10,
                     grace_s=5)
    assert r.status_code == 201, r.text
    for lz in (other, filler, r.json()):
        await api.delete(f"/v1/leases/{lz['id']}", params={"token": lz["token"]})
    done = await wait_done(api, tid)
    assert done["state"] == "succeeded"


async def test_a_non_preemptible_preset_keeps_its_worker(api: httpx.AsyncClient) -> None:
    tid = (await submit(api, "behave-keep", {"action": "slow", "s": 1.0}))["id"]

    async def running() -> bool:
        return bool((await api.get(f"/v1/tasks/{tid}")).json()["state"] == "running")
    await eventually(running)
    busy = int((await api.get(f"/v1/tasks/{tid}")).json()["placement"]["device"][4:])
    other = (await _lease(api, device=1 - busy, vram_mb=24576, preemptible=False)).json()
    filler = (await _lease(api, device=busy, vram_mb=24576 - 1024,
                            preemptible=False)).json()
    r = await _lease(api, device=busy, vram_mb=1024, priority="immediate", wait_s=0.3)
    assert r.status_code == 408  # the worker's preset says it may not be preempted
    for lz in (other, filler):
        await api.delete(f"/v1/leases/{lz['id']}", params={"token": lz["token"]})
    assert (await wait_done(api, tid))["attempts"] == 1


async def test_bad_lease_requests(api: httpx.AsyncClient) -> None:
    r = await api.post("/v1/leases", json={"vram_mb": 10})
    assert r.status_code == 422 and r.json()["error"]["field"] == "holder"
    r = await _lease(api, vram_mb=10**6)
    assert r.status_code == 400 and "24576" in r.json()["error"]["message"]
    r = await _lease(api, vram_mb=10, device=7)
    assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_device"
    r = await _lease(api, vram_mb=10, ttl_s=0)
    assert r.status_code == 422 and r.json()["error"]["field"] == "ttl_s"
    r = await api.post("/v1/leases/nope/renew", json={"token": 1})
    assert r.status_code == 404
