"""What runtime tells scheduling about capacity (``CapacityEvents``), and a task id's birth.

Split from scheduler.py, which re-exports ``CapacityEvents`` for the node.
"""

from __future__ import annotations

from collections.abc import Callable

from gpulane.scheduling.ledger import Ledger


def task_created_at(task_id: str) -> float:
    """When a task was created (time.time()): the first 12 hex digits of its id are its
    creation in milliseconds (store/base.py new_task_id)."""
    try:
        return int(task_id[:12], 16) / 1000
    except ValueError:
        return 0.0  # not an id of ours: as if old, so it is never held back


class CapacityEvents:
    """Scheduling's ``RuntimeListener``: the ledger follows what runtime reports, and whoever
    waits for capacity (the claim loop, waiting leases) hears of it through ``on_change``."""

    def __init__(self, ledger: Ledger, on_change: Callable[[], None],
                 on_fallback: Callable[[str, str, int], None] | None = None) -> None:
        self.ledger = ledger
        self.on_change = on_change
        self.on_fallback = on_fallback  # (reason, preset, n): the node's fallback log

    def worker_exited(self, worker_id: str) -> None:
        self.ledger.release(worker_id)

    def cpu_slot_freed(self, worker_id: str) -> None:
        self.ledger.release_cpu()

    def capacity_changed(self) -> None:
        self.on_change()

    def fell_back(self, reason: str, preset: str, n: int) -> None:
        if self.on_fallback is not None:
            self.on_fallback(reason, preset, n)
