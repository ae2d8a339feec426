"""The fleet's client commands: ``gpulane nodes``, ``gpulane drain NODE``, and the other nodes'
GPUs in ``gpulane gpus``."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from tests.unit.test_cli_client import invoke

WIDE = {"COLUMNS": "200"}
"""A terminal wide enough that no table cell wraps."""
NODES = [{"name": "a", "url": "http://a:8765", "heartbeat_age_s": 0.4, "draining": False,
          "devices": [{"index": 0, "total_vram_mb": 24576, "schedulable_free_vram_mb": 20480}],
          "cpu": {"cores": 8}, "warm": ["embed/gpu"], "running": 3},
         {"name": "b", "url": None, "heartbeat_age_s": 1.2, "draining": True, "devices": [],
          "cpu": {"cores": 4}, "warm": [], "running": 0}]


def test_nodes_table_and_json(monkeypatch: pytest.MonkeyPatch) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/v1/nodes"
        return httpx.Response(200, json={"nodes": NODES})

    res = invoke(handler, monkeypatch, "nodes", env=WIDE)
    assert res.exit_code == 0, res.output
    for text in ("http://a:8765", "20,480 / 24,576", "embed/gpu", "draining", "none"):
        assert text in res.stdout, text
    res = invoke(handler, monkeypatch, "nodes", "--json")
    assert json.loads(res.stdout) == {"nodes": NODES}


def _recorder(sent: list[tuple[str, Any]]) -> Any:
    def handler(request: httpx.Request) -> httpx.Response:
        request.read()
        sent.append((request.url.path, json.loads(request.content) if request.content
                     else None))
        return httpx.Response(200, json={"node": "b", "draining": True, "queued": 7})
    return handler


def test_drain_names_the_node_and_its_exit(monkeypatch: pytest.MonkeyPatch) -> None:
    sent: list[tuple[str, Any]] = []
    res = invoke(_recorder(sent), monkeypatch, "drain", "b", "--exit", "--grace-s", "12")
    assert res.exit_code == 0, res.output
    assert "node b: draining to exit, 7 queued" in res.stdout
    res = invoke(_recorder(sent), monkeypatch, "drain")
    assert res.exit_code == 0, res.output
    assert sent == [("/v1/admin/drain", {"node": "b", "exit": True, "grace_s": 12.0}),
                    ("/v1/admin/drain", None)]


def test_drain_refuses_flags_that_do_not_go_together(monkeypatch: pytest.MonkeyPatch) -> None:
    sent: list[tuple[str, Any]] = []
    res = invoke(_recorder(sent), monkeypatch, "drain", "b", "--grace-s", "5")
    assert res.exit_code == 2 and "--grace-s is for a drain that exits" in res.output
    res = invoke(_recorder(sent), monkeypatch, "drain", "--resume", "--exit")
    assert res.exit_code == 2 and "--resume takes neither" in res.output
    assert sent == []


def test_gpus_lists_the_other_nodes(monkeypatch: pytest.MonkeyPatch) -> None:
    info = {"node": "b", "provider": "sim", "simulated": True, "reason": "", "devices": [],
            "cpu": {"cores": 4, "concurrency": 4}, "nodes": NODES}

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json=info)

    res = invoke(handler, monkeypatch, "gpus", env=WIDE)
    assert res.exit_code == 0, res.output
    assert "no GPUs" in res.stdout and "20,480 / 24,576" in res.stdout
