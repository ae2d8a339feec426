"""With a token set (the old single key: every scope), every route of the app's table answers
401 without it, but the health checks.

The walk reads the route table itself, so a route added later is covered without editing this
test, and one that slips past the guard (a fast path with its own dispatch, say) turns it red.
Open on purpose: only the health checks (probes carry no credentials) and the dashboard's
page and files (no data: the page asks for a key). The API's description (/openapi.json,
/docs) needs a key like the rest.
Scopes, per-key ownership and rate limits are in test_keys_scopes.py.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from starlette.applications import Starlette
from starlette.routing import Mount

from gpulane.api.app import create_app
from gpulane.node import Node
from tests.integration.conftest import make_settings, route_table, stop_node

TOKEN = "s3cret"
OPEN = {"/healthz", "/readyz", "/", "/static/x"}
"""Paths that answer without the token (/static/x: 404, no such file)."""
ENDLESS = {("GET", "/v1/status/stream")}
"""Routes whose answer, once let in, never ends on its own (the in-process client reads a
whole body): tests/integration/test_status_stream.py checks them with a key."""


@pytest.fixture
async def app(tmp_path: Path) -> AsyncIterator[FastAPI]:
    node = Node(make_settings(tmp_path, token=TOKEN))
    await node.start()
    try:
        yield create_app(node, manage_node=False)
    finally:
        await stop_node(node)


async def test_every_route_but_health_needs_the_token(app: FastAPI) -> None:
    table = route_table(app)
    # The walk sees the hot task routes and the included routers alike.
    for route in [("POST", "/v1/tasks"), ("GET", "/v1/tasks/x"), ("GET", "/v1/tasks/x/result"),
                  ("POST", "/v1/tasks/bulk"), ("GET", "/v1/tasks/x/events"),
                  ("POST", "/v1/leases"), ("DELETE", "/v1/leases/x"), ("GET", "/v1/gpus")]:
        assert route in table
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://t") as api:
        for method, path in table:
            r = await api.request(method, path, json={})
            if path in OPEN:
                assert r.status_code in (200, 404), (method, path, r.text)
                continue
            assert r.status_code == 401, (method, path, r.status_code, r.text)
            assert r.json()["error"]["code"] == "unauthorized"
            assert r.headers["www-authenticate"].startswith("Bearer"), (method, path)
            wrong = await api.request(method, path, headers={"Authorization": "Bearer nope"},
                                      json={})
            assert wrong.status_code == 401, (method, path, wrong.text)
            if (method, path) in ENDLESS:
                continue
            # An empty body: past the guard, the request is refused for what it says (no task
            # starts, so the node stops at once).
            right = await api.request(method, path, headers={"Authorization": f"Bearer {TOKEN}"},
                                      params={"token": "1"}, json={})
            assert right.status_code != 401, (method, path, right.text)


async def test_a_wrong_method_or_an_unknown_v1_path_needs_the_token_too(app: FastAPI) -> None:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://t") as api:
        assert (await api.put("/v1/tasks")).status_code == 401
        assert (await api.get("/v1/nothing")).status_code == 401
        auth = {"Authorization": f"Bearer {TOKEN}"}
        assert (await api.put("/v1/tasks", headers=auth)).status_code == 405
        assert (await api.get("/v1/nothing", headers=auth)).status_code == 404


async def test_the_openapi_document_says_so(app: FastAPI) -> None:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://t") as api:
        assert (await api.get("/openapi.json")).status_code == 401
        spec = (await api.get("/openapi.json",
                              headers={"Authorization": f"Bearer {TOKEN}"})).json()
    assert spec["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    for path, item in spec["paths"].items():
        for method, op in item.items():
            guarded = path not in OPEN
            assert ("401" in op["responses"]) is guarded, (method, path)
            assert ("403" in op["responses"]) is guarded, (method, path)
            assert ("security" in op) is guarded, (method, path)


async def test_the_guard_holds_when_the_app_is_mounted_under_a_prefix(app: FastAPI) -> None:
    # Mounted (or served with a root_path), scope["path"] keeps the prefix while the route
    # table matches without it: the guard must read the path the way the table does.
    outer = Starlette(routes=[Mount("/api", app=app)])
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=outer),
                                 base_url="http://t") as api:
        for method, path in [("GET", "/api/v1/presets"), ("POST", "/api/v1/tasks"),
                             ("GET", "/api/v1/tasks/x"), ("GET", "/api/v1/tasks")]:
            r = await api.request(method, path, json={"preset": "sleep"})
            assert r.status_code == 401, (method, path, r.text)
        auth = {"Authorization": f"Bearer {TOKEN}"}
        assert (await api.get("/api/v1/presets", headers=auth)).status_code == 200
        assert (await api.get("/api/healthz")).status_code == 200
