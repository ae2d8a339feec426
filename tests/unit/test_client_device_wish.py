"""The SDK's device wish and routing: gpu= as ?gpu=, fallback= in the body (or run's local
fallback when it is a callable), submits without a preset, routes() (issue 13)."""

from __future__ import annotations

import httpx

from tests.unit.test_client import Recorder, aclient, client, task


def test_gpu_goes_as_the_query_and_fallback_in_the_body() -> None:
    rec = Recorder(httpx.Response(202, json=task()))
    with client(rec) as c:
        c.submit("echo", {"x": 1}, gpu=False)
        c.submit("echo", {"x": 1}, gpu=True, fallback=False)
        c.submit("echo", {"x": 1})
    assert rec.requests[0].url.params["gpu"] == "false"
    assert "fallback" not in rec.body(0) and rec.body(0)["device"] == "auto"
    assert rec.requests[1].url.params["gpu"] == "true"
    assert rec.body(1)["fallback"] is False
    assert "gpu" not in rec.requests[2].url.params and "fallback" not in rec.body(2)


def test_a_submit_without_preset_sends_the_content_type_to_route_by() -> None:
    rec = Recorder(httpx.Response(202, json=task()))
    with client(rec) as c:
        c.submit(input={"image_b64": "..."}, content_type="image/png")
    assert "preset" not in rec.body()
    assert rec.body()["content_type"] == "image/png"


def test_run_takes_a_bool_fallback_as_the_servers_and_a_callable_as_its_own() -> None:
    rec = Recorder(httpx.Response(200, json=task("succeeded", output={"ok": 1})))
    with client(rec) as c:
        assert c.run("echo", 1, fallback=False, gpu=True)["output"] == {"ok": 1}
        assert c.run("echo", 1, fallback=lambda: "local")["output"] == {"ok": 1}
    assert rec.body(0)["fallback"] is False
    assert rec.requests[0].url.params["gpu"] == "true"
    assert "fallback" not in rec.body(1)


def test_run_serves_a_callable_fallback_when_the_server_is_away() -> None:
    rec = Recorder(httpx.ConnectError("refused"))
    with client(rec) as c:
        answer = c.run("echo", 1, fallback=lambda: "local")
    assert answer["output"] == "local" and answer["id"] is None


def test_submit_many_applies_gpu_to_every_item() -> None:
    rec = Recorder(httpx.Response(202, json={"tasks": [task(), task(id="t2")]}))
    with client(rec) as c:
        c.submit_many([{"preset": "echo"}, {"content_type": "text/plain", "fallback": False}],
                      gpu=False)
    assert rec.requests[0].url.params["gpu"] == "false"
    assert rec.body()["tasks"][1]["fallback"] is False


def test_routes() -> None:
    routes = {"routes": [{"content_type": "image/*", "preset": "faces"}]}
    rec = Recorder(httpx.Response(200, json=routes))
    with client(rec) as c:
        assert c.routes() == routes
    assert (rec.requests[0].method, rec.requests[0].url.path) == ("GET", "/v1/routes")


async def test_the_async_client_speaks_the_same() -> None:
    routes = {"routes": []}
    rec = Recorder(httpx.Response(200, json=task("succeeded", tasks=[task()])))
    async with aclient(rec) as c:
        await c.submit(input={}, content_type="text/plain", gpu=False, fallback=True)
        await c.run("echo", 1, fallback=False)
        await c.submit_many([{"preset": "echo"}], gpu=True)
    assert rec.requests[0].url.params["gpu"] == "false"
    assert rec.body(0)["fallback"] is True and "preset" not in rec.body(0)
    assert rec.body(1)["fallback"] is False
    assert rec.requests[2].url.params["gpu"] == "true"
    rec = Recorder(httpx.Response(200, json=routes))
    async with aclient(rec) as c:
        assert await c.routes() == routes
