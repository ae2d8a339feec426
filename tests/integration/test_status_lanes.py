"""GET /v1/status per lane, device and fallback reason (issue 13, item 7), on a real node: a
task running, one queued behind it, a fallback recorded; and `gpulane status` drawing it."""

from __future__ import annotations

from typing import Any

import httpx
from rich.console import Console

from gpulane.cli.status import render_status
from tests.conftest import eventually

OLD_KEYS = {"node", "started", "draining", "queued", "presets", "housekeeping", "tables"}
"""Keys the status had before issue 13: the CLI and other tests read them, so they stay."""


def _lane(body: dict[str, Any], preset: str, lane: str) -> dict[str, Any]:
    [entry] = [x for x in body["lanes"] if (x["preset"], x["lane"]) == (preset, lane)]
    return entry


async def test_status_shows_lanes_devices_and_fallbacks(api: httpx.AsyncClient) -> None:
    # behave-cpu has one CPU worker (replicas 1, batches of 1): a hanging task holds it, so
    # the next one waits in the queue.
    hold = (await api.post("/v1/tasks", json={"preset": "behave-cpu",
                                              "input": {"action": "hang"}})).json()
    waiting = (await api.post("/v1/tasks", json={"preset": "behave-cpu",
                                                 "input": {"action": "ok"}})).json()
    # No simulated GPU has 100,000 MB: a static fallback at submit, recorded by the node.
    await api.post("/v1/tasks", json={"preset": "big-or-cpu", "input": {}})

    async def held() -> dict[str, Any] | None:
        body: dict[str, Any] = (await api.get("/v1/status")).json()
        lane = _lane(body, "behave-cpu", "cpu")
        return body if lane["running"] == 1 and lane["queued"] == 1 and \
            lane["workers"]["busy"] == 1 else None

    body = await eventually(held)
    assert body.keys() >= OLD_KEYS
    lane = _lane(body, "behave-cpu", "cpu")
    assert lane["oldest_wait_s"] is not None and lane["oldest_wait_s"] >= 0
    assert lane["workers"] == {"warm": 0, "loading": 0, "busy": 1}
    # Every lane a preset may run in is listed, a quiet one with zeros.
    quiet = _lane(body, "behave", "gpu")
    assert (quiet["queued"], quiet["running"], quiet["oldest_wait_s"]) == (0, 0, None)
    assert [d["health"] for d in body["devices"]] == ["ok", "ok"]
    assert all(d["total_vram_mb"] == 24 * 1024 for d in body["devices"])
    assert body["cpu"]["slots"] == 2 and len(body["cpu"]["workers"]) >= 1
    reasons = body["fallbacks"]["reasons"]
    assert reasons["vram_exceeds_largest_gpu"]["count"] == 1
    assert reasons["vram_exceeds_largest_gpu"]["per_min"]["1m"] > 0
    assert reasons["vram_exceeds_largest_gpu"]["presets"] == {"big-or-cpu": 1}

    console = Console(record=True, width=200)
    render_status(console, body)
    text = console.export_text()
    assert "behave-cpu" in text and "vram_exceeds_largest_gpu" in text and "gpu:1" in text

    # The hanging task would otherwise hold its worker until the node stops.
    for task in (waiting, hold):
        assert (await api.post(f"/v1/tasks/{task['id']}/cancel")).status_code == 200
