"""Device readings and the provider protocol every GPU source implements.

A reading is a frozen :class:`DeviceSnapshot`; ``None`` in a field means the
driver could not say (N/A), never zero, so callers can tell "idle" from "unknown".
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

AMD_UUID_PREFIX = "AMD-GPU-"
"""How an AMD GPU's uuid starts (devices/amd.py). The uuid is what every placement carries,
so it is how a worker's launcher tells an AMD GPU (HIP/ROCR variables, /dev/kfd) from an
NVIDIA one (CUDA_VISIBLE_DEVICES, --gpus)."""


def gpu_vendor(uuid: str | None) -> str:
    """``amd`` for a uuid the AMD provider gave, else ``nvidia`` (simulated GPUs included)."""
    return "amd" if uuid is not None and uuid.startswith(AMD_UUID_PREFIX) else "nvidia"


@dataclass(frozen=True, slots=True)
class GpuProcess:
    """A process holding memory on a GPU, as the driver reports it."""

    pid: int
    used_vram_mb: int | None
    name: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"pid": self.pid, "used_vram_mb": self.used_vram_mb, "name": self.name}


@dataclass(frozen=True, slots=True)
class DeviceSnapshot:
    """Immutable reading of one GPU at one moment; ``None`` means N/A."""

    index: int
    uuid: str
    name: str
    total_vram_mb: int
    used_vram_mb: int | None
    free_vram_mb: int | None
    utilization_pct: float | None
    memory_utilization_pct: float | None
    temperature_c: float | None
    power_w: float | None
    processes: tuple[GpuProcess, ...] = ()
    simulated: bool = False
    health: str = "ok"
    """"ok", or "lost": the driver no longer reaches it (fell off the bus, an Xid that
    needs a reset). Nothing is placed on a lost GPU; what ran there goes back to a queue."""

    def to_json(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "uuid": self.uuid,
            "name": self.name,
            "total_vram_mb": self.total_vram_mb,
            "used_vram_mb": self.used_vram_mb,
            "free_vram_mb": self.free_vram_mb,
            "utilization_pct": self.utilization_pct,
            "memory_utilization_pct": self.memory_utilization_pct,
            "temperature_c": self.temperature_c,
            "power_w": self.power_w,
            "processes": [p.to_json() for p in self.processes],
            "simulated": self.simulated,
            "health": self.health,
        }


@runtime_checkable
class DeviceProvider(Protocol):
    """A source of GPU readings: real (NVML) or simulated."""

    name: str
    simulated: bool

    def count(self) -> int:
        """Number of GPUs this provider exposes."""
        ...

    def snapshot(self) -> list[DeviceSnapshot]:
        """Read every GPU now. Never raises; unreadable fields are ``None``."""
        ...

    def close(self) -> None:
        """Release driver resources. Safe to call more than once."""
        ...


@dataclass(frozen=True, slots=True)
class CpuPool:
    """CPU capacity for tasks that do not need a GPU."""

    cores: int
    concurrency: int

    def to_json(self) -> dict[str, Any]:
        return {"cores": self.cores, "concurrency": self.concurrency}


def usable_cores() -> int:
    """Cores this process may run on (affinity-aware, so containers pinned to CPUs count right)."""
    affinity = getattr(os, "sched_getaffinity", None)
    if affinity is not None:
        try:
            n = len(affinity(0))
        except OSError:
            n = 0
        if n > 0:
            return n
    return os.cpu_count() or 1


def cpu_pool(concurrency: int | None = None) -> CpuPool:
    """Describe the CPU pool; ``concurrency`` defaults to the usable core count."""
    cores = usable_cores()
    if concurrency is None:
        concurrency = cores
    if concurrency < 1:
        raise ValueError(f"CPU concurrency must be at least 1, got {concurrency}")
    return CpuPool(cores=cores, concurrency=concurrency)
