"""The device wish in every spelling through the API: the body's device, ?gpu=true|false on
single and bulk submits, the body's fallback, their conflicts, and one idempotency hash for
the same request in two spellings (issue 13, item 1)."""

from __future__ import annotations

import httpx
import pytest

from gpulane.node import Node
from tests.integration.conftest import submit, wait_done


async def test_gpu_false_runs_on_the_cpu_of_a_node_with_gpus(api: httpx.AsyncClient) -> None:
    # The first bug: POST /v1/tasks?gpu=false ran on gpu:0.
    r = await api.post("/v1/tasks", params={"gpu": "false"},
                       json={"preset": "sleep", "input": {"ms": 1}})
    assert r.status_code == 202, r.text
    assert r.json()["device_wish"] == "cpu" and r.json()["lane"] == "cpu"
    done = await wait_done(api, r.json()["id"])
    assert done["state"] == "succeeded"
    assert done["placement"]["device"] == "cpu"
    assert done["placement"]["fallback_reason"] is None  # asked for, not a fallback


async def test_gpu_true_is_device_gpu(api: httpx.AsyncClient) -> None:
    r = await api.post("/v1/tasks", params={"gpu": "True"},
                       json={"preset": "sleep", "input": {"ms": 1}})
    assert r.status_code == 202, r.text
    assert r.json()["device_wish"] == "gpu"
    done = await wait_done(api, r.json()["id"])
    assert done["placement"]["device"].startswith("gpu:")


async def test_a_body_auto_leaves_the_choice_to_the_query(api: httpx.AsyncClient) -> None:
    r = await api.post("/v1/tasks", params={"gpu": "false"},
                       json={"preset": "sleep", "input": {"ms": 1}, "device": "auto"})
    assert r.status_code == 202 and r.json()["device_wish"] == "cpu"
    agree = await api.post("/v1/tasks", params={"gpu": "true"},
                           json={"preset": "sleep", "input": {"ms": 1}, "device": "gpu"})
    assert agree.status_code == 202 and agree.json()["device_wish"] == "gpu"


@pytest.mark.parametrize(("device", "gpu"), [("gpu", "false"), ("cpu", "true")])
async def test_a_device_that_disagrees_with_the_query_is_a_422_naming_both(
        api: httpx.AsyncClient, device: str, gpu: str) -> None:
    r = await api.post("/v1/tasks", params={"gpu": gpu},
                       json={"preset": "sleep", "input": {}, "device": device})
    assert r.status_code == 422
    err = r.json()["error"]
    assert err["code"] == "conflicting_device" and err["field"] == "device"
    assert f"device='{device}'" in err["message"] and f"?gpu={gpu}" in err["message"]
    assert "send only one of them" in err["message"]


@pytest.mark.parametrize("value", ["yes", "1", "", "on"])
async def test_gpu_takes_true_or_false_only(api: httpx.AsyncClient, value: str) -> None:
    r = await api.post("/v1/tasks", params={"gpu": value}, json={"preset": "sleep"})
    assert r.status_code == 422
    err = r.json()["error"]
    assert err["code"] == "invalid_gpu" and err["field"] == "gpu"
    assert "must be true or false" in err["message"]


@pytest.mark.parametrize("path", ["/v1/tasks", "/v1/tasks/bulk"])
async def test_gpu_given_twice_must_agree(api: httpx.AsyncClient, path: str) -> None:
    """FastAPI keeps the last of repeated query values: ?gpu=true&gpu=false ran on the CPU."""
    body = {"preset": "sleep"} if path == "/v1/tasks" else {"tasks": [{"preset": "sleep"}]}
    r = await api.post(f"{path}?gpu=true&gpu=false", json=body)
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert (err["code"], err["field"]) == ("conflicting_device", "gpu")
    assert "send it once" in err["message"]
    same = await api.post(f"{path}?gpu=true&gpu=TRUE", json=body)
    assert same.status_code == 202, same.text


@pytest.mark.parametrize("value", ["yes", "false", 0, None])
async def test_fallback_takes_booleans_only(api: httpx.AsyncClient, value: object) -> None:
    r = await api.post("/v1/tasks", json={"preset": "sleep", "fallback": value})
    if value is None:  # JSON null: left out
        assert r.status_code == 202, r.text
        return
    assert r.status_code == 422
    err = r.json()["error"]
    assert err["code"] == "invalid_fallback" and err["field"] == "fallback"
    assert "must be true or false" in err["message"]


async def test_fallback_false_is_a_gpu_or_nothing(api: httpx.AsyncClient, node: Node) -> None:
    r = await api.post("/v1/tasks", json={"preset": "sleep", "input": {"ms": 1},
                                          "fallback": False})
    assert r.status_code == 202 and r.json()["device_wish"] == "gpu"
    # A CPU-only preset just runs on the CPU.
    cpu = await api.post("/v1/tasks", json={"preset": "behave-cpu", "input": {"action": "ok"},
                                            "fallback": False})
    assert cpu.status_code == 202 and cpu.json()["device_wish"] == "auto"
    assert cpu.json()["lane"] == "cpu"
    # A preset no GPU can hold is refused, where auto would have fallen back.
    assert (await submit(api, "big-or-cpu", {}))["lane"] == "cpu"
    big = await api.post("/v1/tasks", json={"preset": "big-or-cpu", "fallback": False})
    assert big.status_code == 400 and big.json()["error"]["code"] == "vram_exceeds_devices"


@pytest.mark.parametrize(("body", "query", "named"), [
    ({"device": "cpu", "fallback": False}, {}, "device='cpu'"),
    ({"fallback": False}, {"gpu": "false"}, "?gpu=false"),
    ({"device": "gpu", "fallback": True}, {}, "device='gpu'"),
    ({"fallback": True}, {"gpu": "true"}, "?gpu=true"),
])
async def test_fallback_that_contradicts_the_device_is_a_422_naming_both(
        api: httpx.AsyncClient, body: dict[str, object], query: dict[str, str],
        named: str) -> None:
    r = await api.post("/v1/tasks", params=query, json={"preset": "sleep", **body})
    assert r.status_code == 422
    err = r.json()["error"]
    assert err["code"] == "conflicting_fallback" and err["field"] == "fallback"
    assert f"fallback={str(body['fallback']).lower()}" in err["message"]
    assert named in err["message"]


@pytest.mark.parametrize(("first", "second"), [
    (({"device": "gpu"}, {}), ({}, {"gpu": "true"})),
    (({"device": "cpu"}, {}), ({"device": "auto"}, {"gpu": "false"})),
    (({"device": "gpu"}, {}), ({"fallback": False}, {})),
])
async def test_two_spellings_of_one_wish_are_one_task(
        api: httpx.AsyncClient, first: tuple[dict[str, object], dict[str, str]],
        second: tuple[dict[str, object], dict[str, str]]) -> None:
    ids = []
    for body, query in (first, second):
        r = await api.post("/v1/tasks", params=query, headers={"Idempotency-Key": "k1"},
                           json={"preset": "sleep", "input": {"ms": 1}, **body})
        assert r.status_code in (200, 202), r.text
        ids.append(r.json()["id"])
    assert ids[0] == ids[1]
    other = await api.post("/v1/tasks", headers={"Idempotency-Key": "k1"},
                           json={"preset": "sleep", "input": {"ms": 1}})
    assert other.status_code == 409  # auto is another wish


async def test_bulk_applies_gpu_to_every_item(api: httpx.AsyncClient) -> None:
    r = await api.post("/v1/tasks/bulk", params={"gpu": "false"}, json={"tasks": [
        {"preset": "sleep", "input": {"ms": 1}}, {"preset": "sleep", "input": {"ms": 1}}]})
    assert r.status_code == 202, r.text
    assert [t["device_wish"] for t in r.json()["tasks"]] == ["cpu", "cpu"]
    bad = await api.post("/v1/tasks/bulk", params={"gpu": "false"}, json={"tasks": [
        {"preset": "sleep"}, {"preset": "sleep", "device": "gpu"}]})
    assert bad.status_code == 422
    assert bad.json()["error"]["code"] == "conflicting_device"
    assert bad.json()["error"]["field"] == "tasks[1].device"


async def test_an_open_gpu_circuit_sends_auto_tasks_to_the_cpu(
        api: httpx.AsyncClient, node: Node) -> None:
    circuit = node.supervisor.circuit("sleep", "gpu")
    for _ in range(circuit.threshold):
        circuit.failed("CUDA error: no kernel image")
    task = await submit(api, "sleep", {"ms": 1})
    assert (task["lane"], task["fallback_reason"]) == ("cpu", "gpu_unavailable")
    done = await wait_done(api, task["id"])
    assert done["placement"] == {"node": node.name, "device": "cpu",
                                 "fallback_reason": "gpu_unavailable"}
    strict = await submit(api, "sleep", {"ms": 1}, device="gpu")
    assert (strict["lane"], strict["fallback_reason"]) == ("gpu", None)
    circuit.open_until = 0.0  # the cooldown is over: half-open, back to the GPU
    back = await submit(api, "sleep", {"ms": 1})
    assert (back["lane"], back["fallback_reason"]) == ("gpu", None)


async def test_the_openapi_document_shows_the_spellings(api: httpx.AsyncClient) -> None:
    doc = (await api.get("/openapi.json")).json()
    for path in ("/v1/tasks", "/v1/tasks/bulk"):
        params = {p["name"]: p for p in doc["paths"][path]["post"]["parameters"]}
        assert "gpu" in params and "true" in params["gpu"]["description"]
        assert "415" in doc["paths"][path]["post"]["responses"]
    fields = doc["components"]["schemas"]["TaskSubmit"]["properties"]
    assert "fallback" in fields and "GPU or nothing" in fields["fallback"]["description"]
    assert "preset" not in doc["components"]["schemas"]["TaskSubmit"].get("required", [])
    assert "/v1/routes" in doc["paths"]
