"""The dashboard's server side: the page and its files (open, strict CSP, ETag), and
``GET /v1/status/stream`` over a real uvicorn (events, scopes with keys on, the slot given back
when the client leaves, the 503 when every slot is taken)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import uvicorn
from fastapi import FastAPI

from gpulane.api.app import create_app
from gpulane.api.dashboard import CONTENT_SECURITY_POLICY
from gpulane.api.status_stream import SlotStream, StreamSlots
from gpulane.node import Node
from tests.conftest import eventually, free_port
from tests.integration.conftest import make_settings, stop_node

KEYS = "tasks:k-tasks:tasks,leases:k-leases:leases"
"""Two keys: one with the tasks scope, one with the leases scope."""


@contextlib.asynccontextmanager
async def served(tmp_path: Path, **settings: Any) -> AsyncIterator[tuple[FastAPI, str]]:
    """A started node's app on a real uvicorn (SSE needs a real connection to leave)."""
    node = Node(make_settings(tmp_path, **settings))
    await node.start()
    app = create_app(node, manage_node=False)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port,
                                           log_level="warning", lifespan="off"))
    task = asyncio.create_task(server.serve())
    try:
        await eventually(lambda: asyncio.sleep(0, server.started))
        yield app, f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 5)
        await stop_node(node)


async def first_status(lines: AsyncIterator[str]) -> dict[str, Any]:
    """The data of the next ``status`` event of an open stream's lines."""
    event = None
    async for line in lines:
        if line.startswith("event: "):
            event = line[7:]
        elif line.startswith("data: ") and event == "status":
            body: dict[str, Any] = orjson.loads(line[6:])
            return body
    raise AssertionError("the stream ended before a status event")


async def test_the_page_and_its_files_are_open_strict_and_revalidated(tmp_path: Path) -> None:
    async with served(tmp_path, keys=KEYS) as (_, url), httpx.AsyncClient(base_url=url) as c:
        page = await c.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert page.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
        assert "script-src 'self'" in CONTENT_SECURITY_POLICY
        assert page.headers["x-content-type-options"] == "nosniff"
        assert page.headers["cache-control"] == "no-cache"
        assert b'src="/static/app.js"' in page.content and b"<script>" not in page.content
        head = await c.head("/")
        assert head.content == b"" and head.headers["content-length"] == str(len(page.content))
        again = await c.get("/", headers={"If-None-Match": page.headers["etag"]})
        assert again.status_code == 304 and again.content == b""
        js = await c.get("/static/app.js")
        assert js.status_code == 200 and js.headers["content-type"].startswith("text/javascript")
        assert b"innerHTML" not in js.content  # every value is written as text
        assert (await c.get("/static/app.css")).headers["content-type"].startswith("text/css")
        for bad in ("/static/index.html", "/static/..%2Fdashboard.py", "/static/nope.js"):
            assert (await c.get(bad)).status_code == 404, bad
        assert "app.js" in (await c.get("/static/nope.js")).json()["error"]["message"]
        # The data behind the page is not open: the stream needs a key like every /v1 route.
        assert (await c.get("/v1/status/stream")).status_code == 401


async def test_the_stream_sends_status_nodes_workers_and_the_newest_tasks(
        tmp_path: Path) -> None:
    async with served(tmp_path) as (_, url), httpx.AsyncClient(base_url=url) as c:
        task = (await c.post("/v1/tasks", json={"preset": "sleep", "input": {"ms": 5},
                                                "device": "cpu"})).json()
        await c.get(f"/v1/tasks/{task['id']}/result", params={"wait": 10})
        async with c.stream("GET", "/v1/status/stream", params={"interval_s": 0.5}) as r:
            assert r.status_code == 200
            assert r.headers["content-type"].startswith("text/event-stream")
            body = await first_status(r.aiter_lines())
        assert body["status"]["node"] == body["nodes"][0]["name"]
        gpu = body["status"]["devices"][0]
        assert gpu["held_vram_mb"] == {"worker": 0, "lease": 0, "clearing": 0}
        assert gpu["outside_vram_mb"] == 0
        (brief,) = [t for t in body["tasks"] if t["id"] == task["id"]]
        assert brief["state"] == "succeeded" and "input" not in brief and "output" not in brief
        assert body["leases"] == [] and isinstance(body["workers"], list)
        bad = await c.get("/v1/status/stream", params={"interval_s": 0})
        assert bad.status_code == 422 and bad.json()["error"]["field"] == "interval_s"


async def test_a_key_sees_in_the_stream_only_what_its_scopes_let_it_read(
        tmp_path: Path) -> None:
    async with served(tmp_path, keys=KEYS) as (_, url), httpx.AsyncClient(base_url=url) as c:
        for key, tasks_seen, leases_seen in (("k-tasks", True, False),
                                             ("k-leases", False, True)):
            async with c.stream("GET", "/v1/status/stream",
                                headers={"Authorization": f"Bearer {key}"}) as r:
                assert r.status_code == 200
                body = await first_status(r.aiter_lines())
            assert (body["tasks"] is not None) is tasks_seen
            assert (body["leases"] is not None) is leases_seen
        wrong = await c.get("/v1/status/stream", headers={"Authorization": "Bearer k-nobody"})
        assert wrong.status_code == 401


async def test_a_stream_gives_its_slot_back_when_the_client_leaves_and_a_full_node_says_503(
        tmp_path: Path) -> None:
    async with served(tmp_path) as (app, url), httpx.AsyncClient(base_url=url) as c:
        app.state.status_streams = room = StreamSlots(limit=1)
        async with c.stream("GET", "/v1/status/stream") as r:
            await first_status(r.aiter_lines())
            assert room.open == 1
            busy = await c.get("/v1/status/stream")
            assert busy.status_code == 503 and busy.headers["retry-after"] == "5"
            assert busy.json()["error"]["code"] == "too_many_streams"
        await eventually(lambda: asyncio.sleep(0, room.open == 0))
        async with c.stream("GET", "/v1/status/stream") as r:
            assert r.status_code == 200



async def test_a_drain_to_exit_ends_the_stream_so_the_server_can_exit(tmp_path: Path) -> None:
    async with served(tmp_path) as (app, url), httpx.AsyncClient(base_url=url) as c:
        node: Node = app.state.node
        async with c.stream("GET", "/v1/status/stream", params={"interval_s": 0.5}) as r:
            lines = r.aiter_lines()
            await first_status(lines)
            node.drain(exit=True)
            statuses = [line async for line in lines if line == "event: status"]
        assert len(statuses) <= 2  # at most the one on its way, then the one that says so
        async with c.stream("GET", "/v1/status/stream") as r:  # a reconnect: one, then the end
            lines = r.aiter_lines()
            last = await first_status(lines)
            assert [line async for line in lines if line] == []
        assert last["status"]["draining"] is True


@pytest.mark.parametrize("spec", ["2.3", "2.4"])
async def test_a_slot_comes_back_when_the_client_left_before_the_first_event(spec: str) -> None:
    room = StreamSlots(limit=1)
    room.take()
    started = []

    async def events() -> AsyncIterator[bytes]:
        started.append(True)
        yield b"retry: 2000\n\n"

    async def receive() -> dict[str, Any]:
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        raise OSError("the client is gone")

    scope = {"type": "http", "asgi": {"spec_version": spec}, "method": "GET", "path": "/"}
    with contextlib.suppress(Exception):
        await SlotStream(events(), room, headers={})(scope, receive, send)
    assert started == [] and room.open == 0
