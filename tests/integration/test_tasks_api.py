"""The task API end to end through the ASGI app and a real node with real worker processes."""

from __future__ import annotations

import asyncio

import httpx

from gpulane.node import Node
from tests.conftest import eventually
from tests.integration.conftest import submit, wait_done


async def test_sleep_task_runs_on_a_simulated_gpu(api: httpx.AsyncClient) -> None:
    task = await submit(api, "sleep", {"ms": 5})
    assert task["state"] in ("queued", "running")
    assert task["priority"] == 50 and task["device_wish"] == "auto"
    done = await wait_done(api, task["id"])
    assert done["state"] == "succeeded"
    assert done["output"] == {"slept_ms": 5}
    assert done["attempts"] == 1
    assert done["placement"]["device"].startswith("gpu:")
    assert done["started_at"] >= done["created_at"] and done["finished_at"] >= done["started_at"]


async def test_submit_with_wait_answers_the_final_task(api: httpx.AsyncClient) -> None:
    r = await api.post("/v1/tasks", params={"wait": 10},
                       json={"preset": "sleep", "input": {"ms": 0}})
    assert r.status_code == 200
    assert r.json()["state"] == "succeeded"


async def test_loading_test_plain_protocol_worker_runs_unchanged(api: httpx.AsyncClient) -> None:
    task = await submit(api, "loading-test", {"delay_ms": 1})
    done = await wait_done(api, task["id"])
    assert done["state"] == "succeeded", done
    assert done["output"] == {"text": "step1 step2 step3"}
    events = (await api.get(f"/v1/tasks/{task['id']}/events")).text
    for kind in ("connection", "worker", "text_delta", "text", "finish"):
        assert f"event: {kind}\n" in events


async def test_echo_stream_streams_deltas(api: httpx.AsyncClient) -> None:
    task = await submit(api, "echo-stream", {"text": "a b c"})
    done = await wait_done(api, task["id"])
    assert done["output"] == {"text": "a b c"}
    body = (await api.get(f"/v1/tasks/{task['id']}/events")).text
    assert body.count("event: text_delta\n") == 3


async def test_worker_gets_its_environment(api: httpx.AsyncClient) -> None:
    done = await wait_done(api, (await submit(api, "behave", {"action": "env"}))["id"])
    env = done["output"]
    assert env["MODEL_NAME"] == "behave" and env["MODEL_PATH"] == "/models/behave"
    assert env["GPU_DEVICE"] == "cuda:0" and env["EXTRA"] == "from-preset"
    assert env["CUDA_VISIBLE_DEVICES"] == done["placement"]["device"].split(":")[1]
    assert env["GPULANE_MODE"] == "session"


async def test_cpu_wish_runs_on_the_cpu_with_empty_cuda_devices(api: httpx.AsyncClient) -> None:
    done = await wait_done(api, (await submit(api, "behave", {"action": "env"},
                                              device="cpu"))["id"])
    assert done["placement"]["device"] == "cpu"
    assert done["output"]["GPU_DEVICE"] == "cpu"
    assert done["output"]["CUDA_VISIBLE_DEVICES"] == ""


async def test_auto_falls_back_to_cpu_with_a_recorded_reason(api: httpx.AsyncClient) -> None:
    done = await wait_done(api, (await submit(api, "big-or-cpu", {"action": "ok"}))["id"])
    assert done["placement"] == {"node": done["placement"]["node"], "device": "cpu",
                                 "fallback_reason": "vram_exceeds_largest_gpu"}


async def test_worker_reported_failure_is_final(api: httpx.AsyncClient) -> None:
    done = await wait_done(api, (await submit(api, "behave", {"action": "fail"}))["id"])
    assert done["state"] == "failed"
    assert done["error"]["kind"] == "bad_input" and done["attempts"] == 1


async def test_dead_worker_is_retried_then_fails_with_stderr(api: httpx.AsyncClient) -> None:
    done = await wait_done(api, (await submit(api, "behave", {"action": "die"}))["id"])
    assert done["state"] == "failed"
    assert done["attempts"] == 2  # the preset's max_attempts
    assert done["error"]["kind"] == "worker_died"
    assert "dying as asked" in done["error"]["message"]


async def test_flaky_worker_succeeds_on_the_second_attempt(api: httpx.AsyncClient,
                                                           tmp_path) -> None:  # type: ignore[no-untyped-def]
    marker = str(tmp_path / "flaky-marker")
    done = await wait_done(api, (await submit(api, "behave", {"action": "flaky",
                                                              "marker": marker}))["id"])
    assert done["state"] == "succeeded" and done["attempts"] == 2
    assert done["output"] == {"attempt": "second"}
    assert done["error"] is None


async def test_oneoff_worker_dies_and_is_retried(api: httpx.AsyncClient) -> None:
    done = await wait_done(api, (await submit(api, "behave-oneoff", {"action": "die"}))["id"])
    assert done["state"] == "failed" and done["attempts"] == 2
    assert "exited with code 3" in done["error"]["message"]


async def test_timeout_kills_the_worker(api: httpx.AsyncClient, node: Node) -> None:
    done = await wait_done(api, (await submit(api, "behave-hang", {"action": "hang"}))["id"])
    assert done["state"] == "failed" and done["error"]["kind"] == "timeout"

    async def gone() -> bool:
        return not any(w.preset_name == "behave-hang" for w in node.supervisor.workers.values())
    await eventually(gone)


async def test_task_timeout_override(api: httpx.AsyncClient) -> None:
    done = await wait_done(api, (await submit(api, "behave", {"action": "slow", "s": 5},
                                              timeout_s=0.3))["id"])
    assert done["error"]["kind"] == "timeout"


async def test_worker_that_never_connects_fails_with_start_timeout(
        api: httpx.AsyncClient) -> None:
    done = await wait_done(api, (await submit(api, "behave-silent", {}))["id"])
    assert done["state"] == "failed"
    assert done["error"]["kind"] == "start_timeout" and done["attempts"] == 2


async def test_non_json_and_unknown_events_are_kept(api: httpx.AsyncClient) -> None:
    tid = (await submit(api, "behave", {"action": "noise"}))["id"]
    done = await wait_done(api, tid)
    assert done["state"] == "succeeded" and done["output"] == {"noisy": True}
    body = (await api.get(f"/v1/tasks/{tid}/events")).text
    assert "event: log\n" in body and "this line is not JSON" in body
    assert "event: unknown\n" in body and "mystery" in body


async def test_session_worker_stays_warm_between_tasks(api: httpx.AsyncClient) -> None:
    a = await wait_done(api, (await submit(api, "behave", {"action": "ok"}))["id"])
    b = await wait_done(api, (await submit(api, "behave", {"action": "ok"}))["id"])
    assert a["output"]["pid"] == b["output"]["pid"]
    workers = (await api.get("/v1/workers")).json()["workers"]
    assert any(w["preset"] == "behave" and w["state"] == "ready" for w in workers)


async def test_cancel_a_queued_task(api: httpx.AsyncClient, node: Node) -> None:
    # Fill both CPU slots so the CPU-only preset's next task stays queued.
    await node.scheduler.stop()
    tid = (await submit(api, "behave-cpu", {"action": "ok"}))["id"]
    r = await api.post(f"/v1/tasks/{tid}/cancel")
    assert r.status_code == 200 and r.json()["state"] == "cancelled"
    node.scheduler.start()


async def test_cancel_a_running_task(api: httpx.AsyncClient) -> None:
    tid = (await submit(api, "behave", {"action": "slow", "s": 30}))["id"]

    async def running() -> bool:
        return bool((await api.get(f"/v1/tasks/{tid}")).json()["state"] == "running")
    await eventually(running)
    r = await api.post(f"/v1/tasks/{tid}/cancel")
    assert r.json()["state"] == "cancelled"
    assert r.json()["error"]["kind"] == "cancelled"


async def test_cancel_a_running_oneoff_stops_its_worker(api: httpx.AsyncClient,
                                                       node: Node) -> None:
    tid = (await submit(api, "behave-oneoff", {"action": "hang"}))["id"]

    async def running() -> bool:
        return bool((await api.get(f"/v1/tasks/{tid}")).json()["state"] == "running")
    await eventually(running)
    assert (await api.post(f"/v1/tasks/{tid}/cancel")).json()["state"] == "cancelled"

    async def gone() -> bool:
        return not any(w.preset_name == "behave-oneoff" for w in node.supervisor.workers.values())
    await eventually(gone)


async def test_idempotent_submit(api: httpx.AsyncClient) -> None:
    body = {"preset": "sleep", "input": {"ms": 1}}
    a = await api.post("/v1/tasks", json=body, headers={"Idempotency-Key": "k1"})
    b = await api.post("/v1/tasks", json=body, headers={"Idempotency-Key": "k1"})
    assert a.json()["id"] == b.json()["id"]
    c = await api.post("/v1/tasks", json={**body, "input": {"ms": 2}},
                       headers={"Idempotency-Key": "k1"})
    assert c.status_code == 409
    assert c.json()["error"]["code"] == "idempotency_key_reused"
    assert c.json()["error"]["field"] == "Idempotency-Key"


async def test_bulk_submit(api: httpx.AsyncClient) -> None:
    items = [{"preset": "sleep", "input": {"ms": 0}} for _ in range(50)]
    r = await api.post("/v1/tasks/bulk", json={"tasks": items})
    assert r.status_code == 202
    ids = [t["id"] for t in r.json()["tasks"]]
    assert len(set(ids)) == 50
    results = await asyncio.gather(*(wait_done(api, i) for i in ids))
    assert all(t["state"] == "succeeded" for t in results)


async def test_bulk_errors_name_the_item(api: httpx.AsyncClient) -> None:
    r = await api.post("/v1/tasks/bulk", json={"tasks": [
        {"preset": "sleep"}, {"preset": "nope"}]})
    assert r.status_code == 404
    assert r.json()["error"]["field"] == "tasks[1].preset"


async def test_list_filters_and_paginates(api: httpx.AsyncClient) -> None:
    ids = [(await submit(api, "sleep", {"ms": 0}))["id"] for _ in range(5)]
    for i in ids:
        await wait_done(api, i)
    seen: list[str] = []
    cursor = None
    while True:
        params = {"preset": "sleep", "state": "succeeded", "limit": 2}
        if cursor:
            params["cursor"] = cursor
        page = (await api.get("/v1/tasks", params=params)).json()
        seen += [t["id"] for t in page["tasks"]]
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert seen == list(reversed(ids))


async def test_priority_order_then_fifo(api: httpx.AsyncClient, node: Node) -> None:
    await node.scheduler.stop()
    low = (await submit(api, "behave-cpu", {"action": "ok"}, priority="background"))["id"]
    n1 = (await submit(api, "behave-cpu", {"action": "ok"}, priority="normal"))["id"]
    n2 = (await submit(api, "behave-cpu", {"action": "ok"}, priority=50))["id"]
    high = (await submit(api, "behave-cpu", {"action": "ok"}, priority="immediate"))["id"]
    node.scheduler.start()
    done = [await wait_done(api, t) for t in (low, n1, n2, high)]
    order = sorted(done, key=lambda t: t["started_at"])
    assert [t["id"] for t in order] == [high, n1, n2, low]


async def test_each_task_of_a_batch_gets_its_own_timeout_clock(api: httpx.AsyncClient,
                                                               node: Node) -> None:
    # Five 0.4 s tasks run one by one in one batch: 2 s in all, but none takes over 1 s.
    await node.scheduler.stop()
    r = await api.post("/v1/tasks/bulk", json={"tasks": [
        {"preset": "behave-batch", "input": {"action": "slow", "s": 0.4}} for _ in range(5)]})
    node.scheduler.start()
    results = [await wait_done(api, t["id"]) for t in r.json()["tasks"]]
    assert [t["state"] for t in results] == ["succeeded"] * 5
    assert len({t["started_at"] for t in results}) == 1  # one batch


async def test_cancelled_queued_and_running_tasks_look_alike(api: httpx.AsyncClient,
                                                             node: Node) -> None:
    await node.scheduler.stop()
    queued = (await submit(api, "behave", {"action": "ok"}))["id"]
    q = (await api.post(f"/v1/tasks/{queued}/cancel")).json()
    node.scheduler.start()
    running = (await submit(api, "behave", {"action": "slow", "s": 30}))["id"]

    async def is_running() -> bool:
        return bool((await api.get(f"/v1/tasks/{running}")).json()["state"] == "running")
    await eventually(is_running)
    r = (await api.post(f"/v1/tasks/{running}/cancel")).json()
    assert q["state"] == r["state"] == "cancelled"
    assert q["error"]["kind"] == r["error"]["kind"] == "cancelled"
