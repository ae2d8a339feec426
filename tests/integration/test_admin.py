"""Admin: drain and resume a node, reload its presets, and the status view."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from gpulane.model import TaskSpec
from gpulane.node import Node
from tests.conftest import eventually
from tests.integration.conftest import node_api, submit, wait_done

SLEEP_WORKER = Path(__file__).parents[2] / "examples" / "presets" / "workers" / "sleep_worker.py"


async def test_drain_refuses_submits_holds_the_queue_and_resume_lets_it_go(
        node: Node, api: httpx.AsyncClient) -> None:
    running = await submit(api, "sleep", {"ms": 300})
    await eventually(lambda: _state(api, running["id"], "running"))
    keyed = await api.post("/v1/tasks", json={"preset": "sleep", "input": {"ms": 0}},
                           headers={"Idempotency-Key": "before-the-drain"})
    r = await api.post("/v1/admin/drain")
    assert r.status_code == 200 and r.json()["draining"] is True
    # Submits are refused with a way back; readiness says why.
    refused = await api.post("/v1/tasks", json={"preset": "sleep", "input": {"ms": 0}})
    assert refused.status_code == 503, refused.text
    assert refused.json()["error"]["code"] == "draining"
    assert int(refused.headers["Retry-After"]) >= 1
    bulk = await api.post("/v1/tasks/bulk", json={"tasks": [{"preset": "sleep"}]})
    assert bulk.status_code == 503
    # A repeat of a submit taken before the drain still gets its task.
    again = await api.post("/v1/tasks", json={"preset": "sleep", "input": {"ms": 0}},
                           headers={"Idempotency-Key": "before-the-drain"})
    assert again.status_code in (200, 202) and again.json()["id"] == keyed.json()["id"]
    ready = await api.get("/readyz")
    assert ready.status_code == 503 and ready.json()["status"] == "draining"
    # Running work finishes.
    assert (await wait_done(api, running["id"]))["state"] == "succeeded"
    # Queued work waits: a task already in the store is not started while draining.
    held, _ = await node.store.submit(TaskSpec(preset="sleep", input={"ms": 0}))
    passes = node.scheduler.passes
    await eventually(lambda: _passes_since(node, passes, 3))
    assert (await api.get(f"/v1/tasks/{held.id}")).json()["state"] == "queued"
    r = await api.post("/v1/admin/resume")
    assert r.status_code == 200 and r.json()["draining"] is False
    assert (await wait_done(api, held.id))["state"] == "succeeded"
    assert (await api.get("/readyz")).status_code == 200
    await wait_done(api, (await submit(api, "sleep", {"ms": 0}))["id"])


async def _state(api: httpx.AsyncClient, task_id: str, state: str) -> bool:
    return bool((await api.get(f"/v1/tasks/{task_id}")).json()["state"] == state)


async def _passes_since(node: Node, passes: int, n: int) -> bool:
    node.scheduler.wake()
    return node.scheduler.passes >= passes + n


async def test_status_shows_each_queue_against_its_limit(api: httpx.AsyncClient) -> None:
    await wait_done(api, (await submit(api, "sleep", {"ms": 0}))["id"])
    status = (await api.get("/v1/status")).json()
    assert status["draining"] is False and status["started"] is True
    assert status["node"] and status["queued"] == 0
    sleep = status["presets"]["sleep"]
    assert sleep["queued"] == 0 and sleep["max_queued"] >= 1
    assert "drain_per_s" in sleep
    retention = status["housekeeping"]["retention"]
    assert {"last_purge_at", "total", "db_bytes"} <= retention.keys()


def _preset(name: str, **fields: Any) -> str:
    extra = "".join(f"    {k}: {v}\n" for k, v in fields.items())
    return (f"  - name: {name}\n    argv: [python, {SLEEP_WORKER}]\n    devices: [cpu]\n"
            f"{extra}")


@pytest.fixture
async def reloadable(tmp_path: Path) -> AsyncIterator[tuple[Path, httpx.AsyncClient]]:
    file = tmp_path / "presets.yaml"
    file.write_text("presets:\n" + _preset("a"))
    async with node_api(tmp_path, presets=[str(file)], examples=False) as api:
        yield file, api


async def _names(api: httpx.AsyncClient) -> list[str]:
    return sorted(p["name"] for p in (await api.get("/v1/presets")).json()["presets"])


async def test_reload_adds_changes_and_removes_presets(
        reloadable: tuple[Path, httpx.AsyncClient]) -> None:
    file, api = reloadable
    done = await wait_done(api, (await submit(api, "a", {"ms": 0}))["id"])
    worker = done["placement"]
    live = [w["id"] for w in (await api.get("/v1/workers")).json()["workers"]]
    assert len(live) == 1 and worker is not None
    file.write_text("presets:\n" + _preset("a", timeout_s=30) + _preset("b"))
    r = await api.post("/v1/admin/presets/reload")
    assert r.status_code == 200, r.text
    assert r.json() == {"added": ["b"], "changed": ["a"], "removed": [],
                        "retired_workers": live}
    assert await _names(api) == ["a", "b"]

    async def retired() -> bool:
        workers = (await api.get("/v1/workers")).json()["workers"]
        return not any(w["id"] in live for w in workers)

    await eventually(retired)
    # The changed preset runs on a fresh worker.
    assert (await wait_done(api, (await submit(api, "a", {"ms": 0}))["id"]))["state"] \
        == "succeeded"
    file.write_text("presets:\n" + _preset("a", timeout_s=30))
    r = await api.post("/v1/admin/presets/reload")
    assert r.json()["removed"] == ["b"] and r.json()["changed"] == []
    assert (await api.post("/v1/tasks", json={"preset": "b"})).status_code == 404


async def test_a_broken_file_is_422_listing_problems_and_keeps_the_presets(
        reloadable: tuple[Path, httpx.AsyncClient]) -> None:
    file, api = reloadable
    file.write_text("presets:\n" + _preset("a", max_queued=0) + _preset("c", gpus="many"))
    r = await api.post("/v1/admin/presets/reload")
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["code"] == "invalid_presets" and err["field"] == "presets"
    assert len(err["problems"]) == 2
    assert any("max_queued" in p and "presets.yaml:" in p for p in err["problems"])
    assert await _names(api) == ["a"]
    assert (await wait_done(api, (await submit(api, "a", {"ms": 0}))["id"]))["state"] \
        == "succeeded"
