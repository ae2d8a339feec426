"""A node's blocking reads of the fleet (a call awaiting its answer, a lease stream) each hold
a Redis connection while they wait, so they are bounded: one over ``BLOCKING_MAX`` is 503
``fleet_busy`` with Retry-After, and a call refused so never reaches the other node."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from tests.conftest import eventually

from gpulane.errors import UnavailableError
from gpulane.fleet import NodeInfo
from gpulane.fleet import redis as fleet_redis
from gpulane.fleet.factory import open_fleet


async def test_a_blocking_read_over_the_bound_is_fleet_busy(
        redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fleet_redis, "BLOCKING_MAX", 1)
    monkeypatch.setattr(fleet_redis, "BLOCKING_WAIT_S", 0.05)
    gate = asyncio.Event()
    asked: list[str] = []

    async def slow(op: str, payload: dict[str, Any]) -> dict[str, Any]:
        asked.append(op)
        await gate.wait()
        return {"op": op}

    a, b = open_fleet(redis_url, "a"), open_fleet(redis_url, "b")
    b.serve(slow)
    for f in (a, b):
        await f.open()
    try:
        await b.register(NodeInfo("b", None, 0.0, 0.0), ttl_s=30)
        first = asyncio.create_task(a.call("b", "one", {}, timeout_s=10))
        async def asked_once() -> bool:
            return asked == ["one"]
        await eventually(asked_once)
        with pytest.raises(UnavailableError) as busy:
            await a.call("b", "two", {}, timeout_s=10)
        assert busy.value.code == "fleet_busy" and busy.value.headers == {"Retry-After": "1"}
        assert "two" in busy.value.message and "retry later" in busy.value.message
        with pytest.raises(UnavailableError):  # a lease stream waits for the same slots
            await anext(aiter(a.follow_lease("L1", 0, 1.0)))
        gate.set()
        assert await first == {"op": "one"}
        assert await a.call("b", "three", {}, timeout_s=10) == {"op": "three"}
        assert asked == ["one", "three"]  # the refused call never reached b
    finally:
        gate.set()
        for f in (a, b):
            await f.close()
