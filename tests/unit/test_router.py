"""route(): which lane a task waits in, and why it left the GPU when it did."""

from __future__ import annotations

import pytest

from gpulane.errors import RequestError, ValidationError
from gpulane.model import DeviceWish
from gpulane.presets import Preset
from gpulane.scheduling.router import CPU_LANE, GPU_LANE, FallbackReason, Route, route

AUTO, GPU, CPU = DeviceWish.AUTO, DeviceWish.GPU, DeviceWish.CPU
TWO_GPUS = [24576, 16384]


def preset(devices: str = "gpu,cpu", vram_mb: int = 8000, name: str = "p") -> Preset:
    return Preset(name=name, argv=("python", "worker.py"), devices=devices, vram_mb=vram_mb)


# -- auto -------------------------------------------------------------------------------------


@pytest.mark.parametrize("devices", ["gpu,cpu", "gpu"])
def test_auto_goes_to_the_gpu_when_one_fits(devices: str) -> None:
    assert route(preset(devices), AUTO, TWO_GPUS) == Route(GPU_LANE, None)


def test_auto_fits_exactly_the_largest_gpu() -> None:
    assert route(preset(vram_mb=24576), AUTO, TWO_GPUS) == Route(GPU_LANE)
    assert route(preset(vram_mb=0), AUTO, [1]) == Route(GPU_LANE)


def test_auto_falls_back_to_cpu_without_a_gpu() -> None:
    assert route(preset(), AUTO, []) == Route(CPU_LANE, FallbackReason.NO_GPU)
    assert FallbackReason.NO_GPU == "no_gpu"


def test_auto_falls_back_to_cpu_when_vram_exceeds_the_largest_gpu() -> None:
    r = route(preset(vram_mb=24577), AUTO, TWO_GPUS)
    assert r == Route(CPU_LANE, FallbackReason.VRAM_EXCEEDS_LARGEST_GPU)
    assert r.fallback_reason == "vram_exceeds_largest_gpu"


@pytest.mark.parametrize("gpus", [[], TWO_GPUS, [1]])
def test_auto_on_a_cpu_only_preset_is_no_fallback(gpus: list[int]) -> None:
    assert route(preset("cpu", vram_mb=0), AUTO, gpus) == Route(CPU_LANE, None)
    assert route(preset("cpu", vram_mb=10**6), AUTO, gpus) == Route(CPU_LANE, None)


@pytest.mark.parametrize("gpus", [[], TWO_GPUS])
def test_auto_on_a_cpu_first_preset_takes_the_cpu_without_a_reason(gpus: list[int]) -> None:
    # devices: [cpu, gpu] prefers the CPU: that is its choice, not a fallback from the GPU.
    assert route(preset("cpu,gpu"), AUTO, gpus) == Route(CPU_LANE, None)


def test_auto_on_a_gpu_only_preset_without_a_gpu_is_refused() -> None:
    with pytest.raises(RequestError) as info:
        route(preset("gpu"), AUTO, [])
    assert info.value.code == "no_gpu" and info.value.status == 400
    assert info.value.field == "device"


def test_auto_on_a_gpu_only_preset_too_big_for_every_gpu_is_refused() -> None:
    with pytest.raises(RequestError) as info:
        route(preset("gpu", vram_mb=30000), AUTO, TWO_GPUS)
    assert info.value.code == "vram_exceeds_devices"


# -- wishes -----------------------------------------------------------------------------------


@pytest.mark.parametrize("gpus", [[], TWO_GPUS])
@pytest.mark.parametrize("devices", ["gpu,cpu", "cpu,gpu", "cpu"])
def test_wish_cpu_goes_to_the_cpu(devices: str, gpus: list[int]) -> None:
    assert route(preset(devices), CPU, gpus) == Route(CPU_LANE, None)


def test_wish_cpu_on_a_gpu_only_preset_is_a_validation_error() -> None:
    with pytest.raises(ValidationError) as info:
        route(preset("gpu", name="llm"), CPU, TWO_GPUS)
    err = info.value
    assert err.field == "device" and err.code == "device_not_allowed" and err.status == 422
    assert "'llm'" in err.message and "gpu" in err.message


@pytest.mark.parametrize("devices", ["gpu,cpu", "cpu,gpu", "gpu"])
def test_wish_gpu_goes_to_the_gpu(devices: str) -> None:
    assert route(preset(devices), GPU, TWO_GPUS) == Route(GPU_LANE, None)


@pytest.mark.parametrize("gpus", [[], TWO_GPUS])
def test_wish_gpu_on_a_cpu_only_preset_is_a_validation_error(gpus: list[int]) -> None:
    with pytest.raises(ValidationError) as info:
        route(preset("cpu", name="ocr"), GPU, gpus)
    err = info.value
    assert err.field == "device" and err.code == "device_not_allowed" and err.status == 422
    assert "'ocr'" in err.message


def test_wish_gpu_without_a_gpu_is_refused() -> None:
    with pytest.raises(RequestError) as info:
        route(preset(), GPU, [])
    err = info.value
    assert not isinstance(err, ValidationError)
    assert (err.code, err.status, err.field) == ("no_gpu", 400, "device")


def test_wish_gpu_over_the_largest_gpu_names_its_size() -> None:
    with pytest.raises(RequestError) as info:
        route(preset(vram_mb=40000, name="big"), GPU, [16384, 24576, 8192])
    err = info.value
    assert not isinstance(err, ValidationError)
    assert (err.code, err.status, err.field) == ("vram_exceeds_devices", 400, "vram_mb")
    assert "24576 MB" in err.message and "vram_mb=40000" in err.message
    assert "'big'" in err.message
    assert err.extra == {"largest_device_mb": 24576}
    assert err.to_json()["error"]["largest_device_mb"] == 24576


def test_route_is_decided_by_totals_not_by_gpu_count() -> None:
    many_small = [4096] * 8
    assert route(preset(vram_mb=4096), GPU, many_small) == Route(GPU_LANE)
    with pytest.raises(RequestError):
        route(preset(vram_mb=4097), GPU, many_small)


# -- a fleet ------------------------------------------------------------------------------------


def test_auto_on_a_gpu_less_node_goes_to_another_nodes_gpu() -> None:
    assert route(preset(), AUTO, [], elsewhere=[TWO_GPUS]) == Route(GPU_LANE)
    assert route(preset(devices="gpu"), GPU, [], elsewhere=[[], TWO_GPUS]) == Route(GPU_LANE)


def test_auto_goes_to_a_bigger_gpu_elsewhere_before_the_cpu() -> None:
    assert route(preset(vram_mb=40000), AUTO, TWO_GPUS, elsewhere=[[81920]]) == Route(GPU_LANE)


def test_gpus_n_must_fit_on_one_node_of_the_fleet() -> None:
    two = Preset(name="p", argv=("w",), devices="gpu,cpu", vram_mb=8000, gpus=2)
    assert route(two, AUTO, [24576], elsewhere=[[24576]]) == Route(
        CPU_LANE, FallbackReason.NOT_ENOUGH_GPUS)
    assert route(two, AUTO, [24576], elsewhere=[[24576, 24576]]) == Route(GPU_LANE)


def test_no_gpu_in_the_fleet_big_enough_names_the_largest() -> None:
    assert route(preset(vram_mb=90000), AUTO, [], elsewhere=[[24576], [81920]]) == Route(
        CPU_LANE, FallbackReason.VRAM_EXCEEDS_LARGEST_GPU)
    with pytest.raises(RequestError) as exc:
        route(preset(devices="gpu", vram_mb=90000), GPU, [], elsewhere=[[81920]])
    assert exc.value.code == "vram_exceeds_devices"
