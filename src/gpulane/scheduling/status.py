"""The body of ``GET /v1/status``: a node at a glance.

Kept from before (the CLI and tests read these keys): ``node``, ``started``, ``draining``,
``queued``, ``presets`` (each preset's queue against its max_queued and its drain rate),
``housekeeping`` and ``tables``. Added for issue 13:

- ``lanes``: one entry per (preset, lane) the preset may run in (and any other queue the store
  holds work for): queued and running tasks, the oldest queued task's wait, this node's workers
  there by state, and the lane's measured worker load time and per-worker drain rate;
- ``devices``: each GPU's health, declared and free VRAM and the workers on it, and ``cpu``,
  the CPU pool's slots in use and its workers;
- ``fallbacks``: every fallback this node decided, by reason, with per-minute rates over 1 and
  15 minutes (scheduling/fallbacks.py).

Queue figures cost one ``lane_stats`` call to the store (a grouped query, never a scan of every
task) beside the counters the preset queues already read; everything else is in memory.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from gpulane.devices import DeviceSnapshot
from gpulane.presets import PresetRegistry
from gpulane.runtime.launchers import DeviceAssignment
from gpulane.runtime.measures import LaneMeasures
from gpulane.runtime.worker_process import WorkerState
from gpulane.scheduling.ledger import GpuAccount, Ledger
from gpulane.scheduling.node_parts import NodeParts
from gpulane.store.base import LaneStats

WORKER_STATES = {WorkerState.READY: "warm", WorkerState.STARTING: "loading",
                 WorkerState.BUSY: "busy"}
"""How a live worker's state counts in a lane's ``workers`` (stopping ones are not counted)."""


class StatusWorker(Protocol):
    """What the status view reads of one live worker (runtime.worker.Worker)."""

    @property
    def id(self) -> str: ...
    @property
    def preset_name(self) -> str: ...
    @property
    def state(self) -> WorkerState: ...
    @property
    def device(self) -> DeviceAssignment: ...


def _gpu_indexes(device: DeviceAssignment) -> tuple[int, ...]:
    if device.kind != "gpu" or device.index is None:
        return ()
    return device.indexes or (device.index,)


async def status_body(node: NodeParts, tables: Mapping[str, Any],
                      clock: Callable[[], float] = time.time) -> dict[str, Any]:
    """The whole body; ``tables`` are the in-memory tables that must return to their idle
    size (nothing grows without bound)."""
    stats, lanes = await asyncio.gather(node.store.queue_stats(), node.store.lane_stats())
    node.admission.observe(stats)
    queues = {p.name: node.admission.view(
        p.name, p.max_queued, stats[p.name].queued if p.name in stats else 0)
        for p in node.registry.values()}
    live = [w for w in node.supervisor.workers.values() if w.state in WORKER_STATES]
    return {"node": node.name, "started": node.started, "draining": node.draining,
            "queued": sum(q["queued"] for q in queues.values()), "presets": queues,
            "lanes": lanes_view(node.registry, lanes, live, node.supervisor.measures, clock()),
            "devices": gpus_status(node.gpus, node.ledger, live),
            "cpu": {"slots": node.cpu.concurrency, "in_use": node.ledger.cpu_used,
                    "workers": sorted(w.id for w in live if w.device.kind == "cpu")},
            "fallbacks": node.fallbacks.view(),
            # Retention, heartbeats and the reaper, as the housekeeper reports them.
            "housekeeping": node.housekeeper.view(),
            "tables": dict(tables)}


def lanes_view(registry: PresetRegistry, lanes: Mapping[tuple[str, str], LaneStats],
               workers: Sequence[StatusWorker], measures: LaneMeasures,
               now: float) -> list[dict[str, Any]]:
    """Every lane of every preset (a quiet one with zeros), then any other queue the store
    has work in (a preset removed while tasks wait for it), sorted by preset and lane."""
    keys = {(p.name, d.value) for p in registry.values() for d in p.devices} | set(lanes)
    out = []
    for preset, lane in sorted(keys):
        stats = lanes.get((preset, lane)) or LaneStats(0, 0, None)
        counts = dict.fromkeys(WORKER_STATES.values(), 0)
        for w in workers:
            if w.preset_name == preset and w.device.kind == lane:
                counts[WORKER_STATES[w.state]] += 1
        measure = measures.lanes.get((preset, lane))
        oldest = stats.oldest_queued_at
        out.append({
            "preset": preset, "lane": lane, "queued": stats.queued, "running": stats.running,
            "oldest_wait_s": None if oldest is None else round(max(now - oldest, 0.0), 3),
            "workers": counts,
            "load_s": None if measure is None or measure.load_s is None
            else round(measure.load_s, 3),
            "drain_per_worker_s": None if measure is None or measure.drain_rate is None
            else round(measure.drain_rate, 3)})
    return out


def gpus_status(gpus: Sequence[DeviceSnapshot], ledger: Ledger,
                workers: Sequence[StatusWorker]) -> list[dict[str, Any]]:
    """Each GPU: health, VRAM as the ledger declares and can still place, the workers on it."""
    out = []
    for snap in gpus:
        acct = ledger.gpus.get(snap.index)
        out.append({
            "index": snap.index, "name": snap.name, "health": snap.health,
            "simulated": snap.simulated, "total_vram_mb": snap.total_vram_mb,
            "declared_vram_mb": None if acct is None else acct.declared_mb,
            "free_vram_mb": None if acct is None else acct.free_mb,
            "held_vram_mb": held_by_kind(acct), "outside_vram_mb": outside_use_mb(snap, acct),
            "workers": sorted(w.id for w in workers if snap.index in _gpu_indexes(w.device))})
    return out


def held_by_kind(acct: GpuAccount | None) -> dict[str, int]:
    """VRAM the ledger declares on a GPU by kind of holder: ``worker`` (gpulane's own),
    ``lease`` (outside services through the API), ``clearing`` (room being freed)."""
    held = {"worker": 0, "lease": 0, "clearing": 0}
    for h in (acct.holdings.values() if acct is not None else ()):
        held[h.kind] = held.get(h.kind, 0) + h.vram_mb
    return held


def outside_use_mb(snap: DeviceSnapshot, acct: GpuAccount | None) -> int | None:
    """VRAM in use by processes gpulane did not declare: what the driver says is used beyond
    the ledger's declarations (a simulated GPU reports only such outside use); None when the
    reading is N/A."""
    if snap.used_vram_mb is None:
        return None
    if snap.simulated or acct is None:
        return snap.used_vram_mb
    return max(snap.used_vram_mb - acct.declared_mb, 0)
