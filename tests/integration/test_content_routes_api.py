"""Content-type routing through the API: a submit with a content_type and no preset goes to
the preset its type is routed to; 415 no_route; GET /v1/routes; bulk items routed one by one;
a reload that would leave a route pointing nowhere is refused (issue 13, item 2)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from tests.integration.conftest import node_api

ROUTED = [{"content_type": "image/png", "preset": "sleep"},
          {"content_type": "text/plain", "preset": "embed"},
          {"content_type": "image/*", "preset": "faces"}]


def presets_dir(tmp_path: Path, routes: str) -> Path:
    folder = tmp_path / "presets"
    folder.mkdir(exist_ok=True)
    (folder / "sleepy.yaml").write_text(
        "presets:\n  - name: sleep\n    argv: [python, -c, pass]\n"
        "    accepts: [application/json, image/png]\n")
    (folder / "routes.yaml").write_text(routes)
    return folder


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    # The examples' routes (image/* -> faces, text/plain -> embed) and one more; paused, so
    # that nothing runs: these tests are about where a task goes.
    folder = presets_dir(tmp_path, "routes:\n  image/png: sleep\n")
    async with node_api(tmp_path, paused=True, presets=[str(folder)]) as client:
        yield client


async def test_get_routes_lists_them_most_specific_first(api: httpx.AsyncClient) -> None:
    r = await api.get("/v1/routes")
    assert r.status_code == 200
    assert r.json() == {"routes": ROUTED}


@pytest.mark.parametrize(("content_type", "preset"), [
    ("image/png", "sleep"), ("IMAGE/PNG; q=1", "sleep"), ("image/jpeg", "faces"),
    ("text/plain; charset=utf-8", "embed")])
async def test_a_submit_without_preset_is_routed(api: httpx.AsyncClient, content_type: str,
                                                 preset: str) -> None:
    r = await api.post("/v1/tasks", json={"input": {"text": "hi"},
                                          "content_type": content_type})
    assert r.status_code == 202, r.text
    assert r.json()["preset"] == preset
    assert r.json()["content_type"] == content_type


async def test_an_unknown_type_is_415_no_route_listing_the_routes(
        api: httpx.AsyncClient) -> None:
    r = await api.post("/v1/tasks", json={"input": {}, "content_type": "audio/wav"})
    assert r.status_code == 415
    err = r.json()["error"]
    assert err["code"] == "no_route" and err["field"] == "content_type"
    assert "audio/wav" in err["message"] and "image/*" in err["message"]
    assert "name the preset" in err["message"]
    assert err["routes"] == ROUTED
    assert (await api.get("/v1/tasks")).json()["tasks"] == []  # nothing stored


async def test_a_named_preset_is_not_routed_and_its_accepts_take_wildcards(
        api: httpx.AsyncClient) -> None:
    ok = await api.post("/v1/tasks", json={"preset": "faces", "content_type": "image/gif"})
    assert ok.status_code == 202 and ok.json()["preset"] == "faces"
    bad = await api.post("/v1/tasks", json={"preset": "faces", "content_type": "text/plain"})
    assert bad.status_code == 422
    assert bad.json()["error"]["code"] == "unsupported_content_type"
    assert "image/*" in bad.json()["error"]["message"]


@pytest.mark.parametrize("content_type", ["*/*", "image/*", "png", "", "image/png/x"])
async def test_a_task_s_content_type_names_one_type(api: httpx.AsyncClient,
                                                    content_type: str) -> None:
    """A wildcard or a word without a slash is no type: image/* matched the image/* route and
    "png" a */* route, each routed as if it said what it is."""
    r = await api.post("/v1/tasks", json={"preset": "faces", "content_type": content_type})
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert (err["code"], err["field"]) == ("unsupported_content_type", "content_type")
    assert "no wildcard" in err["message"]
    ok = await api.post("/v1/tasks", json={"content_type": "Image/PNG; q=1"})
    assert ok.status_code == 202 and ok.json()["content_type"] == "Image/PNG; q=1"


async def test_neither_preset_nor_content_type_is_a_clear_422(api: httpx.AsyncClient) -> None:
    r = await api.post("/v1/tasks", json={"input": {}})
    assert r.status_code == 422
    err = r.json()["error"]
    assert err["code"] == "missing_field" and err["field"] == "preset"
    assert "give content_type" in err["message"] and "GET /v1/routes" in err["message"]


async def test_bulk_items_are_routed_one_by_one(api: httpx.AsyncClient) -> None:
    r = await api.post("/v1/tasks/bulk", json={"tasks": [
        {"content_type": "image/png"}, {"content_type": "text/plain"},
        {"preset": "sleep", "input": {}}]})
    assert r.status_code == 202, r.text
    assert [t["preset"] for t in r.json()["tasks"]] == ["sleep", "embed", "sleep"]
    bad = await api.post("/v1/tasks/bulk", json={"tasks": [
        {"content_type": "image/png"}, {"content_type": "video/mp4"}]})
    assert bad.status_code == 415
    assert bad.json()["error"]["field"] == "tasks[1].content_type"
    missing = await api.post("/v1/tasks/bulk", json={"tasks": [{"input": {}}]})
    assert missing.status_code == 422 and missing.json()["error"]["field"] == "tasks[0].preset"


async def test_reload_reloads_routes_and_refuses_one_pointing_nowhere(tmp_path: Path) -> None:
    folder = presets_dir(tmp_path, "routes:\n  image/png: sleep\n")
    async with node_api(tmp_path, paused=True, presets=[str(folder)]) as api:
        (folder / "routes.yaml").write_text("routes:\n  image/png: sleeep\n")
        r = await api.post("/v1/admin/presets/reload")
        assert r.status_code == 422
        (problem,) = r.json()["error"]["problems"]
        assert problem.startswith(f"{folder / 'routes.yaml'}:2: route 'image/png': preset "
                                  "'sleeep' is not known; fix: did you mean 'sleep'?")
        assert (await api.get("/v1/routes")).json() == {"routes": ROUTED}  # unchanged
        (folder / "routes.yaml").write_text('routes:\n  "audio/*": sleep\n')
        (folder / "sleepy.yaml").write_text(
            "presets:\n  - name: sleep\n    argv: [python, -c, pass]\n"
            "    accepts: [\"audio/*\"]\n")
        assert (await api.post("/v1/admin/presets/reload")).status_code == 200
        routes = (await api.get("/v1/routes")).json()["routes"]
        assert {"content_type": "audio/*", "preset": "sleep"} in routes
        assert {"content_type": "image/png", "preset": "sleep"} not in routes
        r = await api.post("/v1/tasks", json={"content_type": "audio/wav"})
        assert r.status_code == 202 and r.json()["preset"] == "sleep"
