"""POST /v1/tasks/results (collect many tasks' ends) and POST /v1/tasks/bulk?wait=, end to end
through the ASGI app and a real node."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest

from tests.conftest import eventually
from tests.integration.conftest import node_api, node_with_api, submit

UNKNOWN = "0" * 24


async def _results(api: httpx.AsyncClient, ids: list[str], wait: float | None = None,
                   headers: dict[str, str] | None = None) -> httpx.Response:
    params = {} if wait is None else {"wait": wait}
    return await api.post("/v1/tasks/results", params=params, json={"ids": ids},
                          headers=headers)


async def test_results_wait_for_the_first_to_end_and_name_the_others(tmp_path: Path) -> None:
    async with node_with_api(tmp_path, paused=True) as (node, api):
        a = await submit(api, "sleep", {"ms": 1})
        b = await submit(api, "sleep", {"ms": 2})
        waiter = asyncio.create_task(_results(api, [a["id"], b["id"]], wait=300))

        async def parked() -> bool:
            return node.store.notifier.waited_on(a["id"])

        await eventually(parked)
        assert not waiter.done()
        cancelled = (await api.post(f"/v1/tasks/{b['id']}/cancel")).json()
        r = await asyncio.wait_for(waiter, 10)
        assert r.status_code == 200, r.text
        assert r.json() == {"tasks": [cancelled], "pending": [a["id"]], "missing": []}
        assert not node.store.notifier.waited_on(a["id"])


async def test_results_collect_tasks_that_ran(api: httpx.AsyncClient) -> None:
    ids = [(await submit(api, "sleep", {"ms": i}))["id"] for i in range(3)]
    done: dict[str, dict[str, object]] = {}
    while len(done) < len(ids):
        r = await _results(api, [i for i in ids if i not in done], wait=30)
        assert r.status_code == 200 and r.json()["missing"] == []
        done.update({t["id"]: t for t in r.json()["tasks"]})
    assert [done[i]["output"] for i in ids] == [{"slept_ms": i} for i in range(3)]


async def test_results_answer_at_once_for_unknown_ids_in_request_order(tmp_path: Path) -> None:
    async with node_api(tmp_path, paused=True) as api:
        a = await submit(api, "sleep", {"ms": 1})
        b = await submit(api, "sleep", {"ms": 1})
        await api.post(f"/v1/tasks/{b['id']}/cancel")
        # Unknown ids answer at once (an hour's wait would hang the test otherwise), each id
        # once however often asked, final tasks in the order asked.
        r = await _results(api, [UNKNOWN, b["id"], a["id"], b["id"], UNKNOWN], wait=300)
        assert r.status_code == 200, r.text
        assert r.json() == {"tasks": [(await api.get(f"/v1/tasks/{b['id']}")).json()],
                            "pending": [a["id"]], "missing": [UNKNOWN]}
        # Nothing final and nothing unknown: as they stand once the wait passes.
        r = await _results(api, [a["id"]], wait=0.05)
        assert r.json() == {"tasks": [], "pending": [a["id"]], "missing": []}
        r = await _results(api, [a["id"]])  # no wait: at once
        assert r.json()["pending"] == [a["id"]]


async def test_results_show_any_keys_tasks_as_get_does(tmp_path: Path) -> None:
    keys = "a:k-a:tasks,b:k-b:tasks,l:k-l:leases"
    async with node_api(tmp_path, paused=True, keys=keys) as api:
        mine = await api.post("/v1/tasks", json={"preset": "sleep", "input": {}},
                              headers={"Authorization": "Bearer k-a"})
        tid = mine.json()["id"]
        as_b = await _results(api, [tid], headers={"Authorization": "Bearer k-b"})
        got = await api.get(f"/v1/tasks/{tid}", headers={"Authorization": "Bearer k-b"})
        assert as_b.status_code == got.status_code == 200
        assert as_b.json()["pending"] == [tid]
        nokey = await _results(api, [tid])
        assert nokey.status_code == 401 and nokey.json()["error"]["field"] == "Authorization"
        scope = await _results(api, [tid], headers={"Authorization": "Bearer k-l"})
        assert scope.status_code == 403 and "'tasks'" in scope.json()["error"]["message"]


@pytest.mark.parametrize(("body", "code"), [
    ({"ids": []}, "invalid_ids"),
    ({"ids": "abc"}, "invalid_ids"),
    ({}, "missing_field"),
    ({"ids": [UNKNOWN] * 1001}, "too_many_ids"),
    ({"ids": [UNKNOWN, 7]}, None),
    ({"ids": ["x" * 101]}, None),
    ([UNKNOWN], None),
])
async def test_results_refuse_a_bad_list_naming_ids(api: httpx.AsyncClient, body: object,
                                                   code: str | None) -> None:
    r = await api.post("/v1/tasks/results", json=body)
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["field"] == "body" or str(err["field"]).startswith("ids")
    if code is not None:
        assert err["code"] == code


async def test_results_refuse_a_wrong_wait_a_wrong_type_and_a_huge_body(
        tmp_path: Path) -> None:
    async with node_api(tmp_path, max_input_bytes=4096) as api:
        for wait in ("301", "-1", "soon"):
            r = await api.post("/v1/tasks/results", params={"wait": wait},
                               json={"ids": [UNKNOWN]})
            assert r.status_code == 422 and r.json()["error"]["field"] == "wait", r.text
        r = await api.post("/v1/tasks/results", content=b'{"ids": []}',
                           headers={"Content-Type": "text/plain"})
        assert r.status_code == 415 and r.json()["error"]["field"] == "Content-Type"
        r = await api.post("/v1/tasks/results", content=b"{not json",
                           headers={"Content-Type": "application/json"})
        assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_json"
        r = await _results(api, [UNKNOWN] * 1000)
        assert r.status_code == 413, r.text
        r = await api.get("/v1/tasks/results")  # a read of a task so named: unknown
        assert r.status_code == 404


async def test_bulk_wait_answers_200_once_every_task_ended(api: httpx.AsyncClient) -> None:
    r = await api.post("/v1/tasks/bulk", params={"wait": 30}, json={"tasks": [
        {"preset": "sleep", "input": {"ms": 1}}, {"preset": "sleep", "input": {"ms": 20}}]})
    assert r.status_code == 200, r.text
    assert [t["state"] for t in r.json()["tasks"]] == ["succeeded", "succeeded"]
    assert [t["output"] for t in r.json()["tasks"]] == [{"slept_ms": 1}, {"slept_ms": 20}]


async def test_bulk_wait_answers_202_with_the_tasks_as_they_stand(tmp_path: Path) -> None:
    async with node_with_api(tmp_path, paused=True) as (node, api):
        first = await submit(api, "sleep", {"ms": 1})
        await api.post(f"/v1/tasks/{first['id']}/cancel")
        r = await api.post("/v1/tasks/bulk", params={"wait": 0.05}, json={"tasks": [
            {"preset": "sleep", "input": {}}, {"preset": "sleep", "input": {}}]})
        assert r.status_code == 202
        assert [t["state"] for t in r.json()["tasks"]] == ["queued", "queued"]
        # Without ?wait= as before: 202 at once.
        r = await api.post("/v1/tasks/bulk", json={"tasks": [{"preset": "sleep"}]})
        assert r.status_code == 202 and r.json()["tasks"][0]["state"] == "queued"
        r = await api.post("/v1/tasks/bulk", params={"wait": 400},
                           json={"tasks": [{"preset": "sleep"}]})
        assert r.status_code == 422 and r.json()["error"]["field"] == "wait"
        assert node.store.notifier.waited_on(first["id"]) is False
