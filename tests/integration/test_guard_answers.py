"""The guard's own refusals as a client that sends its whole body first meets them (a 401,
403, 415 or 429 read, never a reset), on a real server; and a web page of another origin
that sends a write without a body (no Content-Type, no preflight) to a keyless node."""

from __future__ import annotations

import asyncio
import contextlib
import json
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from gpulane.api.app import create_app
from gpulane.node import Node
from tests.conftest import free_port
from tests.integration.conftest import make_settings, stop_node

KEYS = "tasks:k-tasks:tasks,leases:k-leases:leases"
BODY = b'{"preset": "sleep", "input": "' + b"x" * (11 * 1024 * 1024) + b'"}'
"""11 MiB: far more than a socket's buffers take, so an unread body resets the connection."""


@pytest.fixture
async def keyed_url(tmp_path: Path) -> AsyncIterator[str]:
    node = Node(make_settings(tmp_path, keys=KEYS))
    await node.start()
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(node, manage_node=False),
                                           host="127.0.0.1", port=port, log_level="warning",
                                           lifespan="off"))
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 5)
        await stop_node(node)


def _post(url: str, headers: dict[str, str]) -> tuple[int, dict[str, Any], str]:
    """POST as urllib does: the whole body is sent before the answer is read."""
    req = urllib.request.Request(url, data=BODY, method="POST", headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read()), r.headers.get("Connection", "")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read()), exc.headers.get("Connection", "")


@pytest.mark.parametrize(("headers", "status", "code"), [
    ({"Content-Type": "application/json"}, 401, "unauthorized"),
    ({"Content-Type": "application/json", "Authorization": "Bearer nope"}, 401,
     "unauthorized"),
    ({"Content-Type": "application/json", "Authorization": "Bearer k-leases"}, 403,
     "forbidden"),
    ({"Content-Type": "text/plain", "Authorization": "Bearer k-tasks"}, 415,
     "unsupported_media_type"),
])
async def test_a_whole_body_sender_reads_the_guards_refusal(
        keyed_url: str, headers: dict[str, str], status: int, code: str) -> None:
    got, answer, connection = await asyncio.to_thread(_post, f"{keyed_url}/v1/tasks", headers)
    assert (got, answer["error"]["code"]) == (status, code)
    assert connection.lower() == "close"


@pytest.mark.parametrize(("method", "path"), [
    ("POST", "/v1/admin/drain"), ("POST", "/v1/admin/presets/reload"),
    ("POST", "/v1/tasks/x/cancel"), ("DELETE", "/v1/leases/x?token=1")])
async def test_a_page_of_another_origin_cannot_write_to_a_keyless_node(
        tmp_path: Path, method: str, path: str) -> None:
    # fetch(url, {method: "POST", mode: "no-cors"}) from any site: no body, no Content-Type,
    # no preflight, but the browser names the page's origin.
    node = Node(make_settings(tmp_path, cors_origins=["https://app.example"]))
    await node.start()
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(
                app=create_app(node, manage_node=False)), base_url="http://127.0.0.1:8765") as api:
            for origin in ("https://evil.example", "null", "http://127.0.0.1:9999"):
                r = await api.request(method, path, headers={"Origin": origin})
                assert r.status_code == 403, (origin, r.text)
                err = r.json()["error"]
                assert (err["code"], err["field"]) == ("cross_origin", "Origin")
                assert f"--cors-origin {origin}" in err["message"]
            assert not node.draining
            # The node's own pages (/docs), a named origin and clients that are not
            # browsers (no Origin) go on to the route.
            for headers in ({"Origin": "http://127.0.0.1:8765"},
                            {"Origin": "https://app.example"}, {}):
                r = await api.request(method, path, headers=headers)
                assert r.status_code != 403, (headers, r.text)
            # The API description says so, on writes only.
            spec = (await api.get("/openapi.json")).json()["paths"]
            assert "403" in spec["/v1/admin/drain"]["post"]["responses"]
            assert "403" not in spec["/v1/gpus"]["get"]["responses"]
    finally:
        await stop_node(node)


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
