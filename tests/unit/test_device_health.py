"""A lost GPU: the simulated fault hook, NVML's lost-GPU errors of one device, the ledger that
places nothing on it, and the health follower that acts once per change."""

from __future__ import annotations

import sys
import types
from typing import Any, cast

import pytest

from gpulane.devices import NvmlProvider, SimulatedGpu, SimulatedProvider
from gpulane.devices.nvml import UNKNOWN_LOST_READINGS
from gpulane.runtime.supervisor import Supervisor
from gpulane.scheduling.device_health import DeviceHealth
from gpulane.scheduling.leases import LeaseManager, LeaseRequest, LeaseState
from gpulane.scheduling.ledger import Ledger

MIB = 1024 * 1024


def provider(n: int = 2) -> SimulatedProvider:
    return SimulatedProvider([SimulatedGpu(i, 24576) for i in range(n)])


def test_simulated_lose_and_restore_show_in_snapshots() -> None:
    sim = provider()
    assert [s.health for s in sim.snapshot()] == ["ok", "ok"]
    sim.lose(1)
    lost = sim.snapshot()[1]
    assert (lost.health, lost.uuid, lost.total_vram_mb, lost.free_vram_mb) == (
        "lost", "GPU-sim-0000-1", 24576, None)
    assert lost.to_json()["health"] == "lost"
    assert sim.snapshot()[0].health == "ok"
    sim.restore(1)
    assert [s.health for s in sim.snapshot()] == ["ok", "ok"]
    with pytest.raises(IndexError, match=r"valid indexes are 0\.\.1"):
        sim.lose(2)


class NVMLError_GpuIsLost(Exception):  # pynvml's class name: the provider reads it
    pass


class NVMLError_Unknown(Exception):  # what a lost GPU, or a passing hiccup, answers
    pass


def _nvml(lost: set[int], unknown: set[int] | None = None) -> types.ModuleType:
    """A pynvml stand-in whose GPUs in ``lost`` fail their memory reading as lost, and those
    in ``unknown`` with NVML's Unknown error."""
    mod = types.ModuleType("pynvml")
    ns = types.SimpleNamespace
    unknown = set() if unknown is None else unknown

    def memory(handle: Any) -> Any:
        if handle[1] in lost:
            raise NVMLError_GpuIsLost("GPU is lost")
        if handle[1] in unknown:
            raise NVMLError_Unknown("Unknown Error")
        return ns(total=81920 * MIB, used=1024 * MIB, free=80896 * MIB)

    funcs: dict[str, Any] = {
        "nvmlInit": lambda: None, "nvmlShutdown": lambda: None,
        "nvmlDeviceGetCount": lambda: 2, "nvmlSystemGetDriverVersion": lambda: "550",
        "nvmlDeviceGetHandleByIndex": lambda i: ("handle", i),
        "nvmlDeviceGetUUID": lambda h: f"GPU-real-{h[1]}",
        "nvmlDeviceGetName": lambda h: "NVIDIA H100", "nvmlDeviceGetMemoryInfo": memory,
        "nvmlDeviceGetUtilizationRates": lambda h: ns(gpu=5, memory=1),
        "nvmlDeviceGetTemperature": lambda h, s: 40, "nvmlDeviceGetPowerUsage": lambda h: 1000,
        "nvmlDeviceGetComputeRunningProcesses": lambda h: [],
        "nvmlDeviceGetGraphicsRunningProcesses": lambda h: []}
    mod.__dict__.update(funcs, NVML_TEMPERATURE_GPU=0)
    return mod


def test_nvml_a_lost_gpu_reads_lost_and_the_others_read_on(
        monkeypatch: pytest.MonkeyPatch) -> None:
    lost: set[int] = set()
    monkeypatch.setitem(sys.modules, "pynvml", _nvml(lost))
    nvml = NvmlProvider.try_create()
    assert nvml is not None
    assert [s.health for s in nvml.snapshot()] == ["ok", "ok"]
    lost.add(0)
    first, second = nvml.snapshot()
    # Its last known identity, no readings: index and uuid keep their meaning.
    assert (first.health, first.uuid, first.name, first.total_vram_mb, first.free_vram_mb) == (
        "lost", "GPU-real-0", "NVIDIA H100", 81920, None)
    assert (second.health, second.free_vram_mb) == ("ok", 80896)
    lost.clear()
    assert [s.health for s in nvml.snapshot()] == ["ok", "ok"]


def test_nvml_an_unknown_error_reads_lost_only_when_it_lasts(
        monkeypatch: pytest.MonkeyPatch) -> None:
    unknown: set[int] = set()
    monkeypatch.setitem(sys.modules, "pynvml", _nvml(set(), unknown))
    nvml = NvmlProvider.try_create()
    assert nvml is not None
    nvml.snapshot()
    unknown.add(1)
    hiccup = nvml.snapshot()[1]  # once: no readings, not lost (its workers keep running)
    assert (hiccup.health, hiccup.uuid, hiccup.free_vram_mb) == ("ok", "GPU-real-1", None)
    unknown.clear()
    assert nvml.snapshot()[1].health == "ok"
    unknown.add(1)
    assert [nvml.snapshot()[1].health for _ in range(UNKNOWN_LOST_READINGS)] == \
        ["ok"] * (UNKNOWN_LOST_READINGS - 1) + ["lost"]
    assert nvml.snapshot()[0].health == "ok"  # the other GPU reads on
    unknown.clear()
    assert nvml.snapshot()[1].health == "ok"


def test_the_ledger_places_nothing_on_a_lost_gpu() -> None:
    sim = provider()
    ledger = Ledger(sim.snapshot(), cpu_slots=2)
    sim.lose(0)
    ledger.observe(sim.snapshot())
    assert ledger.fits(1024) == [1]
    assert not ledger.acquire("w1", 0, 1024)
    assert ledger.empty_devices() == [1]
    assert not ledger.acquire_whole("w2", [0])
    sim.restore(0)
    ledger.observe(sim.snapshot())
    assert ledger.fits(1024) == [0, 1] and ledger.acquire("w1", 0, 1024)
    sim.lose(1)
    assert Ledger(sim.snapshot(), cpu_slots=1).fits(0) == [0]  # lost at start: the same


class FakeSupervisor:
    def __init__(self) -> None:
        self.lost: list[int] = []

    def device_lost(self, index: int) -> list[str]:
        self.lost.append(index)
        return [f"w-{index}"]


async def test_health_acts_once_per_change_and_ends_leases_on_the_lost_gpu() -> None:
    sim = provider()
    ledger = Ledger(sim.snapshot(), cpu_slots=2)
    changes: list[str] = []
    leases = LeaseManager(ledger, on_change=lambda: None, preempt_worker=lambda w, g: None)
    on0 = await leases.acquire(LeaseRequest("svc", vram_mb=1024, device=0), wait_s=1)
    on1 = await leases.acquire(LeaseRequest("svc", vram_mb=1024, device=1), wait_s=1)
    sup = FakeSupervisor()
    health = DeviceHealth(ledger, cast(Supervisor, sup), leases, lambda: changes.append("c"))
    assert health.observe(sim.snapshot()) == ([], [])
    sim.lose(0)
    ledger.observe(sim.snapshot())
    assert health.observe(sim.snapshot()) == ([0], [])
    assert health.observe(sim.snapshot()) == ([], [])  # still lost: nothing more to do
    assert sup.lost == [0] and changes == ["c"]
    assert (on0.state, on0.end_reason, on1.state) == (
        LeaseState.REVOKED, None, LeaseState.GRANTED)
    assert (on0.events[-1]["event"], on0.events[-1]["data"]["reason"]) == (
        "revoked", "device_lost")
    assert 0 not in [h.device for h in ledger.holders()]
    sim.restore(0)
    ledger.observe(sim.snapshot())
    assert health.observe(sim.snapshot()) == ([], [0])
    assert changes == ["c", "c"] and sup.lost == [0]
