"""A preset whose workers cannot start stops being started (its circuit opens)."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx

from gpulane.node import Node
from gpulane.runtime.circuit import START_FAILURE_THRESHOLD


async def _circuit(api: httpx.AsyncClient, name: str) -> dict[str, Any]:
    presets = (await api.get("/v1/presets")).json()["presets"]
    [preset] = [p for p in presets if p["name"] == name]
    circuit: dict[str, Any] = preset["circuit"]
    return circuit


async def test_start_failures_open_the_preset_circuit_and_the_task_waits(
        api: httpx.AsyncClient, node: Node) -> None:
    assert (await _circuit(api, "never-starts"))["state"] == "closed"
    tid = (await api.post("/v1/tasks", json={"preset": "never-starts", "input": {}})).json()["id"]
    for _ in range(200):
        circuit = await _circuit(api, "never-starts")
        if circuit["state"] == "open":
            break
        await asyncio.sleep(0.05)
    assert circuit["state"] == "open" and circuit["start_failures"] == START_FAILURE_THRESHOLD
    assert "boom" in circuit["last_error"] and circuit["retry_in_s"] > 0
    await asyncio.sleep(0.5)  # no new worker while open: the attempts stop where they were
    task = (await api.get(f"/v1/tasks/{tid}")).json()
    assert task["state"] == "queued" and task["attempts"] == START_FAILURE_THRESHOLD
    assert "boom" in task["error"]["message"]  # the last attempt's error says why
    assert not [w for w in node.supervisor.workers.values() if w.preset_name == "never-starts"]
