"""``client.gpu()``: a lease for the length of a block, renewed, released, preempted."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from gpulane.client import AsyncClient, Client
from gpulane.errors import APIError, LeasePreempted
from gpulane.node import Node
from tests.conftest import eventually


async def test_async_gpu_holds_and_releases(live_url: str, node: Node) -> None:
    async with AsyncClient(live_url) as c:
        async with c.gpu(vram="4GiB", ttl_s=1) as lease:
            assert lease.cuda_visible_devices in ("0", "1")
            await asyncio.sleep(1.5)  # past the TTL: the background renewals keep it
            assert node.leases.get(lease.lease["id"]).state.value == "granted"
        assert node.leases.get(lease.lease["id"]).state.value == "released"
        assert sum(a.declared_mb for a in node.ledger.gpus.values()) == 0


async def test_async_gpu_preempt_calls_the_callback(live_url: str) -> None:
    seen: list[dict[str, object]] = []
    async with AsyncClient(live_url) as c, httpx.AsyncClient(base_url=live_url,
                                                             timeout=20) as http:
        async with c.gpu(gpus=2, priority="background", grace_s=2, on_preempt=seen.append):
            urgent = asyncio.create_task(http.post("/v1/leases", json={
                "holder": "urgent", "vram_mb": 1024, "priority": "immediate", "wait_s": 10}))

            async def called() -> bool:
                return bool(seen)
            await eventually(called)
        # Leaving the block releases the lease, which lets the urgent one in.
        assert (await urgent).status_code == 201
    assert seen[0]["state"] == "preempting"


async def test_async_gpu_preempt_raises_without_a_callback(live_url: str) -> None:
    async with AsyncClient(live_url) as c, httpx.AsyncClient(base_url=live_url,
                                                             timeout=20) as http:
        urgent = None
        with pytest.raises(LeasePreempted):
            async with c.gpu(gpus=2, priority="background", grace_s=2):
                urgent = asyncio.create_task(http.post("/v1/leases", json={
                    "holder": "urgent", "vram_mb": 1024, "priority": "immediate",
                    "wait_s": 10}))
                await asyncio.sleep(30)
        assert urgent is not None and (await urgent).status_code == 201


async def test_sync_gpu_twin(live_url: str, node: Node) -> None:
    def work() -> str:
        with Client(live_url) as c, c.gpu(vram=2048) as lease:
            lease.check()
            return str(lease.lease["id"])
    lease_id = await asyncio.to_thread(work)
    assert node.leases.get(lease_id).state.value == "released"


async def test_gpu_bad_request_is_an_api_error(live_url: str) -> None:
    async with AsyncClient(live_url) as c:
        with pytest.raises(APIError) as exc:
            async with c.gpu(vram=10**7):
                pass
        assert exc.value.status == 400 and exc.value.field == "vram_mb"
