"""A lease request whose caller leaves is called off, not granted to nobody until its ttl_s:
an acquire forwarded from node a to node b that a's caller abandons ends on b (timed out
while it waited, released if granted meanwhile), and an HTTP client that disconnects while
its acquire waits has it called off."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from starlette.requests import Request

from gpulane.api.leases import _unless_caller_leaves
from gpulane.scheduling.lease_forwards import Abandoned, Forwards
from gpulane.scheduling.leases import LeaseRequest
from tests.conftest import eventually
from tests.integration.test_fleet_leases import _lease, fleet_of

pytestmark = pytest.mark.usefixtures("redis_server")


async def test_a_forwarded_acquire_whose_caller_leaves_ends_on_its_node(
        tmp_path: Path, redis_url: str) -> None:
    async with fleet_of(tmp_path, redis_url, "a", "b") as fleet:
        (node_a, _), (node_b, b) = fleet["a"], fleet["b"]
        await _lease(b, gpus=2, ttl_s=60, preemptible=False)  # b is full
        asking = asyncio.create_task(node_a.fleet_leases.acquire(
            LeaseRequest("late", gpus=1), wait_s=60, node="b"))

        async def waits_on_b() -> list[Any]:
            return [lz for lz in node_b.leases.active() if lz.request.holder == "late"]
        (waiting,) = await eventually(waits_on_b)
        asking.cancel()  # a's caller left

        async def ended() -> bool:
            return bool(waiting.state.value == "timed_out")
        await eventually(ended)  # long before its wait_s of 60 s


async def test_a_forward_granted_then_abandoned_is_released() -> None:
    released: list[tuple[str, int]] = []
    forwards = Forwards(lambda lease_id, token: released.append((lease_id, token)))

    async def granted() -> dict[str, Any]:
        return {"id": "lease-1", "token": 7}
    assert await forwards.serve("r1", granted) == {"id": "lease-1", "token": 7}
    assert forwards.abandon("r1") == "granted" and released == [("lease-1", 7)]
    assert forwards.abandon("r2") == "unknown"
    with pytest.raises(Abandoned):  # its abandon overtook it
        await forwards.serve("r2", granted)


async def test_an_acquire_is_called_off_when_its_client_disconnects() -> None:
    messages: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    request = asgi_request(messages)
    started, cancelled = asyncio.Event(), asyncio.Event()

    async def acquire() -> dict[str, Any]:
        started.set()
        try:
            await asyncio.Event().wait()
        finally:
            cancelled.set()
        return {}
    answer = asyncio.create_task(_unless_caller_leaves(request, acquire()))
    await started.wait()
    await messages.put({"type": "http.disconnect"})
    assert await answer is None and cancelled.is_set()


def asgi_request(messages: asyncio.Queue[dict[str, Any]]) -> Request:
    """A request whose body is read: what the client sends next comes from ``messages``."""
    async def receive() -> dict[str, Any]:
        return await messages.get()
    return Request({"type": "http", "method": "POST", "path": "/v1/leases", "headers": []},
                   receive)
