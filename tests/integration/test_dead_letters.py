"""Dead letters: failed tasks are listed, and one can be queued again with fresh attempts by
its submitter or an admin (POST /v1/tasks/{id}/retry)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from tests.integration.conftest import node_api, submit, wait_done

KEYS = "alice:k-alice:tasks,bob:k-bob:tasks,ops:k-ops:admin"


def key(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


async def test_a_failed_task_is_listed_and_retried_with_fresh_attempts(
        api: httpx.AsyncClient) -> None:
    bad = await wait_done(api, (await submit(api, "sleep", {"ms": "lots"}))["id"])
    assert bad["state"] == "failed" and bad["attempts"] >= 1
    listed = (await api.get("/v1/tasks", params={"state": "failed"})).json()["tasks"]
    assert [t["id"] for t in listed] == [bad["id"]]
    r = await api.post(f"/v1/tasks/{bad['id']}/retry")
    assert r.status_code == 200, r.text
    again = r.json()
    assert again["id"] == bad["id"] and again["state"] == "queued"
    assert again["attempts"] == 0 and again["error"] is None
    done = await wait_done(api, bad["id"])
    assert done["state"] == "failed" and done["attempts"] >= 1  # the same bad input
    assert (await api.get("/v1/tasks", params={"state": "failed"})).json()["tasks"]


async def test_only_a_dead_letter_can_be_retried(api: httpx.AsyncClient) -> None:
    ok = await wait_done(api, (await submit(api, "sleep", {"ms": 0}))["id"])
    r = await api.post(f"/v1/tasks/{ok['id']}/retry")
    assert r.status_code == 409, r.text
    err = r.json()["error"]
    assert err["code"] == "not_retryable" and err["state"] == "succeeded"
    assert "failed or cancelled" in err["message"]
    r = await api.post("/v1/tasks/nope/retry")
    assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_task"


@pytest.fixture
async def keyed(tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    async with node_api(tmp_path, keys=KEYS) as api:
        yield api


async def test_a_tasks_key_retries_only_its_own_tasks(keyed: httpx.AsyncClient) -> None:
    r = await keyed.post("/v1/tasks", json={"preset": "sleep", "input": {"ms": "lots"}},
                         headers=key("k-alice"))
    assert r.status_code == 202, r.text
    tid = r.json()["id"]
    done = await keyed.get(f"/v1/tasks/{tid}/result", params={"wait": 20},
                           headers=key("k-alice"))
    assert done.json()["state"] == "failed"
    foreign = await keyed.post(f"/v1/tasks/{tid}/retry", headers=key("k-bob"))
    assert foreign.status_code == 403, foreign.text
    assert "alice" in foreign.json()["error"]["message"]
    assert (await keyed.get(f"/v1/tasks/{tid}", headers=key("k-alice"))).json()["state"] \
        == "failed"
    own = await keyed.post(f"/v1/tasks/{tid}/retry", headers=key("k-alice"))
    assert own.status_code == 200, own.text
    await keyed.get(f"/v1/tasks/{tid}/result", params={"wait": 20}, headers=key("k-alice"))
    admin = await keyed.post(f"/v1/tasks/{tid}/retry", headers=key("k-ops"))
    assert admin.status_code == 200, admin.text
    assert (await keyed.post(f"/v1/tasks/{tid}/retry")).status_code == 401


async def test_the_sdk_retries_a_dead_letter(api: httpx.AsyncClient, live_url: str) -> None:
    import asyncio

    from gpulane.client import Client
    from gpulane.errors import APIError

    bad = await wait_done(api, (await submit(api, "sleep", {"ms": "lots"}))["id"])

    def use_sdk() -> tuple[dict[str, object], dict[str, object], str]:
        with Client(live_url) as c:
            again = c.retry(bad["id"])
            done = c.result(bad["id"], wait=20)
            ok = c.run("sleep", {"ms": 0})
            assert c.drain()["draining"] is True and c.status()["draining"] is True
            assert c.resume()["draining"] is False
            try:
                c.retry(ok["id"])
            except APIError as exc:
                return again, done, exc.code
            return again, done, "no error"

    again, done, code = await asyncio.to_thread(use_sdk)
    assert again["state"] == "queued" and done["state"] == "failed"
    assert code == "not_retryable"
