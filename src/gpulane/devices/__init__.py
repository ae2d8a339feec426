"""GPU and CPU device providers: real GPUs through NVML or AMD SMI, or simulated ones."""

from __future__ import annotations

from gpulane.devices.amd import AmdProvider
from gpulane.devices.base import (
    AMD_UUID_PREFIX,
    CpuPool,
    DeviceProvider,
    DeviceSnapshot,
    GpuProcess,
    cpu_pool,
    gpu_vendor,
    usable_cores,
)
from gpulane.devices.nvml import NvmlProvider
from gpulane.devices.simulated import (
    DEFAULT_SIMULATED_NAME,
    SimulatedGpu,
    SimulatedProvider,
    parse_gpu_spec,
)

DEFAULT_SIMULATED_GPUS = "2x24GiB"

__all__ = [
    "AMD_UUID_PREFIX",
    "DEFAULT_SIMULATED_GPUS",
    "DEFAULT_SIMULATED_NAME",
    "AmdProvider",
    "CpuPool",
    "DeviceProvider",
    "DeviceSnapshot",
    "GpuProcess",
    "NvmlProvider",
    "SimulatedGpu",
    "SimulatedProvider",
    "cpu_pool",
    "gpu_vendor",
    "parse_gpu_spec",
    "select_provider",
    "usable_cores",
]


NO_GPUS = frozenset({"none", "0"})
"""simulate_gpus values that mean: this node has no GPU at all (CPU-only)."""


def select_provider(simulate: str | None, prefer_nvml: bool = True) -> tuple[DeviceProvider, str]:
    """Pick the GPU source; return it with a human-readable reason for logs and /v1/gpus.

    ``simulate`` (a spec like ``"2x24GiB"``) forces simulated GPUs; a blank string counts
    as not given, since an empty environment variable usually means "unset". Otherwise
    NVML is tried (unless ``prefer_nvml`` is false), then AMD SMI, the first that finds GPUs
    winning, falling back to ``DEFAULT_SIMULATED_GPUS``. A bad ``simulate`` spec raises
    ``ValueError``.
    """
    if simulate is not None and simulate.strip().lower() in NO_GPUS:
        return SimulatedProvider([]), "no GPUs, as requested (simulate_gpus=none): CPU only"
    if simulate is not None and simulate.strip():
        sim = SimulatedProvider(parse_gpu_spec(simulate))
        return sim, f"using {sim.describe()} ({simulate.strip()}) as requested"
    if prefer_nvml:
        nvml, why = NvmlProvider.probe()
        if nvml is not None:
            return nvml, f"using {nvml.describe()} via NVML"
        prefix = f"NVML not available ({why})"
    else:
        prefix = "NVML disabled"
    amd, why = AmdProvider.probe()
    if amd is not None:
        return amd, f"{prefix}; using {amd.describe()} via AMD SMI"
    sim = SimulatedProvider(parse_gpu_spec(DEFAULT_SIMULATED_GPUS))
    return sim, (f"{prefix}; AMD SMI not available ({why}); "
                 f"using {sim.describe()} ({DEFAULT_SIMULATED_GPUS})")
