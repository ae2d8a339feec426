"""The worker SDK's ONNX Runtime providers: chosen by the worker's device and vendor, CPU last."""

from __future__ import annotations

import sys
import types
from typing import Any

import pytest

from gpulane.presets import Preset
from gpulane.runtime.launchers import DeviceAssignment, worker_env
from gpulane.worker import Context
from gpulane.worker._onnx import CPU, device_index, gpu_vendor, providers_for

EVERY = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "MIGraphXExecutionProvider",
         "ROCMExecutionProvider", "DmlExecutionProvider", CPU]


def test_the_cpu_and_a_simulated_gpu_get_the_cpu_provider_only() -> None:
    assert providers_for("cpu", {"CUDA_VISIBLE_DEVICES": "0"}, EVERY) == [CPU]
    assert providers_for("cpu", {"HIP_VISIBLE_DEVICES": "0"}, EVERY) == [CPU]


def test_an_nvidia_gpu_gets_cuda_then_directml_then_the_cpu() -> None:
    env = {"CUDA_VISIBLE_DEVICES": "3", "GPU_DEVICE": "cuda:0"}
    assert gpu_vendor(env) == "nvidia"
    assert providers_for("cuda:0", env, EVERY) == [
        ("CUDAExecutionProvider", {"device_id": 0}), ("DmlExecutionProvider", {"device_id": 0}),
        CPU]


def test_an_amd_gpu_gets_migraphx_and_rocm_never_cuda() -> None:
    for name in ("HIP_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES"):
        env = {name: "1", "GPU_DEVICE": "cuda:0"}
        assert gpu_vendor(env) == "amd"
        assert providers_for("cuda:1", env, EVERY) == [
            ("MIGraphXExecutionProvider", {"device_id": 1}),
            ("ROCMExecutionProvider", {"device_id": 1}),
            ("DmlExecutionProvider", {"device_id": 1}), CPU]
    assert gpu_vendor({"HIP_VISIBLE_DEVICES": " "}) == "nvidia"  # set but empty: not AMD


def test_the_environment_the_node_gives_picks_the_vendor() -> None:
    """worker_env as the launcher builds it: AMD GPU, NVIDIA GPU, the CPU of an AMD node."""
    preset = Preset(name="p", argv=("python", "w.py"))
    amd = worker_env(preset, DeviceAssignment("gpu", 2, "AMD-GPU-0x1234"), None)
    nvidia = worker_env(preset, DeviceAssignment("gpu", 1, "GPU-5678"), None)
    cpu = worker_env(preset, DeviceAssignment("cpu"), None)
    assert providers_for(amd["GPU_DEVICE"], amd, EVERY)[:2] == [
        ("MIGraphXExecutionProvider", {"device_id": 0}),
        ("ROCMExecutionProvider", {"device_id": 0})]
    assert providers_for(nvidia["GPU_DEVICE"], nvidia, EVERY)[0] == (
        "CUDAExecutionProvider", {"device_id": 0})
    assert providers_for(cpu["GPU_DEVICE"], cpu, EVERY) == [CPU]
    assert gpu_vendor({"HIP_VISIBLE_DEVICES": "-1"}) == "nvidia"  # a CPU worker's: no GPU


def test_providers_the_build_lacks_are_skipped() -> None:
    amd = {"HIP_VISIBLE_DEVICES": "0"}
    assert providers_for("cuda:0", amd, ["ROCMExecutionProvider", CPU]) == [
        ("ROCMExecutionProvider", {"device_id": 0}), CPU]
    assert providers_for("cuda:0", {}, ["AzureExecutionProvider", CPU]) == [CPU]
    assert providers_for("cuda:0", amd, ["CUDAExecutionProvider", CPU]) == [CPU]


def test_device_index_reads_the_ordinal() -> None:
    assert [device_index(d) for d in ("cuda:0", "cuda:2", "cuda", "cpu")] == [0, 2, 0, 0]


class FakeSession:
    def __init__(self, model: Any, sess_options: Any = None, providers: Any = None) -> None:
        self.model, self.providers = model, providers

    def get_providers(self) -> list[str]:
        return [CPU]  # as onnxruntime does when no GPU provider could be used


def fake_onnxruntime(available: list[str]) -> types.ModuleType:
    module = types.ModuleType("onnxruntime")
    module.get_available_providers = lambda: list(available)  # type: ignore[attr-defined]
    module.InferenceSession = FakeSession  # type: ignore[attr-defined]
    return module


def test_ctx_opens_a_session_on_its_providers_and_warns_when_a_gpu_falls_to_the_cpu(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime",
                        fake_onnxruntime(["CUDAExecutionProvider", CPU]))
    lines: list[str] = []
    ctx = Context(device="cuda:0", env={"CUDA_VISIBLE_DEVICES": "2"}, _write=lines.append)
    assert ctx.onnx_providers() == [("CUDAExecutionProvider", {"device_id": 0}), CPU]
    session = ctx.onnx_session(b"model bytes")
    assert session.model == b"model bytes" and session.providers == ctx.onnx_providers()
    assert len(lines) == 1 and '"warning"' in lines[0] and "onnxruntime-gpu" in lines[0]
    cpu = Context(device="cpu", env={}, _write=lines.append)
    cpu.onnx_session(b"model bytes")
    assert len(lines) == 1  # the CPU on the CPU is no surprise


def test_ctx_follows_the_placement_not_torch_and_a_simulated_gpu_is_the_cpu(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime",
                        fake_onnxruntime(["ROCMExecutionProvider", CPU]))
    # torch (CPU-only) said no CUDA, so ctx.device is "cpu"; the node placed it on an AMD GPU
    amd = {"GPU_DEVICE": "cuda:0", "HIP_VISIBLE_DEVICES": "1"}
    assert Context(device="cpu", env=amd).onnx_providers() == [
        ("ROCMExecutionProvider", {"device_id": 0}), CPU]
    simulated = Context(device="cpu", simulated=True, env=amd)
    assert simulated.onnx_device() == "cpu" and simulated.onnx_providers() == [CPU]


def test_ctx_without_onnxruntime_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import raises ImportError
    with pytest.raises(ImportError, match="onnxruntime-rocm"):
        Context(device="cpu").onnx_providers()


def test_ctx_reads_the_real_onnxruntime() -> None:
    ort = pytest.importorskip("onnxruntime")
    providers = Context(device="cpu", env={}).onnx_providers()
    assert providers == [CPU] and CPU in ort.get_available_providers()
