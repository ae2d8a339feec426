"""Bad input gets a clear JSON error naming the field and the fix; nothing crashes the node."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from starlette.applications import Starlette
from starlette.routing import Mount

from gpulane.api.app import create_app
from gpulane.node import Node
from tests.integration.conftest import make_settings, stop_node, submit, wait_done


async def _err(r: httpx.Response, status: int, code: str, field: str | None) -> str:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == code
    assert err["field"] == field
    assert err["message"]
    return str(err["message"])


async def test_unknown_preset_is_404_naming_the_known_ones(api: httpx.AsyncClient) -> None:
    msg = await _err(await api.post("/v1/tasks", json={"preset": "nope"}), 404,
                     "unknown_preset", "preset")
    assert "sleep" in msg and "echo-stream" in msg


async def test_missing_preset_is_422(api: httpx.AsyncClient) -> None:
    await _err(await api.post("/v1/tasks", json={"input": {}}), 422, "missing_field", "preset")


async def test_malformed_json_is_422(api: httpx.AsyncClient) -> None:
    r = await api.post("/v1/tasks", content=b'{"preset": "sleep",',
                       headers={"content-type": "application/json"})
    await _err(r, 422, "invalid_json", "body")


async def test_body_not_an_object_is_422(api: httpx.AsyncClient) -> None:
    await _err(await api.post("/v1/tasks", json=[1, 2]), 422, "invalid_body", "body")


@pytest.mark.parametrize("device", ["tpu", 3, ""])
async def test_unknown_device_wish_is_422(api: httpx.AsyncClient, device: object) -> None:
    msg = await _err(await api.post("/v1/tasks", json={"preset": "sleep", "device": device}),
                     422, "invalid_device", "device")
    assert "auto, gpu, cpu" in msg


@pytest.mark.parametrize("priority", [101, -1, "urgent", 5.5, True])
async def test_priority_out_of_range_is_422(api: httpx.AsyncClient, priority: object) -> None:
    msg = await _err(await api.post("/v1/tasks", json={"preset": "sleep", "priority": priority}),
                     422, "invalid_priority", "priority")
    assert "0-100" in msg


async def test_bad_timeout_is_422(api: httpx.AsyncClient) -> None:
    await _err(await api.post("/v1/tasks", json={"preset": "sleep", "timeout_s": -1}), 422,
               "invalid_timeout", "timeout_s")


async def test_gpu_wish_on_a_cpu_only_preset_is_422(api: httpx.AsyncClient) -> None:
    await _err(await api.post("/v1/tasks", json={"preset": "behave-cpu", "device": "gpu"}),
               422, "device_not_allowed", "device")


async def test_vram_larger_than_any_gpu_is_400_naming_the_largest(
        api: httpx.AsyncClient) -> None:
    r = await api.post("/v1/tasks", json={"preset": "big-or-cpu", "device": "gpu"})
    msg = await _err(r, 400, "vram_exceeds_devices", "vram_mb")
    assert "24576" in msg


async def test_unsupported_content_type_is_422(api: httpx.AsyncClient) -> None:
    r = await api.post("/v1/tasks", json={"preset": "sleep", "content_type": "image/png"})
    await _err(r, 422, "unsupported_content_type", "content_type")


async def test_bad_wait_is_422(api: httpx.AsyncClient) -> None:
    tid = (await submit(api, "sleep", {"ms": 0}))["id"]
    await _err(await api.get(f"/v1/tasks/{tid}/result", params={"wait": "soon"}), 422,
               "invalid_wait", "wait")


async def test_unknown_task_is_404(api: httpx.AsyncClient) -> None:
    for path in ("/v1/tasks/zzz", "/v1/tasks/zzz/result", "/v1/tasks/zzz/events"):
        await _err(await api.get(path), 404, "unknown_task", "id")
    await _err(await api.post("/v1/tasks/zzz/cancel"), 404, "unknown_task", "id")


async def test_bad_list_filters_are_422(api: httpx.AsyncClient) -> None:
    await _err(await api.get("/v1/tasks", params={"state": "done"}), 422, "invalid_state",
               "state")
    await _err(await api.get("/v1/tasks", params={"limit": 0}), 422, "invalid_limit", "limit")
    msg = await _err(await api.get("/v1/tasks", params={"limit": "x"}), 422, "invalid_request",
                     "limit")
    assert "1-1000" in msg  # the fix, not only pydantic's "a valid integer"


async def test_input_over_the_limit_is_413(tmp_path: Path) -> None:
    node = Node(make_settings(tmp_path, max_input_bytes=2048))
    await node.start()
    try:
        app = create_app(node, manage_node=False)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                     base_url="http://t") as api:
            r = await api.post("/v1/tasks", json={"preset": "sleep", "input": "x" * 5000})
            await _err(r, 413, "payload_too_large", "input")
            # The node is fine afterwards.
            done = await wait_done(api, (await submit(api, "sleep", {"ms": 0}))["id"])
            assert done["state"] == "succeeded"
    finally:
        await stop_node(node)


async def test_bad_input_to_a_worker_fails_only_that_task(api: httpx.AsyncClient) -> None:
    bad = await wait_done(api, (await submit(api, "sleep", {"ms": "lots"}))["id"])
    assert bad["state"] == "failed" and bad["error"]["kind"] == "bad_input"
    good = await wait_done(api, (await submit(api, "sleep", {"ms": 0}))["id"])
    assert good["state"] == "succeeded"


@pytest.fixture
async def token_api(tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    """The API of a node started with the token ``s3cret``."""
    node = Node(make_settings(tmp_path, token="s3cret"))
    await node.start()
    try:
        app = create_app(node, manage_node=False)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                     base_url="http://t") as api:
            yield api
    finally:
        await stop_node(node)


async def test_token_is_required_when_set(token_api: httpx.AsyncClient) -> None:
    await _err(await token_api.get("/v1/presets"), 401, "unauthorized", "Authorization")
    ok = await token_api.get("/v1/presets", headers={"Authorization": "Bearer s3cret"})
    assert ok.status_code == 200
    assert (await token_api.get("/healthz")).status_code == 200


async def test_a_wrong_method_is_405_naming_every_method_of_the_path(
        api: httpx.AsyncClient) -> None:
    r = await api.put("/v1/tasks")
    msg = await _err(r, 405, "method_not_allowed", None)
    assert r.headers["allow"] == "GET, POST" and "GET or POST" in msg
    r = await api.patch("/v1/leases/x")
    await _err(r, 405, "method_not_allowed", None)
    assert r.headers["allow"] == "DELETE, GET"


async def test_an_unknown_path_is_404_in_the_error_shape(api: httpx.AsyncClient) -> None:
    await _err(await api.get("/v2/tasks"), 404, "not_found", None)


async def test_bulk_items_name_their_index(api: httpx.AsyncClient) -> None:
    r = await api.post("/v1/tasks/bulk", json={"tasks": [{"preset": "sleep"},
                                                         {"preset": "sleep", "device": "tpu"}]})
    await _err(r, 422, "invalid_device", "tasks[1].device")
    await _err(await api.post("/v1/tasks/bulk", json={"tasks": [{"preset": "sleep"}, 3]}), 422,
               "invalid_body", "tasks[1]")
    await _err(await api.post("/v1/tasks/bulk", json={"tasks": []}), 422, "invalid_tasks",
               "tasks")


async def test_bulk_without_tasks_is_invalid_tasks(api: httpx.AsyncClient) -> None:
    # docs/api.md: invalid_tasks when tasks is missing, empty or not a list.
    for body in ({}, {"tasks": None}, {"tasks": {}}):
        msg = await _err(await api.post("/v1/tasks/bulk", json=body), 422, "invalid_tasks",
                         "tasks")
        assert "non-empty list" in msg


async def test_a_bulk_items_idempotency_key_must_be_a_string(api: httpx.AsyncClient) -> None:
    r = await api.post("/v1/tasks/bulk", json={"tasks": [{"preset": "sleep",
                                                          "idempotency_key": 5}]})
    msg = await _err(r, 422, "invalid_request", "tasks[0].idempotency_key")
    assert "string" in msg and "order-42" in msg


@pytest.mark.parametrize("big", ["9" * 19, "1" * 5000])
async def test_numbers_past_what_the_store_holds_are_422_not_500(
        api: httpx.AsyncClient, big: str) -> None:
    tid = (await submit(api, "sleep", {"ms": 0}))["id"]
    await wait_done(api, tid)
    await _err(await api.get("/v1/tasks", params={"cursor": big}), 422, "invalid_cursor",
               "cursor")
    await _err(await api.get(f"/v1/tasks/{tid}/events", headers={"Last-Event-ID": big}), 422,
               "invalid_last_event_id", "Last-Event-ID")
    await _err(await api.get(f"/v1/tasks/{tid}/events", params={"last_event_id": big}), 422,
               "invalid_last_event_id", "Last-Event-ID")
    # The largest the bound lets through still streams (nothing after it).
    r = await api.get(f"/v1/tasks/{tid}/events", headers={"Last-Event-ID": "9" * 18})
    assert r.status_code == 200 and r.text == ""


@pytest.mark.parametrize("given", ["\u00b2", "9" * 19, "1" * 5000])
async def test_a_lease_streams_from_the_first_event_on_an_unusable_last_event_id(
        api: httpx.AsyncClient, given: str) -> None:
    grant = (await api.post("/v1/leases", json={"holder": "t", "vram_mb": 10})).json()
    await api.delete(f"/v1/leases/{grant['id']}", params={"token": grant["token"]})
    r = await api.get(f"/v1/leases/{grant['id']}/events",
                      headers={"Last-Event-ID": given.encode("latin-1")})
    assert r.status_code == 200, r.text
    assert r.text.startswith("id: 1\n")


async def test_a_token_that_is_not_ascii_is_401_not_500(token_api: httpx.AsyncClient) -> None:
    for given in ("Bearer s3cr\u00e9t".encode(), b"Bearer \xff"):
        r = await token_api.get("/v1/presets", headers={"Authorization": given})
        await _err(r, 401, "unauthorized", "Authorization")


JSON_TYPE = {"Content-Type": "application/json"}


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


async def test_an_input_too_deep_to_write_is_422_not_500(api: httpx.AsyncClient) -> None:
    # orjson reads 1024 levels but writes 254, and a page of tasks writes an input three
    # levels down ({"tasks": [{"input": ...}]}): an input may be 251 levels deep.
    ok = await api.post("/v1/tasks", content=f'{{"preset":"sleep","input":{_nested(251)}}}',
                        headers=JSON_TYPE)
    assert ok.status_code == 202, ok.text
    page = await api.get("/v1/tasks", params={"limit": 1})
    assert page.status_code == 200 and page.json()["tasks"][0]["id"] == ok.json()["id"]
    for body in (f'{{"preset":"sleep","input":{_nested(252)}}}',
                 f'{{"tasks":[{{"preset":"sleep","input":{_nested(250)}}}]}}'):
        path = "/v1/tasks/bulk" if "tasks" in body else "/v1/tasks"
        msg = await _err(await api.post(path, content=body, headers=JSON_TYPE), 422,
                         "invalid_json", "body")
        assert "252 levels" in msg


async def test_a_mounted_apps_405_still_names_the_methods(node: Node) -> None:
    outer = Starlette(routes=[Mount("/api", app=create_app(node, manage_node=False))])
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=outer),
                                 base_url="http://t") as api:
        r = await api.put("/api/v1/tasks")
        msg = await _err(r, 405, "method_not_allowed", None)
        assert r.headers["allow"] == "GET, POST" and "GET or POST" in msg
