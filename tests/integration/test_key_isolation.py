"""What one API key's caller may not learn or spoil of another's: a preset's env values
(worker credentials) stay hidden from every key, each key has its own idempotency keys, and
an empty idempotency key is refused rather than matched to the first such task."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from gpulane.api.app import create_app
from gpulane.node import Node
from tests.integration.conftest import make_settings, stop_node

KEYS = "tasks:k-tasks:tasks,leases:k-leases:leases"


async def test_a_presets_env_is_shown_by_name_never_by_value(tmp_path: Path) -> None:
    # Any key may read GET /v1/presets; a worker's credentials live in its preset's env.
    presets = tmp_path / "p.yaml"
    presets.write_text("presets:\n  - name: fetcher\n    argv: [python, w.py]\n"
                       "    devices: [cpu]\n    env: {HF_TOKEN: hf_s3cr3t}\n")
    node = Node(make_settings(tmp_path, keys=KEYS, presets=[str(presets)]))
    await node.start()
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(
                app=create_app(node, manage_node=False)), base_url="http://t") as api:
            r = await api.get("/v1/presets", headers={"Authorization": "Bearer k-tasks"})
    finally:
        await stop_node(node)
    assert r.status_code == 200 and "hf_s3cr3t" not in r.text
    fetcher = next(p for p in r.json()["presets"] if p["name"] == "fetcher")
    assert list(fetcher["env"]) == ["HF_TOKEN"]


async def test_each_key_has_its_own_idempotency_keys(tmp_path: Path) -> None:
    node = Node(make_settings(tmp_path, keys="a:k-a:tasks,b:k-b:tasks"))
    await node.start()
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(
                app=create_app(node, manage_node=False)), base_url="http://t") as api:
            async def send(key: str, ms: int) -> httpx.Response:
                return await api.post("/v1/tasks", json={"preset": "sleep", "input": {"ms": ms}},
                                      headers={"Authorization": f"Bearer {key}",
                                               "Idempotency-Key": "order-42"})

            a = await send("k-a", 1)
            b = await send("k-b", 2)  # another app's order 42: its own task, no 409
            assert (a.status_code, b.status_code) == (202, 202), b.text
            assert a.json()["id"] != b.json()["id"]
            assert b.json()["submitted_by"] == "b"
            # Within one key the key still means one task, and a changed body is a 409.
            assert (await send("k-a", 1)).json()["id"] == a.json()["id"]
            again = await send("k-b", 3)
            assert again.status_code == 409 and a.json()["id"] not in again.text
    finally:
        await stop_node(node)


@pytest.mark.parametrize("key", ["", "  "])
async def test_an_empty_idempotency_key_is_422_not_the_first_such_task_again(
        tmp_path: Path, key: str) -> None:
    node = Node(make_settings(tmp_path))
    await node.start()
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(
                app=create_app(node, manage_node=False)), base_url="http://t") as api:
            for ms in (1, 2):
                r = await api.post("/v1/tasks", json={"preset": "sleep", "input": {"ms": ms}},
                                   headers={"Idempotency-Key": key})
                assert r.status_code == 422, r.text
                err = r.json()["error"]
                assert (err["code"], err["field"]) == ("invalid_idempotency_key",
                                                       "Idempotency-Key")
            bulk = await api.post("/v1/tasks/bulk", json={"tasks": [
                {"preset": "sleep"}, {"preset": "sleep", "idempotency_key": key}]})
            assert bulk.status_code == 422, bulk.text
            assert bulk.json()["error"]["field"] == "tasks[1].idempotency_key"
            assert (await api.get("/v1/tasks")).json()["tasks"] == []
    finally:
        await stop_node(node)
