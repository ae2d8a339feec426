"""The guard's own refusals as a client that sends its whole body first meets them (a 401,
403, 415 or 429 read, never a reset), on a real server; and a web page of another origin
that sends a write without a body (no Content-Type, no preflight) to a keyless node."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from gpulane.api.app import create_app
from gpulane.node import Node
from tests.integration.conftest import make_settings, serve_live, stop_node

KEYS = "tasks:k-tasks:tasks,leases:k-leases:leases"
BODY = b'{"preset": "sleep", "input": "' + b"x" * (11 * 1024 * 1024) + b'"}'
"""11 MiB: far more than a socket's buffers take, so an unread body resets the connection."""


@pytest.fixture
async def keyed_url(tmp_path: Path) -> AsyncIterator[str]:
    node = Node(make_settings(tmp_path, keys=KEYS))
    await node.start()
    try:
        async with serve_live(node) as url:
            yield url
    finally:
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
