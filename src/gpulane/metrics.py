"""Prometheus metrics of one node: its own registry, the names, and the meters the runtime and
the store feed as work happens.

Names follow the field's conventions under a ``gpulane_`` prefix, units in the names: Triton's
``nv_inference_*`` for requests, inferences and executions (mean batch size is
``inference_count / inference_exec_count``), DCGM's ``DCGM_FI_DEV_*`` for the GPUs (those are
read at scrape time: scheduling/metrics.py). Every series carries a ``node`` label, so that a
fleet's nodes stay apart in one Prometheus.

Each node has a registry of its own, never prometheus_client's global one: tests and benches
run many nodes in one process. Counters and histograms grow with the label values (presets,
lanes, failure reasons, store operations), never with the number of tasks, so a scrape's size
does not depend on how much work the node has done. The hot path pays a dict lookup, a few
additions and three bisects per task: the figures are plain numbers, written out by a
collector at scrape time (prometheus_client's own Counter and Histogram take a lock and walk
every bucket on each observation: three times the cost, measured).
"""

from __future__ import annotations

import math
import time
from bisect import bisect_left
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from functools import wraps
from itertools import accumulate
from typing import Any, Protocol, TypeVar

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

PREFIX = "gpulane"
"""Every name starts with this (and an underscore)."""
DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                    10.0, 30.0, 60.0, 300.0, math.inf)
"""Histogram buckets for a task's request, queue and compute durations, in seconds: from a
no-op batch (a millisecond) to a long one-off job (minutes)."""
STORE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.25, 1.0, math.inf)
"""Histogram buckets for one store call, in seconds: SQLite answers in tens of microseconds,
Redis over a network in a millisecond or so."""
MAX_REASONS = 32
"""Distinct failure reasons kept as label values; any later one counts as "other" (a worker
names its own error kinds, and a label's values must stay few)."""
SUCCEEDED = "succeeded"
"""The outcome (TaskState's value) counted as a success; every other final state fails."""
STORE_OPS = ("submit", "submit_many", "get", "claim", "append_events", "finish_many",
             "requeue", "queue_stats", "lane_stats")
"""The store calls ``timed_store`` times: those every task makes (submit, claim, events,
finish, a result read) and the node's queue readings. Each costs a histogram's series in every
scrape, so the periodic upkeep (heartbeat, reap, purge) is left out."""

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


class EndedTask(Protocol):
    """What the meters read of a task that reached a final state (model.Task has these)."""

    @property
    def preset(self) -> str: ...
    @property
    def lane(self) -> str: ...
    @property
    def created_at(self) -> float: ...
    @property
    def started_at(self) -> float | None: ...


def name(suffix: str) -> str:
    """The full metric name of ``suffix``."""
    return f"{PREFIX}_{suffix}"


class Tally:
    """One histogram's counts per bucket and its sum: an observation is a bisect and two
    additions, no lock (the node's event loop is its only writer and its only reader)."""

    __slots__ = ("bounds", "counts", "les", "total")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = bounds
        self.les = ["+Inf" if math.isinf(b) else repr(b) for b in bounds]  # as Go writes them
        self.counts = [0] * len(bounds)
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1  # the first bound >= value: le
        self.total += value

    def buckets(self) -> list[tuple[str, float]]:
        """Cumulative counts by upper bound, as the exposition wants them."""
        return list(zip(self.les, accumulate(self.counts), strict=True))


class LaneTally:
    """What one (preset, lane) did: outcomes, batches and the durations of its tasks."""

    __slots__ = ("compute", "executions", "failures", "inferences", "queue", "request",
                 "success")

    def __init__(self) -> None:
        self.success = 0
        self.failures: dict[str, int] = {}  # reason -> tasks
        self.inferences = 0
        self.executions = 0
        self.request = Tally(DURATION_BUCKETS)
        self.queue = Tally(DURATION_BUCKETS)
        self.compute = Tally(DURATION_BUCKETS)


class Meters(Collector):
    """The counters and histograms of one node, and the collector that writes them into the
    registry its scrape reads. Kept as plain numbers and exported at scrape time: the hot path
    takes no lock and builds no label tuple."""

    def __init__(self, node: str = "", clock: Callable[[], float] = time.time) -> None:
        self.node = node
        self._clock = clock  # wall time, as a task's created_at and started_at are
        self.lanes: dict[tuple[str, str], LaneTally] = {}
        self.store: dict[str, Tally] = {}  # operation -> its latencies
        self._reasons: set[str] = set()
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)

    def _lane(self, preset: str, lane: str) -> LaneTally:
        tally = self.lanes.get((preset, lane))
        if tally is None:
            tally = self.lanes[(preset, lane)] = LaneTally()
        return tally

    def task_ended(self, task: EndedTask, state: str,
                   error: Mapping[str, object] | None = None) -> None:
        """A task reached its final state ``state`` (succeeded, failed, cancelled)."""
        now = self._clock()
        tally = self._lane(task.preset, task.lane)
        if state == SUCCEEDED:
            tally.success += 1
        else:
            reason = self._reason(state, error)
            tally.failures[reason] = tally.failures.get(reason, 0) + 1
        created = task.created_at
        tally.request.observe(max(now - created, 0.0))
        started = task.started_at
        if started is not None:  # a task cancelled while queued never started
            tally.queue.observe(max(started - created, 0.0))
            tally.compute.observe(max(now - started, 0.0))

    def _reason(self, state: str, error: Mapping[str, object] | None) -> str:
        kind = error.get("kind") if error else None
        reason = str(kind) if kind else state
        if reason not in self._reasons:
            if len(self._reasons) >= MAX_REASONS:
                return "other"
            self._reasons.add(reason)
        return reason

    def batch_sent(self, preset: str, lane: str, size: int) -> None:
        """A worker of (preset, lane) was sent a batch of ``size`` tasks."""
        tally = self._lane(preset, lane)
        tally.executions += 1
        tally.inferences += size

    def timed(self, op: str, call: F) -> F:
        """``call`` (an async store method), its latency observed under ``op``."""
        observe = self.store.setdefault(op, Tally(STORE_BUCKETS)).observe
        clock = time.perf_counter

        @wraps(call)
        async def timed_call(*args: Any, **kwargs: Any) -> Any:
            start = clock()
            try:
                return await call(*args, **kwargs)
            finally:
                observe(clock() - start)
        return timed_call  # type: ignore[return-value]

    def timed_store(self, store: object) -> None:
        """Time the store's calls in STORE_OPS from now on: each is replaced on the instance,
        so every holder of the store (scheduler, runtime, housekeeper) is timed alike."""
        for op in STORE_OPS:
            call = getattr(store, op, None)
            if call is not None:
                setattr(store, op, self.timed(op, call))

    def collect(self) -> Iterator[Metric]:
        n = self.node
        lane = ("node", "preset", "lane")
        success = CounterMetricFamily(name("inference_request_success"),
                                      "Tasks that succeeded", labels=lane)
        failure = CounterMetricFamily(name("inference_request_failure"), "Tasks that ended "
                                      "failed, or cancelled while running, by reason (error "
                                      "kind)", labels=(*lane, "reason"))
        inferences = CounterMetricFamily(name("inference_count"), "Inferences: tasks sent to "
                                         "workers, counted one by one", labels=lane)
        executions = CounterMetricFamily(name("inference_exec_count"), "Executions: batches "
                                         "sent to workers (a one-off task is one)", labels=lane)
        hists = {"request": HistogramMetricFamily(
                     name("request_duration_seconds"), "Submit to final state of each task",
                     labels=lane),
                 "queue": HistogramMetricFamily(
                     name("queue_duration_seconds"), "Submit to the start of the final "
                     "attempt of each task", labels=lane),
                 "compute": HistogramMetricFamily(
                     name("compute_duration_seconds"), "Start of the final attempt to final "
                     "state of each task", labels=lane)}
        for (preset, ln), tally in sorted(self.lanes.items()):
            labels = [n, preset, ln]
            success.add_metric(labels, tally.success)
            for reason, count in sorted(tally.failures.items()):
                failure.add_metric([*labels, reason], count)
            inferences.add_metric(labels, tally.inferences)
            executions.add_metric(labels, tally.executions)
            for key, family in hists.items():
                hist: Tally = getattr(tally, key)
                family.add_metric(labels, hist.buckets(), hist.total)
        store = HistogramMetricFamily(name("store_operation_duration_seconds"),
                                      "Store calls made by this node, by operation",
                                      labels=("node", "operation"))
        for op, hist in sorted(self.store.items()):
            store.add_metric([n, op], hist.buckets(), hist.total)
        yield from (success, failure, inferences, executions, *hists.values(), store)
