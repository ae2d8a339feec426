"""scheduling/status.py's pieces without a node: lanes with their measures and workers by
state, a queue of a removed preset, and GPUs with their health and the workers on them."""

from __future__ import annotations

from dataclasses import dataclass

from gpulane.devices import DeviceSnapshot
from gpulane.presets import Preset, PresetRegistry
from gpulane.runtime.launchers import DeviceAssignment
from gpulane.runtime.measures import LaneMeasures
from gpulane.runtime.worker_process import WorkerState
from gpulane.scheduling.ledger import Ledger
from gpulane.scheduling.status import gpus_status, lanes_view
from gpulane.store.base import LaneStats


@dataclass
class FakeWorker:
    id: str
    preset_name: str
    state: WorkerState
    device: DeviceAssignment


def gpu(index: int, health: str = "ok") -> DeviceSnapshot:
    return DeviceSnapshot(index=index, uuid=f"GPU-{index}", name="test", total_vram_mb=8000,
                          used_vram_mb=0, free_vram_mb=8000, utilization_pct=None,
                          memory_utilization_pct=None, temperature_c=None, power_w=None,
                          health=health)


def test_lanes_show_queues_workers_by_state_and_measures() -> None:
    registry = PresetRegistry([Preset.model_validate(
        {"name": "embed", "argv": ["python", "w.py"], "devices": ["gpu", "cpu"]})])
    measures = LaneMeasures()
    measures.loaded("embed", "gpu", 3.0)
    measures.batch("embed", "gpu", 40, 1.0, full=True)
    workers = [
        FakeWorker("w1", "embed", WorkerState.BUSY, DeviceAssignment("gpu", 0, "GPU-0")),
        FakeWorker("w2", "embed", WorkerState.STARTING, DeviceAssignment("gpu", 1, "GPU-1")),
        FakeWorker("w3", "embed", WorkerState.READY, DeviceAssignment("cpu"))]
    lanes = {("embed", "gpu"): LaneStats(queued=5, running=2, oldest_queued_at=100.0),
             ("gone", "cpu"): LaneStats(queued=1, running=0, oldest_queued_at=104.0)}
    view = lanes_view(registry, lanes, workers, measures, now=110.0)
    assert [(v["preset"], v["lane"]) for v in view] == [
        ("embed", "cpu"), ("embed", "gpu"), ("gone", "cpu")]
    cpu, gpu_lane, gone = view
    assert gpu_lane == {"preset": "embed", "lane": "gpu", "queued": 5, "running": 2,
                        "oldest_wait_s": 10.0, "workers": {"warm": 0, "loading": 1, "busy": 1},
                        "load_s": 3.0, "drain_per_worker_s": 40.0}
    assert cpu["workers"] == {"warm": 1, "loading": 0, "busy": 0}
    assert (cpu["queued"], cpu["oldest_wait_s"], cpu["load_s"]) == (0, None, None)
    assert gone["oldest_wait_s"] == 6.0


def test_gpus_show_health_vram_and_their_workers() -> None:
    snaps = [gpu(0), gpu(1, "lost"), gpu(2)]
    ledger = Ledger(snaps, cpu_slots=2)
    assert ledger.acquire("w1", 0, 3000)
    workers = [
        FakeWorker("w1", "embed", WorkerState.BUSY, DeviceAssignment("gpu", 0, "GPU-0")),
        FakeWorker("w2", "big", WorkerState.READY, DeviceAssignment.gpus(
            [1, 2], ["GPU-1", "GPU-2"])),
        FakeWorker("w3", "embed", WorkerState.READY, DeviceAssignment("cpu"))]
    view = gpus_status(snaps, ledger, workers)
    assert [(d["index"], d["health"], d["workers"]) for d in view] == [
        (0, "ok", ["w1"]), (1, "lost", ["w2"]), (2, "ok", ["w2"])]
    assert (view[0]["declared_vram_mb"], view[0]["free_vram_mb"]) == (3000, 5000)
