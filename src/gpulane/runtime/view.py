"""What runtime shows the layer above it, and what it tells it.

Runtime knows nothing of scheduling: the scheduler reads workers through ``WorkerView`` (read
only properties; runtime's own ``Worker`` objects are handed out as views, so a query costs no
copy), and runtime reports what happened to the capacity it was given through the
``RuntimeListener`` it is handed at construction. Scheduling owns the ledger and decides what
each event means for it.
"""

from __future__ import annotations

from typing import Protocol

from gpulane.runtime.launchers import DeviceAssignment


class WorkerView(Protocol):
    """One live worker as the scheduler may see it (never change it through this)."""

    @property
    def id(self) -> str: ...

    @property
    def preset_name(self) -> str: ...

    @property
    def device(self) -> DeviceAssignment: ...

    @property
    def session(self) -> bool: ...

    @property
    def idle(self) -> bool:
        """A ready session worker with nothing in flight: stopping it loses no work."""

    @property
    def batch_size(self) -> int:
        """How many tasks its next batch may take (1 for a one-off)."""

    @property
    def last_used(self) -> float:
        """When it last got or ended work (time.monotonic)."""

    @property
    def alive(self) -> bool:
        """Neither stopping (drained, unloaded) nor gone: it may still take work."""

    @property
    def loading(self) -> bool:
        """Alive and not ready yet (a model loading)."""

    @property
    def busy(self) -> bool:
        """Alive and holding work."""

    @property
    def serving_priority(self) -> int | None:
        """The highest priority of the tasks it holds; None when it holds none."""


class RuntimeListener(Protocol):
    """What runtime reports about the capacity it was handed."""

    def worker_exited(self, worker_id: str) -> None:
        """The worker is gone: whatever the ledger holds under its id is free."""

    def cpu_slot_freed(self, worker_id: str) -> None:
        """The worker gave back the CPU slot it held for its work (see Supervisor.hold_cpu)."""

    def capacity_changed(self) -> None:
        """Something may be placeable now: a worker freed up, became ready or exited, a next
        batch opened, or tasks went back to the queue."""

    def fell_back(self, reason: str, preset: str, n: int) -> None:
        """``n`` tasks of ``preset`` went back to the CPU lane for ``reason``
        (model.FallbackReason: a GPU OOM in a batch of one, a lost GPU)."""
