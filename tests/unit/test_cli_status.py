"""`gpulane status` against a mock server: the lanes, devices and fallbacks tables, and
``--json`` printing the body as it came."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from tests.unit.test_cli_client import invoke

STATUS: dict[str, Any] = {
    "node": "n1", "started": True, "draining": False, "queued": 3,
    "presets": {"embed": {"queued": 3, "max_queued": 100, "drain_per_s": 12.5}},
    "lanes": [
        {"preset": "embed", "lane": "gpu", "queued": 2, "running": 1, "oldest_wait_s": 4.25,
         "workers": {"warm": 0, "loading": 1, "busy": 1}, "load_s": 3.5,
         "drain_per_worker_s": 40.0},
        {"preset": "embed", "lane": "cpu", "queued": 1, "running": 0, "oldest_wait_s": 0.5,
         "workers": {"warm": 1, "loading": 0, "busy": 0}, "load_s": None,
         "drain_per_worker_s": None},
        {"preset": "sleep", "lane": "gpu", "queued": 0, "running": 0, "oldest_wait_s": None,
         "workers": {"warm": 0, "loading": 0, "busy": 0}, "load_s": None,
         "drain_per_worker_s": None}],
    "devices": [
        {"index": 0, "name": "Simulated GPU 0", "health": "ok", "simulated": True,
         "total_vram_mb": 24576, "declared_vram_mb": 2048, "free_vram_mb": 22528,
         "workers": ["embed-w1"]},
        {"index": 1, "name": "Simulated GPU 1", "health": "lost", "simulated": True,
         "total_vram_mb": 24576, "declared_vram_mb": 0, "free_vram_mb": 0, "workers": []}],
    "cpu": {"slots": 2, "in_use": 1, "workers": ["embed-w2"]},
    "fallbacks": {"total": 5, "reasons": {
        "device_lost": {"count": 2, "per_min": {"1m": 2.0, "15m": 0.133},
                        "presets": {"embed": 2}},
        "gpu_busy": {"count": 3, "per_min": {"1m": 0.0, "15m": 0.2}, "presets": {"embed": 3}}}},
    "housekeeping": {}, "tables": {"leases": {}, "task_notifier": 0}}


def _handler(request: httpx.Request) -> httpx.Response:
    assert request.url.path == "/v1/status"
    return httpx.Response(200, json=STATUS)


def test_status_draws_lanes_devices_and_fallbacks(monkeypatch: pytest.MonkeyPatch) -> None:
    res = invoke(_handler, monkeypatch, "status", env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    assert "node n1: taking tasks, 3 queued" in lines[0]
    gpu_row = next(line for line in lines if "embed" in line and " gpu " in line)
    assert "4.2" in gpu_row and "3.50" in gpu_row and "40" in gpu_row
    lost = next(line for line in lines if "gpu:1" in line)
    assert "lost" in lost
    assert any("embed-w2" in line and "1 of 2 slots" in line for line in lines)
    busy = next(line for line in lines if "gpu_busy" in line)
    assert "3" in busy and "0.2" in busy and "embed 3" in busy
    assert "fallbacks (5 in all)" in res.stdout
    # A quiet lane (nothing queued or running, no worker) is left out, and the title says so.
    assert "1 quiet ones left out" in res.stdout and "sleep" not in res.stdout


def test_status_json_is_the_body(monkeypatch: pytest.MonkeyPatch) -> None:
    raw = invoke(_handler, monkeypatch, "status", "--json")
    assert raw.exit_code == 0, raw.output
    assert json.loads(raw.stdout) == STATUS


def test_status_without_fallbacks_or_busy_lanes_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    quiet = {**STATUS, "fallbacks": {"total": 0, "reasons": {}}}
    res = invoke(lambda _r: httpx.Response(200, json=quiet), monkeypatch, "status")
    assert res.exit_code == 0, res.output
    assert "fallbacks: none" in res.stdout
    idle = {**STATUS, "lanes": STATUS["lanes"][2:]}
    res = invoke(lambda _r: httpx.Response(200, json=idle), monkeypatch, "status")
    assert "lanes: all 1 quiet" in res.stdout
