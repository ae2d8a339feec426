"""Workers hold their ledger entry at the priority of the work they serve.

A worker's holding starts at the priority of the queue head it was started for; on every
dispatch it becomes the highest priority of the tasks it holds, and when it holds none it
drops to ``IDLE_PRIORITY``. Preemption (an immediate lease's, an immediate task's) compares
these, so a worker serving immediate tasks is not preempted for normal work, one serving
background work is, and an idle worker of urgent work is not protected for good.
"""

from __future__ import annotations

from collections.abc import Iterable

from gpulane.model import Priority
from gpulane.runtime.view import WorkerView
from gpulane.scheduling.ledger import Ledger

IDLE_PRIORITY = Priority.MIN
"""The ledger priority of a worker that holds no task: it serves nothing, so stopping it loses
nothing."""


def follow(ledger: Ledger, worker: WorkerView) -> None:
    """The worker's ledger entry takes the priority of the work it holds now."""
    served = worker.serving_priority
    ledger.set_priority(worker.id, IDLE_PRIORITY if served is None else served)


def follow_all(ledger: Ledger, workers: Iterable[WorkerView]) -> None:
    """``follow`` for every GPU worker (a CPU worker holds nothing in the ledger)."""
    for w in workers:
        if w.device.kind == "gpu":
            follow(ledger, w)
