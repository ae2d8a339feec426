"""A real node (SQLite store, 2 simulated GPUs, example + test presets) behind the ASGI app."""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from fastapi.routing import iter_route_contexts

from gpulane.api.app import create_app
from gpulane.config import Settings
from gpulane.node import Node
from tests.conftest import free_port

TEST_PRESETS = Path(__file__).parent / "presets"


def make_settings(tmp_path: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {"data_dir": tmp_path / "data", "simulate_gpus": "2x24GiB",
                              "presets": [str(TEST_PRESETS)], "cpu_concurrency": 2}
    values.update(overrides)
    return Settings.model_validate(values)


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[Node]:
    n = Node(make_settings(tmp_path))
    await n.start()
    try:
        yield n
    finally:
        await stop_node(n)


async def stop_node(n: Node) -> None:
    """Stop a node; if it hangs, show every task's stack instead of hanging the suite."""
    stopping = asyncio.create_task(n.stop())
    done, _ = await asyncio.wait({stopping}, timeout=20)
    if not done:
        import io

        out = io.StringIO()
        for task in asyncio.all_tasks():
            task.print_stack(limit=5, file=out)
        raise AssertionError(f"node.stop() hung:\n{out.getvalue()}")
    stopping.result()


@pytest.fixture
async def api(node: Node) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(node, manage_node=False)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://gpulane.test") as c:
        yield c


@pytest.fixture
async def live_url(node: Node) -> AsyncIterator[str]:
    """The node served by a real uvicorn on a free loopback port (for SSE and the SDK)."""
    async with serve_live(node) as url:
        yield url


@contextlib.asynccontextmanager
async def serve_live(node: Node) -> AsyncIterator[str]:
    """Serve a started node with a real uvicorn on a free loopback port; its base URL."""
    port = free_port()
    config = uvicorn.Config(create_app(node, manage_node=False), host="127.0.0.1", port=port,
                            log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
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


@contextlib.asynccontextmanager
async def node_with_api(tmp_path: Path, *, paused: bool = False,
                        **settings: Any) -> AsyncIterator[tuple[Node, httpx.AsyncClient]]:
    """A node started with these settings (its scheduler paused if asked, so tasks stay
    queued) and an in-process client of its app; the node is stopped after."""
    n = Node(make_settings(tmp_path, **settings))
    await n.start()
    n.scheduler.paused = paused
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(
                app=create_app(n, manage_node=False)), base_url="http://t") as api:
            yield n, api
    finally:
        await stop_node(n)


@contextlib.asynccontextmanager
async def node_api(tmp_path: Path, *, paused: bool = False,
                   **settings: Any) -> AsyncIterator[httpx.AsyncClient]:
    """node_with_api's client alone."""
    async with node_with_api(tmp_path, paused=paused, **settings) as (_, api):
        yield api


def route_table(app: FastAPI) -> list[tuple[str, str]]:
    """(method, path) for every route of the app, path parameters filled in."""
    out = []
    for route in iter_route_contexts(app.routes):
        assert route.path is not None and route.methods, route
        path = re.sub(r"\{[^}]+\}", "x", route.path)
        out.extend((method, path) for method in sorted(route.methods) if method != "HEAD")
    return out


async def submit(api: httpx.AsyncClient, preset: str, inp: Any = None,
                 **fields: Any) -> dict[str, Any]:
    r = await api.post("/v1/tasks", json={"preset": preset, "input": inp, **fields})
    assert r.status_code in (200, 202), r.text
    body: dict[str, Any] = r.json()
    return body


async def wait_done(api: httpx.AsyncClient, task_id: str, wait: float = 20) -> dict[str, Any]:
    r = await api.get(f"/v1/tasks/{task_id}/result", params={"wait": wait})
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    assert body["state"] in ("succeeded", "failed", "cancelled"), body
    return body
