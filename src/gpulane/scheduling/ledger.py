"""Who holds how much VRAM on which GPU, and how many CPU slots are in use.

The ledger is the node's single source of truth for capacity: placement asks it where a
holder fits, and every start and stop of a worker goes through acquire/release, so a device is
never over-committed even while workers are still loading.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from gpulane.devices import DeviceSnapshot

WHOLE_DEVICE_SLACK_MB = 1024
"""Driver-reported use a GPU may show and still count as empty for a whole-device holder:
NVML's memory info counts the driver's own reservation (hundreds of MiB on an idle
data-centre GPU) as used. Capped at 1/16 of a small GPU's memory."""


@dataclass(slots=True)
class Holding:
    holder: str  # worker id or lease id
    device: int
    vram_mb: int
    priority: int = 50
    preemptible: bool = True
    kind: str = "worker"  # "worker" (gpulane's own), "lease" (an outside service) or
    # "clearing" (room freed so far for an immediate task's worker: task_preemption.py)
    whole: bool = False  # holds the whole device: nothing else is placed beside it


@dataclass(slots=True)
class GpuAccount:
    index: int
    uuid: str
    name: str
    total_vram_mb: int
    measured_free_mb: int | None = None  # NVML's view, which sees processes outside gpulane
    simulated: bool = False
    holdings: dict[str, Holding] = field(default_factory=dict)
    lost: bool = False  # its snapshot says health "lost": nothing is placed on it

    @property
    def declared_mb(self) -> int:
        return sum(h.vram_mb for h in self.holdings.values())

    @property
    def free_mb(self) -> int:
        """Declared room, never more than what the driver says is free (it sees outside use)."""
        free = self.total_vram_mb - self.declared_mb
        if self.measured_free_mb is not None:
            free = min(free, self.measured_free_mb)
        return max(free, 0)

    @property
    def held_whole(self) -> bool:
        return any(h.whole for h in self.holdings.values())

    @property
    def slack_mb(self) -> int:
        """Driver-reported use that still leaves the device empty (WHOLE_DEVICE_SLACK_MB)."""
        return min(WHOLE_DEVICE_SLACK_MB, self.total_vram_mb // 16)

    @property
    def empty(self) -> bool:
        """Nobody holds any of it: no holding here, and the driver sees (almost) no use."""
        if self.holdings or self.total_vram_mb <= 0 or self.lost:
            return False
        return self.measured_free_mb is None or \
            self.measured_free_mb >= self.total_vram_mb - self.slack_mb


class Ledger:
    """VRAM per GPU and CPU slots for one node."""

    def __init__(self, gpus: list[DeviceSnapshot], cpu_slots: int) -> None:
        self.gpus = {g.index: GpuAccount(g.index, g.uuid, g.name, g.total_vram_mb,
                                         g.free_vram_mb, g.simulated,
                                         lost=g.health == "lost") for g in gpus}
        self.cpu_slots = cpu_slots
        self.cpu_used = 0

    def gpu_totals_mb(self) -> list[int]:
        return [g.total_vram_mb for g in self.gpus.values()]

    @property
    def all_lost(self) -> bool:
        """The node has GPUs and every one of them reads lost: nothing runs on a GPU here."""
        return bool(self.gpus) and all(g.lost for g in self.gpus.values())

    def observe(self, snapshots: list[DeviceSnapshot]) -> None:
        """Take in fresh device readings (measured free VRAM)."""
        for snap in snapshots:
            acct = self.gpus.get(snap.index)
            if acct is not None:
                acct.measured_free_mb = snap.free_vram_mb
                acct.lost = snap.health == "lost"

    def fits(self, vram_mb: int) -> list[int]:
        """GPUs with room for ``vram_mb``, fullest first (binpack keeps big holes open)."""
        room = [g for g in self.gpus.values()
                if g.free_mb >= vram_mb and not g.held_whole and not g.lost]
        room.sort(key=lambda g: (g.free_mb, g.index))
        return [g.index for g in room]

    def acquire(self, holder: str, device: int, vram_mb: int, *, priority: int = 50,
                preemptible: bool = True, kind: str = "worker") -> bool:
        acct = self.gpus[device]
        if holder in acct.holdings:
            return True
        if acct.free_mb < vram_mb or acct.held_whole or acct.lost:
            return False
        acct.holdings[holder] = Holding(holder, device, vram_mb, priority, preemptible, kind)
        return True

    def acquire_whole(self, holder: str, devices: list[int], *, priority: int = 50,
                      preemptible: bool = True, kind: str = "worker") -> bool:
        """Hold every one of ``devices`` whole (all or none); each must be empty.

        A whole holding declares the device's total VRAM, so slices see no room there, and
        ``fits`` skips the device even for a holder that asks for 0 MB.
        """
        accts = [self.gpus[d] for d in devices]
        if len(set(devices)) != len(devices) or not all(
                a.empty or (holder in a.holdings and a.holdings[holder].whole) for a in accts):
            return False
        for a in accts:
            a.holdings[holder] = Holding(holder, a.index, a.total_vram_mb, priority,
                                         preemptible, kind, whole=True)
        return True

    def empty_devices(self, min_total_mb: int = 0) -> list[int]:
        """GPUs nobody holds any of (with at least ``min_total_mb`` of memory), by index:
        candidates for a whole-device request."""
        return [g.index for g in self.gpus.values()
                if g.empty and g.total_vram_mb >= min_total_mb]

    def holders(self, device: int | None = None) -> list[Holding]:
        return [h for g in self.gpus.values() if device is None or g.index == device
                for h in g.holdings.values()]

    def release(self, holder: str) -> None:
        for acct in self.gpus.values():
            acct.holdings.pop(holder, None)

    def set_priority(self, holder: str, priority: int) -> None:
        """Hold ``holder``'s room at ``priority`` from now on (a worker follows the priority
        of the work it serves: what preemption compares)."""
        for acct in self.gpus.values():
            held = acct.holdings.get(holder)
            if held is not None:
                held.priority = priority

    def acquire_cpu(self) -> bool:
        if self.cpu_used >= self.cpu_slots:
            return False
        self.cpu_used += 1
        return True

    def release_cpu(self) -> None:
        self.cpu_used = max(0, self.cpu_used - 1)
