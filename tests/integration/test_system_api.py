"""Presets, GPUs, workers, health, readiness and the OpenAPI document."""

from __future__ import annotations

import httpx

from tests.integration.conftest import submit, wait_done


async def test_presets_lists_examples_and_test_presets(api: httpx.AsyncClient) -> None:
    names = {p["name"] for p in (await api.get("/v1/presets")).json()["presets"]}
    assert {"sleep", "echo-stream", "loading-test", "behave"} <= names


async def test_gpus_say_they_are_simulated_and_why(api: httpx.AsyncClient) -> None:
    body = (await api.get("/v1/gpus")).json()
    assert body["simulated"] is True and body["provider"] == "simulated"
    assert "simulated" in body["reason"]
    assert [d["total_vram_mb"] for d in body["devices"]] == [24576, 24576]
    assert body["cpu"]["concurrency"] == 2


async def test_gpus_show_what_gpulane_placed(api: httpx.AsyncClient) -> None:
    done = await wait_done(api, (await submit(api, "behave", {"action": "ok"}))["id"])
    index = int(done["placement"]["device"].split(":")[1])
    dev = (await api.get("/v1/gpus")).json()["devices"][index]
    assert dev["declared_vram_mb"] >= 1024
    assert any(h["holder"].startswith("behave-") for h in dev["holders"])


async def test_workers_view(api: httpx.AsyncClient) -> None:
    await wait_done(api, (await submit(api, "sleep", {"ms": 0}))["id"])
    workers = (await api.get("/v1/workers")).json()["workers"]
    w = next(w for w in workers if w["preset"] == "sleep")
    assert w["mode"] == "session" and w["pid"] and w["tasks_done"] >= 1


async def test_health_and_readiness(api: httpx.AsyncClient) -> None:
    assert (await api.get("/healthz")).json()["status"] == "ok"
    ready = (await api.get("/readyz")).json()
    assert ready["status"] == "ready" and "queued" in ready


async def test_openapi_and_docs(api: httpx.AsyncClient) -> None:
    spec = (await api.get("/openapi.json")).json()
    assert "/v1/tasks" in spec["paths"] and "/v1/tasks/{task_id}/events" in spec["paths"]
    body = spec["paths"]["/v1/tasks"]["post"]["requestBody"]
    ref = body["content"]["application/json"]["schema"]["$ref"]  # a component, shared by bulk
    submit = spec["components"]["schemas"][ref.rsplit("/", 1)[-1]]
    assert "preset" in submit["properties"]
    assert submit["properties"]["timeout_s"]["anyOf"][0]["maximum"] == 604800
    bulk = spec["paths"]["/v1/tasks/bulk"]["post"]["requestBody"]["content"]
    items = spec["components"]["schemas"]["BulkSubmit"]["properties"]["tasks"]["items"]
    assert bulk["application/json"]["schema"]["$ref"].endswith("/BulkSubmit")
    assert items["$ref"] == ref  # resolves (it was an unresolvable #/$defs/TaskSubmit)
    assert (await api.get("/docs")).status_code == 200
