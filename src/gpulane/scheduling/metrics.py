"""A node's ``/metrics``: the runtime's counters and histograms (gpulane/metrics.py) plus the
gauges read from the node's state at scrape time.

The gauges are a custom collector: each scrape reads what the node holds now (queues by
preset and lane, workers by state, GPUs, the CPU pool, leases, fallbacks), so nothing is
updated on the hot path for them and nothing is kept per task. The queue figures cost one
``lane_stats`` call to the store (a grouped query over queued and running tasks, never a scan
of finished ones); everything else is in memory. A store that cannot be reached leaves the
queue series out and sets ``gpulane_store_up`` to 0, so that the scrape still answers.

GPU series follow DCGM (``DCGM_FI_DEV_GPU_UTIL``, ``_FB_USED``, ``_FB_TOTAL``, ``_POWER_USAGE``,
``_GPU_TEMP``) in base units: a ratio, bytes, watts, degrees Celsius.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from prometheus_client import generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from gpulane.errors import StoreUnavailableError
from gpulane.metrics import Meters, name
from gpulane.runtime.worker_process import WorkerState
from gpulane.scheduling.leases import LeaseState
from gpulane.scheduling.node_parts import NodeParts
from gpulane.store.base import LaneStats
from gpulane.store.tiered import TieredStore

MIB = 1024 * 1024
"""Bytes in a MiB: the devices report VRAM in MiB, Prometheus wants bytes."""
WORKER_STATES = (WorkerState.STARTING, WorkerState.READY, WorkerState.BUSY,
                 WorkerState.STOPPING)
"""The worker states a lane reports, each even at 0 (an exited worker is gone)."""
LEASE_STATES = (LeaseState.WAITING, LeaseState.GRANTED, LeaseState.PREEMPTING)
"""The live lease states, each reported even at 0."""


class NodeMetrics:
    """The node's meters, fed by its runtime and store, and its scrape."""

    def __init__(self, node: NodeParts) -> None:
        self.meters = Meters(node.name)
        node.supervisor.pipeline.meters = self.meters  # task ends and batches (runtime)
        self.meters.timed_store(node.store)
        self.state = StateCollector(node)
        self.meters.registry.register(self.state)

    async def scrape(self) -> bytes:
        """The text exposition of every series, the queues read from the store just now."""
        try:
            self.state.lanes = await self.state.node.store.lane_stats()
            self.state.store_up = True
        except StoreUnavailableError:
            self.state.lanes, self.state.store_up = {}, False
        return generate_latest(self.meters.registry)


def _gauge(suffix: str, doc: str, labels: tuple[str, ...]) -> GaugeMetricFamily:
    return GaugeMetricFamily(name(suffix), doc, labels=("node", *labels))


class StateCollector(Collector):
    """Gauges (and the counters the node keeps itself) read from the node at each scrape."""

    def __init__(self, node: NodeParts) -> None:
        self.node = node
        self.lanes: Mapping[tuple[str, str], LaneStats] = {}
        self.store_up = True

    def collect(self) -> Iterator[Metric]:
        node = self.node
        n = node.name
        yield from self._lanes(n)
        yield from self._gpus(n)
        cpu = _gauge("cpu_slots", "CPU pool slots for tasks", ("state",))
        cpu.add_metric([n, "used"], node.ledger.cpu_used)
        cpu.add_metric([n, "total"], node.cpu.concurrency)
        yield cpu
        leases = _gauge("leases", "This node's live leases by state", ("state",))
        counts = dict.fromkeys(LEASE_STATES, 0)
        for lease in node.leases.active():
            counts[lease.state] = counts.get(lease.state, 0) + 1
        for state, count in counts.items():
            leases.add_metric([n, state.value], count)
        yield leases
        preempted = CounterMetricFamily(name("lease_preemptions"),
                                        "Holders asked to step aside for an urgent lease, by "
                                        "kind (an outside lease, a worker)",
                                        labels=("node", "kind"))
        for kind in sorted({"lease", "worker", *node.leases.preemptions}):
            preempted.add_metric([n, kind], node.leases.preemptions.get(kind, 0))
        yield preempted
        fallbacks = CounterMetricFamily(name("fallbacks"), "Tasks sent from the GPU to the "
                                        "CPU lane, by preset and reason",
                                        labels=("node", "preset", "reason"))
        for (preset, reason), count in sorted(node.fallbacks.by_preset.items()):
            fallbacks.add_metric([n, preset, reason], count)
        yield fallbacks
        up = _gauge("store_up", "1 when the last scrape could read the store", ())
        up.add_metric([n], 1 if self.store_up else 0)
        yield up
        if isinstance(node.store, TieredStore):  # the online lane (durable: false presets)
            yield from _online(n, node.store)
        draining = _gauge("node_draining", "1 while the node drains (takes no new work)", ())
        draining.add_metric([n], 1 if node.draining else 0)
        yield draining
        started = _gauge("node_start_time_seconds", "When the node started (Unix time)", ())
        started.add_metric([n], node.started_at)
        yield started

    def _lanes(self, n: str) -> Iterator[Metric]:
        """Queues and workers of every lane a preset may run in (and any other the store
        holds work for), each at 0 when quiet, so a dashboard's series never vanish."""
        node = self.node
        keys = {(p.name, d.value) for p in node.registry.values() for d in p.devices}
        keys |= set(self.lanes)
        depth = _gauge("queue_depth", "Tasks queued", ("preset", "lane"))
        running = _gauge("tasks_running", "Tasks running (on any node of the fleet)",
                         ("preset", "lane"))
        oldest = _gauge("queue_oldest_created_seconds",
                        "When the oldest queued task was submitted (Unix time)",
                        ("preset", "lane"))
        for preset, lane in sorted(keys):
            stats = self.lanes.get((preset, lane))
            depth.add_metric([n, preset, lane], stats.queued if stats else 0)
            running.add_metric([n, preset, lane], stats.running if stats else 0)
            if stats is not None and stats.oldest_queued_at is not None:
                oldest.add_metric([n, preset, lane], stats.oldest_queued_at)
        counts = {(p, lane, s): 0 for p, lane in keys for s in WORKER_STATES}
        for w in node.supervisor.workers.values():
            key = (w.preset_name, w.device.kind, w.state)
            if w.state in WORKER_STATES:
                counts[key] = counts.get(key, 0) + 1
        workers = _gauge("workers", "This node's workers by state", ("preset", "lane", "state"))
        for (preset, lane, state), count in sorted(counts.items()):
            workers.add_metric([n, preset, lane, state.value], count)
        if self.store_up:  # else the queues are unknown, not empty
            yield from (depth, running, oldest)
        yield workers

    def _gpus(self, n: str) -> Iterator[Metric]:
        """Each GPU as the last device poll read it (DCGM's fields), and as the ledger holds
        it (VRAM declared by workers and leases)."""
        labels = ("gpu", "uuid")
        util = _gauge("gpu_utilization_ratio", "GPU utilisation, 0 to 1", labels)
        used = _gauge("gpu_memory_used_bytes", "VRAM in use (any process)", labels)
        total = _gauge("gpu_memory_total_bytes", "VRAM on the device", labels)
        declared = _gauge("gpu_memory_declared_bytes",
                          "VRAM declared by this node's workers and leases", labels)
        power = _gauge("gpu_power_watts", "Power draw", labels)
        temp = _gauge("gpu_temperature_celsius", "GPU temperature", labels)
        healthy = _gauge("gpu_healthy", "1 while the driver reaches the GPU, 0 once lost",
                         labels)
        for snap in self.node.gpus:
            key = [n, str(snap.index), snap.uuid]
            total.add_metric(key, snap.total_vram_mb * MIB)
            healthy.add_metric(key, 1 if snap.health == "ok" else 0)
            if snap.utilization_pct is not None:
                util.add_metric(key, snap.utilization_pct / 100)
            if snap.used_vram_mb is not None:
                used.add_metric(key, snap.used_vram_mb * MIB)
            if snap.power_w is not None:
                power.add_metric(key, snap.power_w)
            if snap.temperature_c is not None:
                temp.add_metric(key, snap.temperature_c)
            acct = self.node.ledger.gpus.get(snap.index)
            if acct is not None:
                declared.add_metric(key, acct.declared_mb * MIB)
        yield from (util, used, total, declared, power, temp, healthy)


def _online(n: str, store: TieredStore) -> Iterator[Metric]:
    """What the online lane holds in memory (what a crash of this node would lose), and what
    it wrote to the store, by why."""
    held = _gauge("online_tasks", "Online (durable: false) tasks held in this node's memory",
                  ())
    held.add_metric([n], len(store.memory))
    yield held
    spilled = CounterMetricFamily(name("online_spilled"), "Online tasks written to the store, "
                                  "by why (failed, window, close)", labels=("node", "reason"))
    for reason, count in sorted(store.spilled.items()):
        spilled.add_metric([n, reason], count)
    yield spilled
