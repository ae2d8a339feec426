"""Poison isolation: a preset's crash ceiling, which finds the input that kills its workers.

When a session worker dies while it still owes more than one task of the batch it was running,
nobody can tell which input killed it. Those tasks become *suspects*: they go back to the
queue with their attempts given back (the crash is held against none of them yet), and the
preset's batches are capped at half the number the worker owed. A suspect in a batch that
crashes again halves the cap again, so a crashing input ends up alone in a batch of one, after
at most log2(max_size) crashes that cost nobody an attempt. Only a crash that leaves the worker
owing a single task spends that task's attempt (it is the poison); after ``max_attempts`` it
is ``failed`` with kind ``worker_died``. While it retries the cap stays at 1, so it never takes
neighbours down with it.

The ceiling is kept per preset by the pipeline, not per worker: it outlives the worker that
crashed and caps the batchers of the workers that replace it (fixed and adaptive alike).

It lifts when no suspect is left. A suspect is resolved when its run reaches a final outcome
on this node (finished in any state, failed for good, timed out, cancelled while running).
A suspect that never comes back (cancelled in the queue, taken by another node) is forgotten
SUSPECT_TTL_S after it was last suspected, so a vanished task cannot pin the cap for good.
Bounded either way: the cap only ever halves while suspects remain, and it lifts at the latest
SUSPECT_TTL_S after the last crash.

A suspicion that lapses (the suspect waited in the queue, or its new worker took to boot, past
SUSPECT_TTL_S) would let a poison input land in a full batch again after every crash, for ever,
never spending an attempt. So the ceiling also counts each task's crashed batches beyond the
TTL: past UNSPENT_CRASHES_MAX (more halvings than any batch size needs) the task is ``worn``
and spends its attempt as if it stood alone. A batch-mate shares few of its crashes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

SUSPECT_TTL_S = 600.0
"""How long a suspect that never ran again keeps its preset's batches capped (seconds)."""
UNSPENT_CRASHES_MAX = 16
"""Crashed batches a task may be in without spending an attempt: halving 2**16 ends sooner."""
CRASHES_REMEMBERED = 10_000
"""Tasks whose crashes are counted at most (the oldest are forgotten first)."""


class CrashCeiling:
    """One preset's cap on batch size while inputs suspected of crashing workers are out."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._cap: int | None = None
        self._suspects: dict[str, float] = {}  # task id -> when it stops being suspected
        self._crashes_of: dict[str, int] = {}  # task id -> crashed batches it was in
        self.crashes = 0  # worker deaths this ceiling answered

    @property
    def cap(self) -> int | None:
        """The most tasks a batch of the preset may take now; None when nothing is suspected."""
        if self._cap is None:
            return None
        now = self._clock()
        for task_id in [t for t, until in self._suspects.items() if until <= now]:
            del self._suspects[task_id]
        if not self._suspects:
            self._cap = None
        return self._cap

    @property
    def suspects(self) -> frozenset[str]:
        return frozenset(self._suspects)

    def crashed(self, task_ids: Iterable[str], owed: int) -> int:
        """A worker died owing ``owed`` tasks of its running batch; ``task_ids`` are the ones
        to suspect (cancelled ones aside). Returns the new cap: half of ``owed``, at least 1,
        never above the cap already in force."""
        self.crashes += 1
        until = self._clock() + SUSPECT_TTL_S
        for task_id in task_ids:
            self._suspects[task_id] = until
            self._crashes_of[task_id] = self._crashes_of.pop(task_id, 0) + 1  # newest last
        while len(self._crashes_of) > CRASHES_REMEMBERED:
            del self._crashes_of[next(iter(self._crashes_of))]
        half = max(1, owed // 2)
        current = self.cap
        if not self._suspects:
            return half  # nothing to suspect (all of them cancelled): no cap
        self._cap = half if current is None else min(current, half)
        return self._cap

    def worn(self, task_id: str) -> bool:
        """The task was in UNSPENT_CRASHES_MAX crashed batches: its next crash spends."""
        return self._crashes_of.get(task_id, 0) >= UNSPENT_CRASHES_MAX

    def resolved(self, task_id: str) -> None:
        """The task's run reached a final outcome: it is no longer suspected."""
        self._crashes_of.pop(task_id, None)
        if self._suspects.pop(task_id, None) is not None and not self._suspects:
            self._cap = None

    def to_json(self) -> dict[str, object]:
        return {"cap": self.cap, "suspects": len(self._suspects), "crashes": self.crashes}
