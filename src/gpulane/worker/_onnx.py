"""ONNX Runtime's execution providers that fit a worker's device (see Context.onnx_providers).

Pure choice here (which providers, in which order, with which device id); the worker's
context imports onnxruntime only when a worker asks, so the SDK still needs no third-party
package.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

CPU = "CPUExecutionProvider"
"""ONNX Runtime's CPU provider: every build has it, and it always comes last."""

NVIDIA_PROVIDERS = ("CUDAExecutionProvider",)
"""An NVIDIA GPU's providers, best first. TensorRT is left out on purpose: it compiles an
engine per input shape when the session opens (minutes), which a worker should choose itself."""

AMD_PROVIDERS = ("MIGraphXExecutionProvider", "ROCMExecutionProvider")
"""An AMD GPU's providers, best first (onnxruntime-rocm / onnxruntime-migraphx builds)."""

ANY_GPU_PROVIDERS = ("DmlExecutionProvider",)
"""Providers for any vendor's GPU (DirectML: onnxruntime-directml on Windows)."""

AMD_ENV = ("HIP_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES")
"""Set by the node for a worker on an AMD GPU (as CUDA_VISIBLE_DEVICES is for NVIDIA)."""

INSTALL_HINT = ("pip install onnxruntime (CPU), onnxruntime-gpu (NVIDIA CUDA), "
                "onnxruntime-rocm or onnxruntime-migraphx (AMD ROCm), "
                "onnxruntime-directml (DirectML on Windows)")
"""What to install, named in the error a worker without onnxruntime gets."""


def gpu_vendor(env: Mapping[str, str]) -> str:
    """``amd`` when the node handed the worker an AMD GPU (HIP/ROCR_VISIBLE_DEVICES naming a
    device), else ``nvidia``. Only meaningful for a worker placed on a GPU. A negative ordinal
    (``-1``, what a CPU worker gets to hide an AMD node's GPUs) names none."""
    values = (env.get(name, "").strip() for name in AMD_ENV)
    return "amd" if any(v and not v.startswith("-") for v in values) else "nvidia"


def device_index(device: str) -> int:
    """The ordinal in ``cuda:1`` (0 when there is none): the worker's visible devices are
    renumbered from 0, so a worker on one GPU always sees index 0."""
    _, _, tail = device.partition(":")
    return int(tail) if tail.isdigit() else 0


def providers_for(device: str, env: Mapping[str, str],
                  available: Sequence[str]) -> list[str | tuple[str, dict[str, Any]]]:
    """The providers to open an InferenceSession with, best first, CPU always last.

    ``device`` is the context's (``cpu`` on the CPU and on a simulated GPU); ``available`` is
    ``onnxruntime.get_available_providers()``. A GPU provider this onnxruntime build lacks is
    skipped, so a worker placed on a GPU with the CPU-only wheel still runs (on the CPU).
    """
    if device == "cpu":
        return [CPU]
    wanted = AMD_PROVIDERS if gpu_vendor(env) == "amd" else NVIDIA_PROVIDERS
    options = {"device_id": device_index(device)}
    chosen: list[str | tuple[str, dict[str, Any]]] = [
        (name, dict(options)) for name in (*wanted, *ANY_GPU_PROVIDERS) if name in available]
    return [*chosen, CPU]


def provider_name(provider: str | tuple[str, dict[str, Any]]) -> str:
    return provider if isinstance(provider, str) else provider[0]
