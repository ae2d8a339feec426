"""AMD GPUs through a stand-in ``amdsmi`` (the 7.0 binding's names and answer shapes), and
what a worker on one is given: HIP/ROCR variables, /dev/kfd and /dev/dri in docker.

No AMD hardware runs here (nor has run the provider anywhere): these pin the provider to the
binding's documented calls, its "N/A" answers and its exceptions.
"""

from __future__ import annotations

import enum
import logging
import sys
import types
from typing import Any

import pytest

from gpulane.devices import (
    AmdProvider,
    DeviceProvider,
    DeviceSnapshot,
    GpuProcess,
    SimulatedProvider,
    select_provider,
)
from gpulane.presets import Preset
from gpulane.runtime import launchers
from gpulane.runtime.launchers import DeviceAssignment, DockerLauncher, worker_env

MIB = 1024 * 1024


class AmdSmiException(Exception):
    pass


class AmdSmiLibraryException(AmdSmiException):
    """As amdsmi's: its text names the AMDSMI_STATUS_* it stands for."""

    def __init__(self, status: str) -> None:
        super().__init__(f"Error code:\n\t2 | {status} - failed")


class AmdSmiInitFlags(enum.IntEnum):
    INIT_AMD_GPUS = 2


class AmdSmiMemoryType(enum.IntEnum):
    VRAM = 0


class AmdSmiTemperatureType(enum.IntEnum):
    EDGE = 0
    HOTSPOT = 1
    JUNCTION = 1


class AmdSmiTemperatureMetric(enum.IntEnum):
    CURRENT = 0


def fake_amdsmi(*, count: int = 2, fail: dict[str, Exception] | None = None,
                hip_ids: list[int] | None = None) -> types.ModuleType:
    """A stand-in for amdsmi with ``count`` 192 GiB MI300X GPUs; ``fail`` maps function ->
    error; ``hip_ids`` the HIP ordinal of each handle (in listing order)."""
    fail = fail or {}
    mod = types.ModuleType("amdsmi")
    calls: list[str] = []
    mod.__dict__.update(calls=calls, AmdSmiException=AmdSmiException,
                        AmdSmiLibraryException=AmdSmiLibraryException,
                        AmdSmiInitFlags=AmdSmiInitFlags, AmdSmiMemoryType=AmdSmiMemoryType,
                        AmdSmiTemperatureType=AmdSmiTemperatureType,
                        AmdSmiTemperatureMetric=AmdSmiTemperatureMetric)
    ids = hip_ids if hip_ids is not None else list(range(count))

    def fn(name: str, result: Any) -> None:
        def call(*args: Any) -> Any:
            calls.append(name)
            if name in fail:
                raise fail[name]
            return result(*args) if callable(result) else result

        setattr(mod, name, call)

    fn("amdsmi_init", lambda flags=None: None)
    fn("amdsmi_shut_down", None)
    fn("amdsmi_get_processor_handles", lambda: [("handle", i) for i in range(count)])
    fn("amdsmi_get_gpu_enumeration_info", lambda h: {
        "drm_render": 128 + h[1], "drm_card": h[1], "hsa_id": h[1], "hip_id": ids[h[1]],
        "hip_uuid": f"GPU-{h[1]}"})
    fn("amdsmi_get_gpu_driver_info", lambda h: {
        "driver_name": "amdgpu", "driver_version": "6.8.5", "driver_date": "N/A"})
    fn("amdsmi_get_gpu_device_uuid", lambda h: f"5dff74a1-0000-1000-80ce-00000000000{h[1]}")
    fn("amdsmi_get_gpu_asic_info", lambda h: {"market_name": "AMD Instinct MI300X",
                                               "vendor_id": "0x1002"})
    fn("amdsmi_get_gpu_memory_total", lambda h, kind: 196592 * MIB)
    fn("amdsmi_get_gpu_memory_usage", lambda h, kind: (2048 + h[1]) * MIB)
    fn("amdsmi_get_gpu_vram_usage", lambda h: {"vram_total": 196592, "vram_used": 4096})
    fn("amdsmi_get_gpu_activity", lambda h: {"gfx_activity": 37, "umc_activity": "N/A",
                                             "mm_activity": "N/A"})
    # MI300X has no edge sensor: the provider goes on to the hotspot.
    fn("amdsmi_get_temp_metric", lambda h, sensor, metric: (
        "N/A" if sensor == AmdSmiTemperatureType.EDGE else 48))
    fn("amdsmi_get_power_info", lambda h: {"current_socket_power": "N/A",
                                           "average_socket_power": 212, "socket_power": 212})
    fn("amdsmi_get_gpu_process_list", lambda h: [
        {"name": "python3", "pid": 4242, "mem": 9 * MIB,
         "memory_usage": {"gtt_mem": 0, "cpu_mem": 0, "vram_mem": 1024 * MIB}},
        {"name": "", "pid": 17, "mem": 512 * MIB,
         "memory_usage": {"gtt_mem": 0, "cpu_mem": 0, "vram_mem": "N/A"}},
    ])
    return mod


def install(monkeypatch: pytest.MonkeyPatch, amd: types.ModuleType | None,
            nvml: types.ModuleType | None = None) -> None:
    # None in sys.modules makes the import raise ImportError: no NVIDIA driver here.
    monkeypatch.setitem(sys.modules, "amdsmi", amd)
    monkeypatch.setitem(sys.modules, "pynvml", nvml)


# -- discovery ------------------------------------------------------------------------------


def test_amd_gpus_are_chosen_when_nvml_finds_none(monkeypatch: pytest.MonkeyPatch) -> None:
    install(monkeypatch, fake_amdsmi())
    provider, reason = select_provider(None)
    assert isinstance(provider, AmdProvider) and isinstance(provider, DeviceProvider)
    assert (provider.name, provider.simulated, provider.count()) == ("amdsmi", False, 2)
    assert reason.startswith("NVML not available (")
    assert reason.endswith("using 2 AMD GPUs (driver 6.8.5) via AMD SMI")
    provider.close()


def test_without_amdsmi_the_node_falls_back_saying_why(monkeypatch: pytest.MonkeyPatch) -> None:
    install(monkeypatch, None)
    provider, reason = select_provider(None)
    assert isinstance(provider, SimulatedProvider)
    assert "AMD SMI not available (amdsmi not importable" in reason
    assert "gpulane[amd]" in reason


def test_an_init_that_raises_is_a_reason_not_a_crash(monkeypatch: pytest.MonkeyPatch) -> None:
    error = AmdSmiLibraryException("AMDSMI_STATUS_DRIVER_NOT_LOADED")
    mod = fake_amdsmi(fail={"amdsmi_init": error})
    install(monkeypatch, mod)
    provider, why = AmdProvider.probe()
    assert provider is None
    assert why.startswith("amdsmi_init failed: AmdSmiLibraryException")
    assert "AMDSMI_STATUS_DRIVER_NOT_LOADED" in why
    chosen, reason = select_provider(None)
    assert isinstance(chosen, SimulatedProvider) and "amdsmi_init failed" in reason


def test_no_gpus_shuts_amd_smi_down_again(monkeypatch: pytest.MonkeyPatch) -> None:
    mod = fake_amdsmi(count=0)
    install(monkeypatch, mod)
    assert AmdProvider.probe() == (None, "AMD SMI found no GPUs")
    assert mod.calls[-1] == "amdsmi_shut_down"
    mod = fake_amdsmi(fail={"amdsmi_get_processor_handles": AmdSmiException("boom")})
    install(monkeypatch, mod)
    provider, why = AmdProvider.probe()
    assert provider is None and why == "amdsmi_get_processor_handles failed: AmdSmiException: boom"
    assert mod.calls[-1] == "amdsmi_shut_down"


def test_gpus_are_numbered_in_hips_order(monkeypatch: pytest.MonkeyPatch) -> None:
    install(monkeypatch, fake_amdsmi(count=3, hip_ids=[2, 0, 1]))
    amd = AmdProvider.try_create()
    assert amd is not None
    snaps = amd.snapshot()
    assert [s.index for s in snaps] == [0, 1, 2]
    # Handle 1 is HIP's 0, handle 2 HIP's 1, handle 0 HIP's 2.
    assert [s.uuid[-1] for s in snaps] == ["1", "2", "0"]


def test_without_hip_ids_the_listing_order_stands(monkeypatch: pytest.MonkeyPatch) -> None:
    mod = fake_amdsmi(count=2, fail={"amdsmi_get_gpu_enumeration_info": AttributeError("old")})
    install(monkeypatch, mod)
    amd = AmdProvider.try_create()
    assert amd is not None
    assert [s.uuid[-1] for s in amd.snapshot()] == ["0", "1"]


# -- snapshots ------------------------------------------------------------------------------


def test_amd_snapshot_fills_every_field(monkeypatch: pytest.MonkeyPatch) -> None:
    install(monkeypatch, fake_amdsmi())
    amd = AmdProvider.try_create()
    assert amd is not None
    s = amd.snapshot()[1]
    assert s == DeviceSnapshot(
        index=1,
        uuid="AMD-GPU-5dff74a1-0000-1000-80ce-000000000001",
        name="AMD Instinct MI300X",
        total_vram_mb=196592,
        used_vram_mb=2049,
        free_vram_mb=196592 - 2049,
        utilization_pct=37.0,
        memory_utilization_pct=None,  # amdsmi's "N/A"
        temperature_c=48.0,  # the hotspot: the edge sensor answered N/A
        power_w=212.0,  # the average: the current reading answered N/A
        processes=(
            GpuProcess(pid=17, used_vram_mb=512, name=None),  # no VRAM figure: its total use
            GpuProcess(pid=4242, used_vram_mb=1024, name="python3"),
        ),
        simulated=False,
    )
    assert s.to_json()["processes"][1] == {"pid": 4242, "used_vram_mb": 1024, "name": "python3"}
    amd.close()
    amd.close()
    assert amd.snapshot() == [] and amd.count() == 0


def test_memory_falls_back_to_the_vram_usage_call(monkeypatch: pytest.MonkeyPatch) -> None:
    mod = fake_amdsmi(fail={"amdsmi_get_gpu_memory_total": AttributeError("no such function")})
    install(monkeypatch, mod)
    amd = AmdProvider.try_create()
    assert amd is not None
    s = amd.snapshot()[0]
    assert (s.total_vram_mb, s.used_vram_mb, s.free_vram_mb) == (196592, 4096, 196592 - 4096)


def test_old_amdsmi_process_handles_are_read_one_by_one(monkeypatch: pytest.MonkeyPatch) -> None:
    mod = fake_amdsmi()
    mod.__dict__.update(
        amdsmi_get_gpu_process_list=lambda h: ["p1", "p2"],
        amdsmi_get_gpu_process_info=lambda h, p: (
            {"pid": 7, "name": "old", "mem": 3 * MIB} if p == "p1" else {"pid": "N/A"}))
    install(monkeypatch, mod)
    amd = AmdProvider.try_create()
    assert amd is not None
    assert amd.snapshot()[0].processes == (GpuProcess(pid=7, used_vram_mb=3, name="old"),)


# -- a library that raises mid-snapshot --------------------------------------------------------


def test_calls_that_raise_mid_snapshot_read_as_none_logged_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    mod = fake_amdsmi(fail={
        "amdsmi_get_gpu_activity": AmdSmiLibraryException("AMDSMI_STATUS_NOT_SUPPORTED"),
        "amdsmi_get_temp_metric": AmdSmiLibraryException("AMDSMI_STATUS_UNEXPECTED_DATA"),
        "amdsmi_get_gpu_process_list": OSError("ioctl failed"),
        "amdsmi_get_power_info": RuntimeError("anything at all"),
    })
    install(monkeypatch, mod)
    amd = AmdProvider.try_create()
    assert amd is not None
    with caplog.at_level(logging.DEBUG, logger="gpulane.devices.amd"):
        first = amd.snapshot()
        second = amd.snapshot()
    for s in (*first, *second):
        assert (s.utilization_pct, s.memory_utilization_pct, s.temperature_c, s.power_w) == (
            None, None, None, None)
        assert s.processes == () and s.total_vram_mb == 196592 and s.health == "ok"
    levels = {r.getMessage().split()[2]: r.levelno for r in caplog.records}
    messages = [r.getMessage() for r in caplog.records]
    for fname in ("amdsmi_get_gpu_activity", "amdsmi_get_temp_metric",
                  "amdsmi_get_gpu_process_list", "amdsmi_get_power_info"):
        assert sum(f" {fname} " in m for m in messages) == 1  # once, whatever the GPUs
    assert levels["amdsmi_get_gpu_activity"] == logging.DEBUG  # expected on some boards
    assert levels["amdsmi_get_temp_metric"] == logging.WARNING


def test_a_gpu_whose_identity_and_memory_stop_answering_keeps_its_last_reading(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    mod = fake_amdsmi()
    install(monkeypatch, mod)
    amd = AmdProvider.try_create()
    assert amd is not None
    before = amd.snapshot()[0]

    def fails(*args: Any) -> Any:
        raise AmdSmiLibraryException("AMDSMI_STATUS_DRM_ERROR")

    for name in ("amdsmi_get_gpu_device_uuid", "amdsmi_get_gpu_asic_info",
                 "amdsmi_get_gpu_memory_total", "amdsmi_get_gpu_memory_usage",
                 "amdsmi_get_gpu_vram_usage"):
        setattr(mod, name, fails)
    after = amd.snapshot()[0]
    # Same identity and capacity (placement and locks key on them); no readings.
    assert (after.uuid, after.name, after.total_vram_mb) == (
        before.uuid, before.name, before.total_vram_mb)
    assert (after.used_vram_mb, after.free_vram_mb) == (None, None)


def test_a_gpu_never_read_is_unknown_with_no_capacity(monkeypatch: pytest.MonkeyPatch) -> None:
    error = AmdSmiLibraryException("AMDSMI_STATUS_DRM_ERROR")
    mod = fake_amdsmi(fail={name: error for name in (
        "amdsmi_get_gpu_device_uuid", "amdsmi_get_gpu_asic_info", "amdsmi_get_gpu_memory_total",
        "amdsmi_get_gpu_vram_usage", "amdsmi_get_gpu_driver_info")})
    install(monkeypatch, mod)
    amd = AmdProvider.try_create()
    assert amd is not None and amd.describe() == "2 AMD GPUs"
    s = amd.snapshot()[1]
    assert (s.uuid, s.name, s.total_vram_mb, s.free_vram_mb) == (
        "AMD-GPU-unknown-1", "Unknown AMD GPU", 0, None)


def test_a_failing_shutdown_is_swallowed(monkeypatch: pytest.MonkeyPatch) -> None:
    mod = fake_amdsmi(fail={"amdsmi_shut_down": AmdSmiException("already down")})
    install(monkeypatch, mod)
    amd = AmdProvider.try_create()
    assert amd is not None
    amd.close()
    assert mod.calls.count("amdsmi_shut_down") == 1


# -- what a worker on an AMD GPU is given -----------------------------------------------------


def _preset(**extra: Any) -> Preset:
    if extra.get("runtime") == "docker":
        return Preset(name="m", **extra)
    return Preset(name="m", argv=("python", "w.py"), **extra)


def _amd(*indexes: int) -> DeviceAssignment:
    return DeviceAssignment.gpus(list(indexes), [f"AMD-GPU-{i}" for i in indexes])


def test_an_amd_worker_gets_rocr_the_host_indexes_and_hip_from_zero() -> None:
    env = worker_env(_preset(), _amd(2), None)
    assert (env["ROCR_VISIBLE_DEVICES"], env["HIP_VISIBLE_DEVICES"],
            env["CUDA_VISIBLE_DEVICES"], env["GPU_DEVICE"]) == ("2", "0", "0", "cuda:0")
    env = worker_env(_preset(), _amd(1, 3), None)
    assert (env["ROCR_VISIBLE_DEVICES"], env["HIP_VISIBLE_DEVICES"],
            env["CUDA_VISIBLE_DEVICES"]) == ("1,3", "0,1", "0,1")
    assert _amd(1).vendor == "amd" and _amd(1).name == "gpu:1"


def test_nvidia_and_cpu_workers_get_no_amd_gpu() -> None:
    nvidia = worker_env(_preset(), DeviceAssignment("gpu", 1, "GPU-abc"), None)
    assert nvidia["CUDA_VISIBLE_DEVICES"] == "1"
    assert "HIP_VISIBLE_DEVICES" not in nvidia and "ROCR_VISIBLE_DEVICES" not in nvidia
    cpu = worker_env(_preset(), DeviceAssignment("cpu"), None)
    # An ordinal HIP cannot have hides every AMD GPU from a CPU worker.
    assert (cpu["CUDA_VISIBLE_DEVICES"], cpu["HIP_VISIBLE_DEVICES"]) == ("", "-1")
    assert "ROCR_VISIBLE_DEVICES" not in cpu
    assert DeviceAssignment("cpu").vendor == "cpu"
    assert DeviceAssignment("gpu", 0, "GPU-sim-0000-0", simulated=True).vendor == "nvidia"


def _flags(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


def test_docker_on_an_amd_gpu_passes_kfd_and_dri_not_gpus(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(launchers, "device_groups", lambda: ["109", "44"])
    spec = DockerLauncher().build(_preset(runtime="docker", image="rocm/pytorch"), _amd(1, 2),
                                  "m-gpu1-1")
    argv = spec.argv
    assert "--gpus" not in argv
    assert _flags(argv, "--device") == ["/dev/kfd", "/dev/dri"]
    assert _flags(argv, "--group-add") == ["video", "109", "44"]
    # Inside, every GPU is at its host index: ROCR picks the placed ones, HIP counts from 0.
    assert {k: spec.env[k] for k in ("ROCR_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES",
                                     "CUDA_VISIBLE_DEVICES")} == {
        "ROCR_VISIBLE_DEVICES": "1,2", "HIP_VISIBLE_DEVICES": "0,1", "CUDA_VISIBLE_DEVICES": "0,1"}
    passed = _flags(argv, "-e")
    assert {"ROCR_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES", "CUDA_VISIBLE_DEVICES"} <= set(passed)
    assert "--cap-drop" in argv and argv[argv.index("--cap-drop") + 1] == "ALL"


def test_docker_on_an_nvidia_gpu_or_the_cpu_has_no_amd_devices() -> None:
    preset = _preset(runtime="docker", image="img")
    nvidia = DockerLauncher().build(preset, DeviceAssignment("gpu", 1, "GPU-x"), "w").argv
    assert _flags(nvidia, "--gpus") == ["device=1"] and "--device" not in nvidia
    cpu = DockerLauncher().build(preset, DeviceAssignment("cpu"), "w").argv
    assert "--device" not in cpu and "--group-add" not in cpu and "--gpus" not in cpu


def test_device_groups_are_the_host_owners_of_kfd_and_render_nodes(tmp_path: Any) -> None:
    kfd = tmp_path / "kfd"
    kfd.write_text("")
    dri = tmp_path / "dri"
    dri.mkdir()
    (dri / "renderD128").write_text("")
    (dri / "card0").write_text("")
    groups = launchers.device_groups((str(kfd), str(dri), str(tmp_path / "absent")))
    gid = kfd.stat().st_gid
    assert groups == ([] if gid == 0 else [str(gid)])  # root's group is never added
