"""Device providers: spec parsing, simulated GPUs, CPU pool, and NVML through a fake pynvml."""

from __future__ import annotations

import logging
import os
import sys
import types
from dataclasses import FrozenInstanceError
from typing import Any

import pytest

from gpulane.devices import (
    DEFAULT_SIMULATED_GPUS,
    DeviceProvider,
    DeviceSnapshot,
    GpuProcess,
    NvmlProvider,
    SimulatedGpu,
    SimulatedProvider,
    cpu_pool,
    parse_gpu_spec,
    select_provider,
)

MIB = 1024 * 1024

# -- spec parsing ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("2x24GiB", [(0, 24576, "Simulated GPU"), (1, 24576, "Simulated GPU")]),
        ("1x80GB", [(0, 81920, "Simulated GPU")]),
        ("24GiB,16GiB", [(0, 24576, "Simulated GPU"), (1, 16384, "Simulated GPU")]),
        ("2x24GiB:H100", [(0, 24576, "H100"), (1, 24576, "H100")]),
        (" 24gib:A10 , 1X512MiB ", [(0, 24576, "A10"), (1, 512, "Simulated GPU")]),
        ("1.5G", [(0, 1536, "Simulated GPU")]),
    ],
)
def test_parse_gpu_spec_good(spec: str, expected: list[tuple[int, int, str]]) -> None:
    gpus = parse_gpu_spec(spec)
    assert [(g.index, g.total_vram_mb, g.name) for g in gpus] == expected
    assert [g.uuid for g in gpus] == [f"GPU-sim-0000-{i}" for i in range(len(gpus))]


@pytest.mark.parametrize(
    "spec", ["", "   ", "24", "0x24GiB", "2x0GiB", "2x24TB", "x24GiB", "24GiB,", "abc", "300x1GiB"]
)
def test_parse_gpu_spec_bad(spec: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_gpu_spec(spec)
    message = str(info.value)
    assert repr(spec) in message
    assert "2x24GiB" in message and "24GiB,16GiB" in message  # names the accepted forms


def test_simulated_gpu_uuid_is_deterministic() -> None:
    assert SimulatedGpu(index=3, total_vram_mb=1024).uuid == "GPU-sim-0000-3"
    assert SimulatedGpu(index=3, total_vram_mb=1024, uuid="GPU-x").uuid == "GPU-x"
    with pytest.raises(ValueError):
        SimulatedGpu(index=0, total_vram_mb=0)


# -- simulated provider ----------------------------------------------------------------------


def test_simulated_snapshot_and_external_use() -> None:
    sim = SimulatedProvider(parse_gpu_spec("2x24GiB:L4"))
    assert isinstance(sim, DeviceProvider)
    assert (sim.name, sim.simulated, sim.count()) == ("simulated", True, 2)

    before = sim.snapshot()
    assert [(s.used_vram_mb, s.free_vram_mb) for s in before] == [(0, 24576), (0, 24576)]

    sim.set_external_use(1, 4096)
    sim.set_utilization(1, 75)
    after = sim.snapshot()
    assert after[1].used_vram_mb == 4096
    assert after[1].free_vram_mb == 24576 - 4096
    assert after[1].utilization_pct == 75.0
    assert after[0].free_vram_mb == 24576
    assert all(s.simulated and s.name == "L4" for s in after)
    # Earlier snapshots are immutable readings, not live views.
    assert before[1].used_vram_mb == 0
    with pytest.raises(FrozenInstanceError):
        after[0].used_vram_mb = 1  # type: ignore[misc]

    body = after[1].to_json()
    assert body["uuid"] == "GPU-sim-0000-1"
    assert body["temperature_c"] is None and body["processes"] == []
    sim.close()
    sim.close()


def test_simulated_rejects_bad_settings() -> None:
    sim = SimulatedProvider(parse_gpu_spec("1x1GiB"))
    with pytest.raises(IndexError):
        sim.set_external_use(5, 1)
    with pytest.raises(ValueError):
        sim.set_external_use(0, 2048)
    with pytest.raises(ValueError):
        sim.set_external_use(0, -1)
    with pytest.raises(ValueError):
        sim.set_utilization(0, 101)
    with pytest.raises(ValueError):
        SimulatedProvider([SimulatedGpu(index=1, total_vram_mb=1)])


# -- CPU pool ---------------------------------------------------------------------------------


def test_cpu_pool_defaults_to_usable_cores() -> None:
    pool = cpu_pool()
    expected = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert pool.cores == expected
    assert pool.concurrency == pool.cores
    assert cpu_pool(3).to_json() == {"cores": pool.cores, "concurrency": 3}
    with pytest.raises(ValueError):
        cpu_pool(0)


# -- NVML through a fake pynvml ---------------------------------------------------------------


class NVMLError(Exception):
    pass


# Class names mirror pynvml's: the provider tells expected failures apart by name.
class NVMLError_NotSupported(NVMLError):
    pass


class NVMLError_LibraryNotFound(NVMLError):
    pass


def fake_pynvml(*, count: int = 2, fail: dict[str, Exception] | None = None) -> types.ModuleType:
    """A stand-in for pynvml with ``count`` 80 GiB GPUs; ``fail`` maps function -> error."""
    fail = fail or {}
    mod = types.ModuleType("pynvml")
    calls: list[str] = []
    mod.__dict__.update(
        calls=calls,  # every NVML function called, in order
        NVMLError=NVMLError,
        NVMLError_NotSupported=NVMLError_NotSupported,
        NVML_TEMPERATURE_GPU=0,
    )

    def fn(name: str, result: Any) -> None:
        def call(*args: Any) -> Any:
            calls.append(name)
            if name in fail:
                raise fail[name]
            return result(*args) if callable(result) else result

        call.__name__ = name
        setattr(mod, name, call)

    ns = types.SimpleNamespace
    fn("nvmlInit", None)
    fn("nvmlShutdown", None)
    fn("nvmlDeviceGetCount", count)
    fn("nvmlSystemGetDriverVersion", b"550.54.15")
    fn("nvmlDeviceGetHandleByIndex", lambda i: ("handle", i))
    fn("nvmlDeviceGetUUID", lambda h: f"GPU-real-{h[1]}")
    fn("nvmlDeviceGetName", lambda h: b"NVIDIA H100 80GB HBM3")  # bytes, as old pynvml returns
    fn(
        "nvmlDeviceGetMemoryInfo",
        lambda h: ns(total=81920 * MIB, used=1024 * MIB, free=80896 * MIB),
    )
    fn("nvmlDeviceGetUtilizationRates", lambda h: ns(gpu=42, memory=7))
    fn("nvmlDeviceGetTemperature", lambda h, sensor: 55)
    fn("nvmlDeviceGetPowerUsage", lambda h: 123456)
    fn(
        "nvmlDeviceGetComputeRunningProcesses",
        lambda h: [ns(pid=200, usedGpuMemory=512 * MIB), ns(pid=100, usedGpuMemory=None)],
    )
    fn(
        "nvmlDeviceGetGraphicsRunningProcesses",
        lambda h: [ns(pid=100, usedGpuMemory=256 * MIB), ns(pid=300, usedGpuMemory=2**64 - 1)],
    )
    return mod


def install(monkeypatch: pytest.MonkeyPatch, mod: types.ModuleType | None) -> None:
    # None in sys.modules makes "import pynvml" raise ImportError.
    monkeypatch.setitem(sys.modules, "pynvml", mod)


def test_nvml_normal_readings(monkeypatch: pytest.MonkeyPatch) -> None:
    install(monkeypatch, fake_pynvml())
    nvml = NvmlProvider.try_create()
    assert nvml is not None
    assert isinstance(nvml, DeviceProvider)
    assert (nvml.name, nvml.simulated, nvml.count()) == ("nvml", False, 2)
    assert nvml.driver_version == "550.54.15"

    snaps = nvml.snapshot()
    assert [s.index for s in snaps] == [0, 1]
    s = snaps[1]
    assert s == DeviceSnapshot(
        index=1,
        uuid="GPU-real-1",
        name="NVIDIA H100 80GB HBM3",
        total_vram_mb=81920,
        used_vram_mb=1024,
        free_vram_mb=80896,
        utilization_pct=42.0,
        memory_utilization_pct=7.0,
        temperature_c=55.0,
        power_w=123.456,
        processes=(
            GpuProcess(pid=100, used_vram_mb=256),  # merged: the graphics entry knows its use
            GpuProcess(pid=200, used_vram_mb=512),
            GpuProcess(pid=300, used_vram_mb=None),  # NVML's "not available" marker
        ),
        simulated=False,
    )
    assert s.to_json()["processes"][0] == {"pid": 100, "used_vram_mb": 256, "name": None}


def test_nvml_not_supported_reads_as_none(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    mod = fake_pynvml(
        fail={
            "nvmlDeviceGetPowerUsage": NVMLError_NotSupported("Not Supported"),
            "nvmlDeviceGetTemperature": NVMLError("Unknown Error"),
        }
    )
    del mod.nvmlDeviceGetGraphicsRunningProcesses  # an older pynvml lacking the function
    install(monkeypatch, mod)
    nvml = NvmlProvider.try_create()
    assert nvml is not None

    with caplog.at_level(logging.DEBUG, logger="gpulane.devices.nvml"):
        first = nvml.snapshot()
        second = nvml.snapshot()
    for s in (first[0], second[1]):
        assert s.power_w is None and s.temperature_c is None
        assert s.total_vram_mb == 81920 and s.utilization_pct == 42.0
        assert [p.pid for p in s.processes] == [100, 200]

    # Each failing function is logged once, however many GPUs and snapshots hit it.
    messages = [r.getMessage() for r in caplog.records]
    assert sum("nvmlDeviceGetPowerUsage" in m for m in messages) == 1
    assert sum("nvmlDeviceGetTemperature" in m for m in messages) == 1
    assert sum("nvmlDeviceGetGraphicsRunningProcesses" in m for m in messages) == 1
    levels = {r.getMessage().split()[1]: r.levelno for r in caplog.records}
    assert levels["nvmlDeviceGetPowerUsage"] == logging.DEBUG  # expected on some boards
    assert levels["nvmlDeviceGetTemperature"] == logging.WARNING


def test_nvml_lost_handle_keeps_index(monkeypatch: pytest.MonkeyPatch) -> None:
    mod = fake_pynvml(fail={"nvmlDeviceGetHandleByIndex": NVMLError("GPU is lost")})
    install(monkeypatch, mod)
    nvml = NvmlProvider.try_create()
    assert nvml is not None
    snaps = nvml.snapshot()
    readings = [(s.index, s.total_vram_mb, s.free_vram_mb) for s in snaps]
    assert readings == [(0, 0, None), (1, 0, None)]


def test_nvml_init_failure_gives_none(monkeypatch: pytest.MonkeyPatch) -> None:
    mod = fake_pynvml(fail={"nvmlInit": NVMLError_LibraryNotFound("NVML Shared Library Not Found")})
    install(monkeypatch, mod)
    assert NvmlProvider.try_create() is None
    provider, why = NvmlProvider.probe()
    assert provider is None and "not found" in why
    assert "nvmlShutdown" not in mod.calls


def test_nvml_zero_devices_gives_none_and_shuts_down(monkeypatch: pytest.MonkeyPatch) -> None:
    mod = fake_pynvml(count=0)
    install(monkeypatch, mod)
    provider, why = NvmlProvider.probe()
    assert provider is None and why == "NVML found no GPUs"
    assert mod.calls.count("nvmlShutdown") == 1


def test_nvml_missing_module_gives_none(monkeypatch: pytest.MonkeyPatch) -> None:
    install(monkeypatch, None)
    provider, why = NvmlProvider.probe()
    assert provider is None and "nvidia-ml-py" in why


def test_nvml_close_shuts_down_once(monkeypatch: pytest.MonkeyPatch) -> None:
    mod = fake_pynvml()
    install(monkeypatch, mod)
    nvml = NvmlProvider.try_create()
    assert nvml is not None
    nvml.close()
    nvml.close()
    assert mod.calls.count("nvmlInit") == 1
    assert mod.calls.count("nvmlShutdown") == 1
    assert nvml.snapshot() == [] and nvml.count() == 0


# -- select_provider ---------------------------------------------------------------------------


def test_select_provider_falls_back_with_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    mod = fake_pynvml(fail={"nvmlInit": NVMLError_LibraryNotFound("NVML Shared Library Not Found")})
    install(monkeypatch, mod)
    provider, reason = select_provider(None)
    assert isinstance(provider, SimulatedProvider) and provider.count() == 2
    assert reason.startswith("NVML not available (")
    assert "not found" in reason
    assert reason.endswith(f"using 2 simulated GPUs ({DEFAULT_SIMULATED_GPUS})")


def test_select_provider_uses_nvml_when_present(monkeypatch: pytest.MonkeyPatch) -> None:
    install(monkeypatch, fake_pynvml())
    provider, reason = select_provider(None)
    assert isinstance(provider, NvmlProvider)
    assert "2 NVIDIA GPUs" in reason and "550.54.15" in reason
    provider.close()


def test_select_provider_simulate_and_disabled(monkeypatch: pytest.MonkeyPatch) -> None:
    mod = fake_pynvml()
    install(monkeypatch, mod)
    provider, reason = select_provider("1x80GB:A100")
    assert isinstance(provider, SimulatedProvider)
    assert provider.snapshot()[0].name == "A100" and "1x80GB:A100" in reason
    provider, reason = select_provider(None, prefer_nvml=False)
    assert isinstance(provider, SimulatedProvider) and reason.startswith("NVML disabled")
    assert mod.calls == []
    with pytest.raises(ValueError):
        select_provider("lots")


def test_simulate_none_means_cpu_only() -> None:
    from gpulane.devices import select_provider

    provider, reason = select_provider("none")
    assert provider.count() == 0 and provider.snapshot() == []
    assert "CPU only" in reason
