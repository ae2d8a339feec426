"""GET /metrics (issue 14, item 1) on a real node: the scrape parses with prometheus_client's
own parser, and its figures move with the work: tasks that succeed, fail and fall back,
batches against inferences, durations, queues, workers, GPUs, leases, store calls; every
series carries the node's name, and the series stay the same set however many tasks ran."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from gpulane.errors import StoreUnavailableError
from gpulane.node import Node
from tests.conftest import eventually
from tests.integration.conftest import submit, wait_done


async def _scrape(api: httpx.AsyncClient) -> list[Sample]:
    r = await api.get("/metrics")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    assert r.headers["server-timing"].startswith("scrape;dur=")  # the node's own time
    return [s for fam in text_string_to_metric_families(r.text) for s in fam.samples]


def _value(samples: list[Sample], name: str, **labels: str) -> float:
    """The sum of the samples named ``name`` whose labels include ``labels``."""
    return sum(s.value for s in samples
               if s.name == name and labels.items() <= s.labels.items())


def _series(samples: list[Sample]) -> set[tuple[str, tuple[tuple[str, str], ...]]]:
    return {(s.name, tuple(sorted(s.labels.items()))) for s in samples}


async def _run(api: httpx.AsyncClient, preset: str, inp: Any) -> dict[str, Any]:
    return await wait_done(api, (await submit(api, preset, inp))["id"])


async def test_scrape_moves_with_the_work(api: httpx.AsyncClient, node: Node) -> None:
    before = await _scrape(api)
    assert {s.labels["node"] for s in before} == {node.name}
    assert _value(before, "gpulane_inference_request_success_total") == 0
    # Two simulated GPUs of 24 GiB, read the DCGM way: bytes, labelled by index and uuid.
    totals = [s for s in before if s.name == "gpulane_gpu_memory_total_bytes"]
    assert sorted(s.labels["gpu"] for s in totals) == ["0", "1"]
    assert all(s.value == 24 * 1024**3 and s.labels["uuid"] for s in totals)
    # Every lane a preset may run in is there before any work, its queue and workers at 0.
    assert _value(before, "gpulane_queue_depth", preset="behave", lane="gpu") == 0
    assert _value(before, "gpulane_workers", preset="behave", lane="gpu", state="ready") == 0

    for _ in range(3):
        assert (await _run(api, "behave", {"action": "ok"}))["state"] == "succeeded"
    assert (await _run(api, "behave", {"action": "fail"}))["state"] == "failed"
    # No simulated GPU has 100,000 MB: sent to the CPU at submit, a fallback by reason.
    assert (await _run(api, "big-or-cpu", {}))["state"] == "succeeded"
    lease = (await api.post("/v1/leases", json={"holder": "ml-service", "vram_mb": 2048,
                                                "ttl_s": 30})).json()

    after = await _scrape(api)
    ok = {"preset": "behave", "lane": "gpu"}
    assert _value(after, "gpulane_inference_request_success_total", **ok) == 3
    assert _value(after, "gpulane_inference_request_failure_total", **ok,
                  reason="bad_input") == 1
    assert _value(after, "gpulane_inference_request_success_total", preset="big-or-cpu",
                  lane="cpu") == 1
    assert _value(after, "gpulane_fallbacks_total", preset="big-or-cpu",
                  reason="vram_exceeds_largest_gpu") == 1
    # Inferences and executions apart: four tasks in one to four batches.
    inferences = _value(after, "gpulane_inference_count_total", **ok)
    executions = _value(after, "gpulane_inference_exec_count_total", **ok)
    assert inferences == 4 and 1 <= executions <= inferences
    # Each ended task is one observation of each duration, in seconds.
    for hist in ("request", "queue", "compute"):
        name = f"gpulane_{hist}_duration_seconds"
        assert _value(after, f"{name}_count", **ok) == 4
        assert _value(after, f"{name}_bucket", **ok, le="+Inf") == 4
        assert _value(after, f"{name}_sum", **ok) >= 0
    assert _value(after, "gpulane_request_duration_seconds_sum", **ok) > 0
    # The session worker stays warm; the lease holds 2 GiB on a GPU.
    assert _value(after, "gpulane_workers", **ok, state="ready") == 1
    assert _value(after, "gpulane_leases", state="granted") == 1
    assert _value(after, "gpulane_leases", state="waiting") == 0
    declared = _value(after, "gpulane_gpu_memory_declared_bytes", gpu=str(lease["device"]))
    assert declared >= 2048 * 1024**2
    # The store's calls are timed by operation.
    assert _value(after, "gpulane_store_operation_duration_seconds_count",
                  operation="submit") == 5
    assert _value(after, "gpulane_store_operation_duration_seconds_count",
                  operation="finish_many") >= 1
    assert _value(after, "gpulane_store_up") == 1

    # More of the same work moves the figures, not the set of series.
    for _ in range(3):
        await _run(api, "behave", {"action": "ok"})
    again = await _scrape(api)
    assert _value(again, "gpulane_inference_request_success_total", **ok) == 6
    assert _series(again) == _series(after)


async def test_queue_depth_and_cancels(api: httpx.AsyncClient, node: Node) -> None:
    node.scheduler.paused = True  # claims nothing: submitted tasks stay queued
    queued = [await submit(api, "behave", {"action": "ok"}) for _ in range(3)]
    samples = await _scrape(api)
    assert _value(samples, "gpulane_queue_depth", preset="behave", lane="gpu") == 3
    assert _value(samples, "gpulane_queue_oldest_created_seconds", preset="behave",
                  lane="gpu") > 0
    r = await api.post(f"/v1/tasks/{queued[0]['id']}/cancel")
    assert r.status_code == 200 and r.json()["state"] == "cancelled"
    node.scheduler.paused = False
    node.scheduler.wake()
    for task in queued[1:]:
        assert (await wait_done(api, task["id"]))["state"] == "succeeded"

    async def drained() -> list[Sample] | None:
        got = await _scrape(api)
        return got if _value(got, "gpulane_queue_depth", preset="behave") == 0 else None

    final = await eventually(drained)
    assert final is not None
    assert _value(final, "gpulane_inference_request_success_total", preset="behave") == 2
    # Cancelled while queued: it never reached a worker, so it is no request's outcome.
    assert _value(final, "gpulane_inference_request_failure_total", preset="behave") == 0


async def test_scrape_answers_with_the_store_away(api: httpx.AsyncClient, node: Node) -> None:
    async def away() -> None:
        raise StoreUnavailableError("redis://127.0.0.1:1/0 is unreachable")

    node.store.lane_stats = away  # type: ignore[assignment,method-assign]
    samples = await _scrape(api)
    assert _value(samples, "gpulane_store_up") == 0
    # Queues unknown are left out, not shown empty; the rest is the node's own.
    assert not [s for s in samples if s.name == "gpulane_queue_depth"]
    assert _value(samples, "gpulane_gpu_memory_total_bytes") == 2 * 24 * 1024**3


async def test_lease_preemption_is_counted(api: httpx.AsyncClient) -> None:
    """Two background leases hold both GPUs; an immediate one asks one of them to step aside:
    a lease preempting, one waiting, one preemption of a lease."""
    bg = [(await api.post("/v1/leases", json={"holder": "batch-job", "gpus": 1, "grace_s": 5,
                                               "priority": "background"})).json()
          for _ in range(2)]
    urgent = asyncio.create_task(api.post("/v1/leases", json={
        "holder": "ml-service", "vram_mb": 8192, "priority": "immediate", "wait_s": 10}))

    async def preempting() -> list[Sample] | None:
        got = await _scrape(api)
        return got if _value(got, "gpulane_leases", state="preempting") == 1 else None

    samples = await eventually(preempting)
    assert samples is not None
    assert _value(samples, "gpulane_lease_preemptions_total", kind="lease") == 1
    assert _value(samples, "gpulane_lease_preemptions_total", kind="worker") == 0
    assert _value(samples, "gpulane_leases", state="waiting") == 1
    states = [(await api.get(f"/v1/leases/{b['id']}")).json()["state"] for b in bg]
    victim = bg[states.index("preempting")]
    await api.delete(f"/v1/leases/{victim['id']}", params={"token": victim["token"]})
    assert (await urgent).json()["state"] == "granted"
    after = await _scrape(api)
    assert _value(after, "gpulane_leases", state="granted") == 2
    assert _value(after, "gpulane_lease_preemptions_total", kind="lease") == 1
