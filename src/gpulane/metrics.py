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
does not depend on how much work the node has done. The hot path pays a dict lookup, a counter
increment and a histogram observation per task; the labelled children are cached.
"""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable, Mapping
from functools import wraps
from typing import Any, Protocol, TypeVar

from prometheus_client import CollectorRegistry, Counter, Histogram

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


class Meters:
    """The counters and histograms of one node, in the registry its scrape reads."""

    def __init__(self, node: str = "", clock: Callable[[], float] = time.time) -> None:
        self.node = node
        self.registry = CollectorRegistry(auto_describe=False)
        self._clock = clock  # wall time, as a task's created_at and started_at are
        reg = self.registry
        lane = ("node", "preset", "lane")
        self.success = Counter(name("inference_request_success"), "Tasks that succeeded",
                               lane, registry=reg)
        self.failure = Counter(name("inference_request_failure"),
                               "Tasks that ended failed or cancelled, by reason (error kind)",
                               (*lane, "reason"), registry=reg)
        self.inferences = Counter(name("inference_count"),
                                  "Inferences run: tasks sent to workers, counted one by one",
                                  lane, registry=reg)
        self.executions = Counter(name("inference_exec_count"),
                                  "Executions: batches sent to workers (a one-off task is one)",
                                  lane, registry=reg)
        self.request = Histogram(name("request_duration_seconds"),
                                 "Submit to final state of each task", lane,
                                 buckets=DURATION_BUCKETS, registry=reg)
        self.queue = Histogram(name("queue_duration_seconds"),
                               "Submit to the start of the final attempt of each task", lane,
                               buckets=DURATION_BUCKETS, registry=reg)
        self.compute = Histogram(name("compute_duration_seconds"),
                                 "Start of the final attempt to final state of each task", lane,
                                 buckets=DURATION_BUCKETS, registry=reg)
        self.store = Histogram(name("store_operation_duration_seconds"),
                               "Store calls made by this node, by operation",
                               ("node", "operation"), buckets=STORE_BUCKETS, registry=reg)
        self._ends: dict[tuple[str, str, str, str], tuple[Any, Any, Any, Any]] = {}
        self._batches: dict[tuple[str, str], tuple[Any, Any]] = {}
        self._reasons: set[str] = set()

    def task_ended(self, task: EndedTask, state: str,
                   error: Mapping[str, object] | None = None) -> None:
        """A task reached its final state ``state`` (succeeded, failed, cancelled)."""
        now = self._clock()
        reason = "" if state == SUCCEEDED else self._reason(state, error)
        key = (task.preset, task.lane, state, reason)
        children = self._ends.get(key)
        if children is None:
            labels = (self.node, task.preset, task.lane)
            outcome = (self.success.labels(*labels) if state == SUCCEEDED
                       else self.failure.labels(*labels, reason))
            children = self._ends[key] = (outcome, self.request.labels(*labels),
                                          self.queue.labels(*labels),
                                          self.compute.labels(*labels))
        outcome, request, queue, compute = children
        outcome.inc()
        request.observe(max(now - task.created_at, 0.0))
        started = task.started_at
        if started is not None:  # a task cancelled while queued never started
            queue.observe(max(started - task.created_at, 0.0))
            compute.observe(max(now - started, 0.0))

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
        children = self._batches.get((preset, lane))
        if children is None:
            labels = (self.node, preset, lane)
            children = self._batches[(preset, lane)] = (self.executions.labels(*labels),
                                                        self.inferences.labels(*labels))
        children[0].inc()
        children[1].inc(size)

    def timed(self, op: str, call: F) -> F:
        """``call`` (an async store method), its latency observed under ``op``."""
        observe = self.store.labels(self.node, op).observe
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
