"""The meters a node's runtime and store feed (gpulane/metrics.py): outcomes by reason with
their durations, batches against inferences, failure reasons kept few, store calls timed;
each node's registry its own."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from gpulane.metrics import MAX_REASONS, Meters


@dataclass
class Ended:
    preset: str = "embed"
    lane: str = "gpu"
    created_at: float = 100.0
    started_at: float | None = 100.5


def _samples(meters: Meters) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = generate_latest(meters.registry).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def _get(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str,
         **labels: str) -> float:
    return sum(v for (n, ls), v in samples.items()
               if n == name and labels.items() <= dict(ls).items())


def test_outcomes_and_durations() -> None:
    meters = Meters("n1", clock=lambda: 102.0)
    meters.task_ended(Ended(), "succeeded")
    meters.task_ended(Ended(), "failed", {"kind": "oom", "message": "x"})
    meters.task_ended(Ended(started_at=None), "cancelled")  # never started: no queue, compute
    got = _samples(meters)
    assert _get(got, "gpulane_inference_request_success_total", node="n1", preset="embed",
                lane="gpu") == 1
    assert _get(got, "gpulane_inference_request_failure_total", reason="oom") == 1
    assert _get(got, "gpulane_inference_request_failure_total", reason="cancelled") == 1
    assert _get(got, "gpulane_request_duration_seconds_count") == 3
    assert _get(got, "gpulane_request_duration_seconds_sum") == 6.0
    assert _get(got, "gpulane_queue_duration_seconds_sum") == 1.0
    assert _get(got, "gpulane_compute_duration_seconds_sum") == 3.0
    assert _get(got, "gpulane_compute_duration_seconds_bucket", le="1.0") == 0
    assert _get(got, "gpulane_compute_duration_seconds_bucket", le="2.5") == 2


def test_batches_and_inferences() -> None:
    meters = Meters("n1")
    meters.batch_sent("embed", "gpu", 8)
    meters.batch_sent("embed", "gpu", 4)
    got = _samples(meters)
    assert _get(got, "gpulane_inference_exec_count_total", preset="embed") == 2
    assert _get(got, "gpulane_inference_count_total", preset="embed") == 12


def test_failure_reasons_stay_few() -> None:
    meters = Meters()
    for i in range(MAX_REASONS + 10):
        meters.task_ended(Ended(), "failed", {"kind": f"kind-{i}"})
    got = _samples(meters)
    reasons = {dict(ls)["reason"] for (n, ls) in got
               if n == "gpulane_inference_request_failure_total"}
    assert len(reasons) == MAX_REASONS + 1 and "other" in reasons
    assert _get(got, "gpulane_inference_request_failure_total", reason="other") == 10


class FakeStore:
    async def submit(self, x: int) -> int:
        return x + 1

    async def claim(self) -> None:
        raise RuntimeError("refused")


def test_store_calls_are_timed_even_when_they_raise() -> None:
    meters = Meters("n1")
    store = FakeStore()
    meters.timed_store(store)

    async def calls() -> None:
        assert await store.submit(1) == 2
        try:
            await store.claim()
        except RuntimeError:
            pass

    asyncio.run(calls())
    got = _samples(meters)
    assert _get(got, "gpulane_store_operation_duration_seconds_count", operation="submit") == 1
    assert _get(got, "gpulane_store_operation_duration_seconds_count", operation="claim") == 1


def test_each_node_has_its_own_registry() -> None:
    a, b = Meters("a"), Meters("b")
    a.batch_sent("p", "cpu", 1)
    assert _get(_samples(b), "gpulane_inference_exec_count_total") == 0
    assert _get(_samples(a), "gpulane_inference_exec_count_total", node="a") == 1
