"""Keys with scopes, as an attacker and a new user meet them: every route of the app's table
is walked with no key, a key outside its scope and a key inside it (so a route added later is
checked without editing this test); another key's task or lease is out of reach; a lease's
token is seen only by its taker; rate limits answer 429 with Retry-After; bodies must be JSON;
CORS answers only the origins named."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from gpulane.api.app import create_app
from gpulane.api.auth import ANY_KEY, OPEN_PATHS, OPEN_PREFIXES, scope_for
from gpulane.node import Node
from tests.integration.conftest import make_settings, node_api, route_table, stop_node

KEYS = {"tasks": "k-tasks", "leases": "k-leases", "admin": "k-admin", "tasks2": "k-tasks2",
        "leases2": "k-leases2"}
"""Key secrets by key name; each key's scope is its name (a trailing 2: a second such key)."""
ENV_KEYS = ",".join(f"{name}:{secret}:{name.rstrip('2')}" for name, secret in KEYS.items())
ORIGIN = "https://app.example"


def auth(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[name]}"}


@pytest.fixture
async def keyed(tmp_path: Path) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    node = Node(make_settings(tmp_path, keys=ENV_KEYS, cors_origins=[ORIGIN]))
    await node.start()
    app = create_app(node, manage_node=False)
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                     base_url="http://t") as api:
            yield app, api
    finally:
        await stop_node(node)


ENDLESS = {("GET", "/v1/status/stream")}
"""Routes whose answer, once let in, never ends on its own (the in-process client reads a
whole body): tests/integration/test_status_stream.py checks their keys."""


def test_the_scope_table_names_what_each_part_of_the_api_needs() -> None:
    assert scope_for("POST", "/v1/tasks") == "tasks"
    assert scope_for("GET", "/v1/tasks/x/events") == "tasks"
    assert scope_for("DELETE", "/v1/leases/x") == "leases"
    assert scope_for("POST", "/v1/admin/drain") == "admin"
    assert scope_for("GET", "/v1/admin/anything") == "admin"
    assert scope_for("GET", "/v1/gpus") == ANY_KEY
    assert scope_for("GET", "/openapi.json") == ANY_KEY
    # A prefix is a path segment, not a string prefix; a new writing route is admin's until
    # the table names it.
    assert scope_for("POST", "/v1/tasksfoo") == "admin"
    assert scope_for("POST", "/v1/presets") == "admin"


async def test_every_route_answers_401_without_a_key_403_out_of_scope_and_lets_a_scope_in(
        keyed: tuple[FastAPI, httpx.AsyncClient]) -> None:
    app, api = keyed
    routes = route_table(app)
    for route in [("POST", "/v1/tasks"), ("POST", "/v1/tasks/bulk"), ("POST", "/v1/leases"),
                  ("GET", "/v1/leases/x/events"), ("GET", "/openapi.json")]:
        assert route in routes
    for method, path in routes:
        r = await api.request(method, path, json={})
        if path in OPEN_PATHS or path.startswith(OPEN_PREFIXES):
            assert r.status_code in (200, 404), (method, path, r.text)  # /static/x: no file
            continue
        assert r.status_code == 401, (method, path, r.text)
        assert r.headers["www-authenticate"].startswith("Bearer")
        for header in ({"Authorization": "Bearer k-nobody"}, {"Authorization": "Basic k-admin"},
                       {"Authorization": KEYS["admin"]}):
            assert (await api.request(method, path, headers=header, json={})).status_code == 401
        need = scope_for(method, path)
        if (method, path) in ENDLESS:
            continue
        for name in KEYS:
            # An empty body and an unknown id: past the guard the request is refused for
            # what it says, never for who sent it.
            r = await api.request(method, path, headers=auth(name), params={"token": "1"},
                                  json={})
            inside = need in (ANY_KEY, name.rstrip("2")) or name == "admin"
            if inside:
                assert r.status_code not in (401, 403), (method, path, name, r.text)
            else:
                assert r.status_code == 403, (method, path, name, r.text)
                error = r.json()["error"]
                assert error["code"] == "forbidden" and repr(need) in error["message"]


async def test_a_wrong_method_or_an_unknown_path_is_guarded_too(
        keyed: tuple[FastAPI, httpx.AsyncClient]) -> None:
    _, api = keyed
    assert (await api.put("/v1/tasks")).status_code == 401
    assert (await api.get("/v1/nothing")).status_code == 401
    assert (await api.get("/nothing")).status_code == 401
    assert (await api.put("/v1/tasks", headers=auth("tasks"))).status_code == 405
    assert (await api.put("/v1/tasks", headers=auth("leases"))).status_code == 403
    assert (await api.get("/v1/nothing", headers=auth("leases"))).status_code == 404


async def test_a_task_records_its_key_and_only_that_key_or_admin_cancels_it(
        keyed: tuple[FastAPI, httpx.AsyncClient]) -> None:
    _, api = keyed
    task = (await api.post("/v1/tasks", headers=auth("tasks"),
                           json={"preset": "sleep", "input": {"ms": 60_000},
                                 "device": "cpu"})).json()
    assert task["submitted_by"] == "tasks"
    bulk = (await api.post("/v1/tasks/bulk", headers=auth("tasks2"),
                           json={"tasks": [{"preset": "sleep", "input": {"ms": 1}}]})).json()
    assert bulk["tasks"][0]["submitted_by"] == "tasks2"
    # Another tasks key may read it, not cancel it.
    assert (await api.get(f"/v1/tasks/{task['id']}", headers=auth("tasks2"))).status_code == 200
    foreign = await api.post(f"/v1/tasks/{task['id']}/cancel", headers=auth("tasks2"))
    assert foreign.status_code == 403, foreign.text
    assert "'tasks2'" in foreign.json()["error"]["message"]
    assert (await api.get(f"/v1/tasks/{task['id']}", headers=auth("tasks"))).json()[
        "state"] != "cancelled"
    mine = await api.post(f"/v1/tasks/{task['id']}/cancel", headers=auth("tasks"))
    assert mine.status_code == 200 and mine.json()["state"] == "cancelled"
    other = (await api.post("/v1/tasks", headers=auth("tasks2"),
                            json={"preset": "sleep", "input": {"ms": 60_000},
                                  "device": "cpu"})).json()
    by_admin = await api.post(f"/v1/tasks/{other['id']}/cancel", headers=auth("admin"))
    assert by_admin.status_code == 200 and by_admin.json()["state"] == "cancelled"
    missing = await api.post("/v1/tasks/nope/cancel", headers=auth("tasks2"))
    assert missing.status_code == 404


async def test_a_lease_token_is_seen_only_by_its_taker_who_alone_renews_and_releases(
        keyed: tuple[FastAPI, httpx.AsyncClient]) -> None:
    _, api = keyed
    got = await api.post("/v1/leases", headers=auth("leases"),
                         json={"holder": "trainer", "vram_mb": 1024, "ttl_s": 60})
    assert got.status_code == 201, got.text
    lease = got.json()
    token = lease["token"]
    assert isinstance(token, int) and lease["owner"] == "leases"

    def no_token(view: dict[str, Any]) -> None:
        assert "token" not in view, view
        assert view["holder"] == "trainer" and view["owner"] == "leases"
        assert view["devices"] == lease["devices"]

    for name in ("leases", "admin"):
        listing = (await api.get("/v1/leases", headers=auth(name))).json()["leases"]
        assert len(listing) == 1
        no_token(listing[0])
        no_token((await api.get(f"/v1/leases/{lease['id']}", headers=auth(name))).json())
    # Knowing the token is not enough: another leases key is refused, whatever it sends.
    for name in ("leases2", "tasks"):
        renew = await api.post(f"/v1/leases/{lease['id']}/renew", headers=auth(name),
                               json={"token": token})
        assert renew.status_code == 403, (name, renew.text)
        release = await api.delete(f"/v1/leases/{lease['id']}", headers=auth(name),
                                   params={"token": str(token)})
        assert release.status_code == 403, (name, release.text)
    renewed = await api.post(f"/v1/leases/{lease['id']}/renew", headers=auth("leases"),
                             json={"token": token})
    assert renewed.status_code == 200, renewed.text
    no_token(renewed.json())
    admin_renew = await api.post(f"/v1/leases/{lease['id']}/renew", headers=auth("admin"),
                                 json={"token": token})
    assert admin_renew.status_code == 200
    released = await api.delete(f"/v1/leases/{lease['id']}", headers=auth("leases"),
                                params={"token": str(token)})
    assert released.status_code == 200 and released.json()["state"] == "released"
    no_token(released.json())


@pytest.fixture
async def open_api(tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    async with node_api(tmp_path) as api:
        yield api


async def test_a_key_past_its_rate_gets_429_with_retry_after_and_others_go_on(
        tmp_path: Path) -> None:
    # A rate of one request per 1000 s: a spent bucket stays spent for the whole test.
    keys_file = tmp_path / "keys.yaml"
    keys_file.write_text(
        "keys:\n"
        "  - {name: slow, key: k-slow, scopes: [tasks], rate_per_s: 0.001, burst: 2}\n"
        "  - {name: fast, key: k-fast, scopes: [tasks]}\n")
    async with node_api(tmp_path, keys_file=keys_file) as api:
        slow = {"Authorization": "Bearer k-slow"}
        assert [(await api.get("/v1/presets", headers=slow)).status_code
                for _ in range(2)] == [200, 200]
        refused = await api.get("/v1/tasks", headers=slow)
        assert refused.status_code == 429
        assert refused.json()["error"]["code"] == "rate_limited"
        assert refused.json()["error"]["field"] == "Authorization"
        assert int(refused.headers["retry-after"]) >= 1
        # Another key has its own bucket (and no limit), and probes are never limited.
        fast = {"Authorization": "Bearer k-fast"}
        assert {(await api.get("/v1/presets", headers=fast)).status_code
                for _ in range(20)} == {200}
        assert (await api.get("/healthz")).status_code == 200
        # Without a key the 401 comes first: an unknown caller spends nobody's bucket.
        assert (await api.get("/v1/presets")).status_code == 401
        spec = (await api.get("/openapi.json", headers=fast)).json()
        assert "429" in spec["paths"]["/v1/presets"]["get"]["responses"]


async def test_with_no_keys_one_bucket_limits_everyone(tmp_path: Path) -> None:
    async with node_api(tmp_path, rate_limit_per_s=0.001, rate_burst=3) as api:
        codes = [(await api.get("/v1/gpus")).status_code for _ in range(4)]
        assert codes == [200, 200, 200, 429]
        assert (await api.get("/readyz")).status_code == 200


@pytest.mark.parametrize("headers", [
    {"Content-Type": "text/plain"},
    {"Content-Type": "application/x-www-form-urlencoded"},
    {"Content-Type": "multipart/form-data; boundary=x"},
    {},  # a body without any Content-Type
])
async def test_a_body_that_is_not_json_is_415_on_every_writing_route(
        open_api: httpx.AsyncClient, headers: dict[str, str]) -> None:
    body = b'{"holder": "page", "vram_mb": 1024, "priority": "immediate"}'
    for path in ("/v1/leases", "/v1/tasks", "/v1/tasks/bulk", "/v1/tasks/x/cancel",
                 "/v1/leases/x/renew"):
        r = await open_api.post(path, content=body, headers=headers)
        assert r.status_code == 415, (path, headers, r.text)
        assert r.json()["error"]["code"] == "unsupported_media_type"
        assert r.json()["error"]["field"] == "Content-Type"
    # Nothing was granted to the page that sent it.
    assert (await open_api.get("/v1/leases")).json()["leases"] == []


async def test_json_with_parameters_and_bodiless_calls_pass_the_media_type_check(
        open_api: httpx.AsyncClient) -> None:
    got = await open_api.post("/v1/leases", content=b'{"holder": "h", "vram_mb": 1}',
                              headers={"Content-Type": "Application/JSON; charset=utf-8"})
    assert got.status_code == 201, got.text
    # A cancel or a release carries no body and needs no Content-Type.
    assert (await open_api.post("/v1/tasks/nope/cancel")).status_code == 404
    lease = got.json()
    assert (await open_api.delete(f"/v1/leases/{lease['id']}",
                                  params={"token": str(lease["token"])})).status_code == 200


async def test_cors_answers_only_the_named_origins(
        keyed: tuple[FastAPI, httpx.AsyncClient]) -> None:
    _, api = keyed
    preflight = {"Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization, content-type"}
    # A preflight carries no credentials by design: it needs no key.
    ok = await api.options("/v1/tasks", headers={"Origin": ORIGIN, **preflight})
    assert ok.status_code == 200, ok.text
    assert ok.headers["access-control-allow-origin"] == ORIGIN
    assert "authorization" in ok.headers["access-control-allow-headers"].lower()
    other = await api.options("/v1/tasks", headers={"Origin": "https://evil.example",
                                                    **preflight})
    assert other.status_code == 400
    assert "access-control-allow-origin" not in other.headers
    real = await api.get("/v1/presets", headers={"Origin": ORIGIN, **auth("tasks")})
    assert real.status_code == 200
    assert real.headers["access-control-allow-origin"] == ORIGIN
    # The key is still needed for the request that follows the preflight.
    assert (await api.get("/v1/presets", headers={"Origin": ORIGIN})).status_code == 401


async def test_cors_is_off_unless_an_origin_is_named(open_api: httpx.AsyncClient) -> None:
    r = await open_api.options("/v1/tasks", headers={
        "Origin": ORIGIN, "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in r.headers
    got = await open_api.get("/v1/presets", headers={"Origin": ORIGIN})
    assert got.status_code == 200 and "access-control-allow-origin" not in got.headers
