"""route() and the preset's fallback policy: no_gpu at submit, gpu_unavailable for an open
GPU start circuit (issue 13, item 3)."""

from __future__ import annotations

import pytest

from gpulane.errors import RequestError
from gpulane.model import DeviceWish
from gpulane.presets import Preset
from gpulane.scheduling.router import CPU_LANE, GPU_LANE, FallbackReason, Route, route

AUTO, GPU, CPU = DeviceWish.AUTO, DeviceWish.GPU, DeviceWish.CPU
TWO_GPUS = [24576, 16384]


def preset(devices: str = "gpu,cpu", vram_mb: int = 8000, gpus: int = 1,
           fallback: object = None) -> Preset:
    extra = {} if fallback is None else {"fallback": fallback}
    return Preset.model_validate({"name": "p", "argv": ["python", "w.py"], "devices": devices,
                                  "vram_mb": vram_mb, "gpus": gpus, **extra})


# -- no_gpu in the policy ---------------------------------------------------------------------


def test_the_default_policy_falls_back_for_no_gpu() -> None:
    assert route(preset(), AUTO, []) == Route(CPU_LANE, FallbackReason.NO_GPU)


@pytest.mark.parametrize(("gpus", "vram_mb", "n", "code", "field"), [
    ([], 8000, 1, "no_gpu", "device"),
    (TWO_GPUS, 30000, 1, "vram_exceeds_devices", "vram_mb"),
    (TWO_GPUS, 8000, 3, "not_enough_gpus", "gpus"),
])
def test_without_no_gpu_an_auto_task_is_refused_as_device_gpu_would_be(
        gpus: list[int], vram_mb: int, n: int, code: str, field: str) -> None:
    p = preset(vram_mb=vram_mb, gpus=n, fallback=["error", "oom"])
    with pytest.raises(RequestError) as auto:
        route(p, AUTO, gpus)
    with pytest.raises(RequestError) as strict:
        route(p, GPU, gpus)
    assert (auto.value.code, auto.value.field, auto.value.status) == \
        (strict.value.code, strict.value.field, strict.value.status) == (code, field, 400)
    assert "fallback policy (fallback: [error, oom]) excludes no_gpu" in auto.value.message
    assert "add no_gpu" in auto.value.message
    assert "fallback policy" not in strict.value.message


def test_fallback_false_refuses_and_says_so() -> None:
    with pytest.raises(RequestError) as info:
        route(preset(fallback=False), AUTO, [])
    assert info.value.code == "no_gpu"
    assert "fallback: []" in info.value.message


def test_a_gpu_elsewhere_in_the_fleet_needs_no_fallback() -> None:
    assert route(preset(fallback=[]), AUTO, [], [TWO_GPUS]) == Route(GPU_LANE)


@pytest.mark.parametrize("fallback", [[], ["busy"]])
def test_cpu_only_and_cpu_first_presets_are_not_fallbacks(fallback: list[str]) -> None:
    # devices [cpu] or [cpu, gpu]: the CPU is their choice, so the policy has no say.
    assert route(preset("cpu", vram_mb=0, fallback=fallback), AUTO, []) == Route(CPU_LANE)
    assert route(preset("cpu,gpu", fallback=fallback), AUTO, []) == Route(CPU_LANE)


def test_device_cpu_is_not_a_fallback_whatever_the_policy() -> None:
    assert route(preset(fallback=False), CPU, TWO_GPUS) == Route(CPU_LANE)


# -- gpu_unavailable: the GPU start circuit is open -------------------------------------------


def test_an_open_gpu_circuit_sends_auto_tasks_to_the_cpu() -> None:
    assert route(preset(), AUTO, TWO_GPUS, gpu_unavailable=True) == \
        Route(CPU_LANE, FallbackReason.GPU_UNAVAILABLE)
    assert FallbackReason.GPU_UNAVAILABLE == "gpu_unavailable"


def test_a_closed_circuit_keeps_the_gpu() -> None:
    assert route(preset(), AUTO, TWO_GPUS, gpu_unavailable=False) == Route(GPU_LANE)


@pytest.mark.parametrize("fallback", [["no_gpu", "oom"], False, ["busy"]])
def test_without_error_in_the_policy_an_open_circuit_keeps_the_gpu_lane(
        fallback: object) -> None:
    assert route(preset(fallback=fallback), AUTO, TWO_GPUS, gpu_unavailable=True) == \
        Route(GPU_LANE)


def test_an_open_circuit_never_moves_strict_or_gpu_only_tasks() -> None:
    assert route(preset(), GPU, TWO_GPUS, gpu_unavailable=True) == Route(GPU_LANE)
    assert route(preset("gpu"), AUTO, TWO_GPUS, gpu_unavailable=True) == Route(GPU_LANE)


def test_without_a_gpu_the_reason_stays_no_gpu_when_the_circuit_is_open() -> None:
    assert route(preset(), AUTO, [], gpu_unavailable=True) == \
        Route(CPU_LANE, FallbackReason.NO_GPU)
