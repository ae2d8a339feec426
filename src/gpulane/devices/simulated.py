"""Simulated GPUs: for machines without NVIDIA hardware, for tests and for demos.

The scheduler and tests can inject load with :meth:`SimulatedProvider.set_external_use`
(memory held by processes outside gpulane) and :meth:`SimulatedProvider.set_utilization`, and
faults with :meth:`SimulatedProvider.lose` (the GPU falls off the bus: its snapshots say
``health="lost"``) and :meth:`SimulatedProvider.restore`.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterable
from dataclasses import dataclass

from gpulane.devices.base import DeviceSnapshot

DEFAULT_SIMULATED_NAME = "Simulated GPU"
ACCEPTED_FORMS = "'2x24GiB', '1x80GB', '24GiB,16GiB', '2x24GiB:H100' (units GiB/GB/G, MiB/MB/M)"
MAX_SIMULATED_GPUS = 256  # far beyond any real node; catches typos like "240x24GiB"

# GPU vendors' "GB" means GiB (an "80GB" A100 reports 81920 MiB), so GB == GiB here.
_UNIT_MB = {"gib": 1024, "gb": 1024, "g": 1024, "mib": 1, "mb": 1, "m": 1}
_ITEM = re.compile(
    r"""^\s*
    (?:(?P<count>\d+)\s*[x*]\s*)?          # optional "2x"
    (?P<size>\d+(?:\.\d+)?)\s*             # "24" or "1.5"
    (?P<unit>gib|gb|g|mib|mb|m)\s*         # unit is required: "24" alone is ambiguous
    (?::\s*(?P<name>[^,]*?)\s*)?           # optional ":H100"
    $""",
    re.IGNORECASE | re.VERBOSE,
)


@dataclass(frozen=True, slots=True)
class SimulatedGpu:
    """One simulated device; ``uuid`` is derived from ``index`` when not given."""

    index: int
    total_vram_mb: int
    name: str = DEFAULT_SIMULATED_NAME
    uuid: str = ""

    def __post_init__(self) -> None:
        if self.total_vram_mb <= 0:
            raise ValueError(f"simulated GPU {self.index} needs positive VRAM")
        if not self.uuid:
            # Deterministic so leases and logs stay stable across restarts.
            object.__setattr__(self, "uuid", f"GPU-sim-0000-{self.index}")


def parse_gpu_spec(spec: str) -> list[SimulatedGpu]:
    """Parse ``"2x24GiB"``, ``"1x80GB"``, ``"24GiB,16GiB"`` or ``"2x24GiB:H100"``."""

    def bad(detail: str) -> ValueError:
        return ValueError(
            f"invalid simulated GPU spec {spec!r}: {detail}; accepted forms: {ACCEPTED_FORMS}"
        )

    if not isinstance(spec, str) or not spec.strip():
        raise bad("it is empty")
    gpus: list[SimulatedGpu] = []
    for item in spec.split(","):
        m = _ITEM.match(item)
        if m is None:
            raise bad(f"cannot read {item.strip()!r}")
        count = int(m["count"]) if m["count"] is not None else 1
        total_vram_mb = round(float(m["size"]) * _UNIT_MB[m["unit"].lower()])
        name = m["name"] or DEFAULT_SIMULATED_NAME
        if count < 1:
            raise bad(f"count in {item.strip()!r} must be at least 1")
        if total_vram_mb < 1:
            raise bad(f"size in {item.strip()!r} must be at least 1 MiB")
        if len(gpus) + count > MAX_SIMULATED_GPUS:
            raise bad(f"more than {MAX_SIMULATED_GPUS} GPUs")
        for _ in range(count):
            gpus.append(SimulatedGpu(index=len(gpus), total_vram_mb=total_vram_mb, name=name))
    return gpus


class SimulatedProvider:
    """A :class:`~gpulane.devices.base.DeviceProvider` over simulated GPUs."""

    name = "simulated"
    simulated = True

    def __init__(self, gpus: Iterable[SimulatedGpu]) -> None:
        self._gpus = tuple(gpus)
        indexes = [g.index for g in self._gpus]
        if indexes != list(range(len(indexes))):
            raise ValueError(f"simulated GPU indexes must be 0..n-1 in order, got {indexes}")
        self._lock = threading.Lock()
        self._external_use_mb = [0] * len(self._gpus)
        self._utilization_pct = [0.0] * len(self._gpus)
        self._lost: set[int] = set()

    @property
    def gpus(self) -> tuple[SimulatedGpu, ...]:
        return self._gpus

    def count(self) -> int:
        return len(self._gpus)

    def _gpu(self, index: int) -> SimulatedGpu:
        if not 0 <= index < len(self._gpus):
            last = len(self._gpus) - 1
            raise IndexError(f"no simulated GPU {index}; valid indexes are 0..{last}")
        return self._gpus[index]

    def set_external_use(self, index: int, used_vram_mb: int) -> None:
        """Pretend processes outside gpulane hold ``used_vram_mb`` on GPU ``index``."""
        gpu = self._gpu(index)
        if not 0 <= used_vram_mb <= gpu.total_vram_mb:
            raise ValueError(
                f"external use on GPU {index} must be 0..{gpu.total_vram_mb} MiB,"
                f" got {used_vram_mb}"
            )
        with self._lock:
            self._external_use_mb[index] = int(used_vram_mb)

    def set_utilization(self, index: int, pct: float) -> None:
        """Set the compute utilisation GPU ``index`` reports."""
        self._gpu(index)
        if not 0.0 <= pct <= 100.0:
            raise ValueError(f"utilization on GPU {index} must be 0..100 %, got {pct}")
        with self._lock:
            self._utilization_pct[index] = float(pct)

    def lose(self, index: int) -> None:
        """Fault hook: GPU ``index`` is lost (fell off the bus, an Xid that needs a reset).
        Its snapshots say ``health="lost"``, with N/A readings, until :meth:`restore`."""
        self._gpu(index)
        with self._lock:
            self._lost.add(index)

    def restore(self, index: int) -> None:
        """GPU ``index`` is back (reset): its snapshots say ``health="ok"`` again."""
        self._gpu(index)
        with self._lock:
            self._lost.discard(index)

    def snapshot(self) -> list[DeviceSnapshot]:
        with self._lock:
            used = list(self._external_use_mb)
            util = list(self._utilization_pct)
            lost = set(self._lost)
        return [self._reading(g, used[g.index], util[g.index], g.index in lost)
                for g in self._gpus]

    @staticmethod
    def _reading(g: SimulatedGpu, used_mb: int, util: float, lost: bool) -> DeviceSnapshot:
        if lost:  # as NVML answers for a lost GPU: its identity, no readings
            return DeviceSnapshot(
                index=g.index, uuid=g.uuid, name=g.name, total_vram_mb=g.total_vram_mb,
                used_vram_mb=None, free_vram_mb=None, utilization_pct=None,
                memory_utilization_pct=None, temperature_c=None, power_w=None,
                simulated=True, health="lost")
        return DeviceSnapshot(
            index=g.index,
            uuid=g.uuid,
            name=g.name,
            total_vram_mb=g.total_vram_mb,
            used_vram_mb=used_mb,
            free_vram_mb=g.total_vram_mb - used_mb,
            utilization_pct=util,
            memory_utilization_pct=None,  # bandwidth use has no meaning here: N/A
            temperature_c=None,
            power_w=None,
            processes=(),
            simulated=True,
        )

    def close(self) -> None:
        """Nothing to release."""

    def describe(self) -> str:
        """Short summary like ``2 simulated GPUs``."""
        n = len(self._gpus)
        return f"{n} simulated GPU{'s' if n != 1 else ''}"
