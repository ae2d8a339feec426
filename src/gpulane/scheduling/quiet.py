"""Whether a scheduler pass can find anything to do: skip the ones that cannot.

Every run that ends frees its worker, and runtime says so (Pipeline.on_freed); so does a busy
worker's next batch opening. Each used to wake a scheduler pass, which looked at every queue
and found them empty when the task that ended was the only one: under sequential load, two
passes per task that place nothing.

``Quiet`` remembers whether the last pass left every queue empty (``drained``): each queue
either came back from ``queue_heads`` without a head, or its claim got less than it asked.
Anything that may queue work (a submit, a requeue, a fallback move, another node's submit, a
lease, the safety tick) wakes the scheduler through ``Scheduler.wake``, which forgets it; a
pass during which such a wake came does not set it. A freed worker's notice then wakes no
pass while the queues are drained: there is nothing it could place.
"""

from __future__ import annotations

from collections.abc import Iterable

from gpulane.store import QueueHead

Lane = tuple[str, str]
"""A queue: (preset, "gpu" | "cpu")."""


class Quiet:
    """What the scheduler's last pass saw of its queues."""

    def __init__(self) -> None:
        self.drained = False
        """The last pass left every queue empty and nothing was queued since."""
        self.notice = False
        """A freed worker's notice is being passed on: its wake is a quiet one."""
        self._wakes = 0  # wakes that may have queued work, ever
        self._since = 0  # _wakes when the current pass started
        self._empty: set[Lane] = set()  # queues the current pass found empty

    def woken(self) -> bool:
        """A wake-up came: False when it is a freed worker's notice and the queues are
        drained (no pass is needed); else the queues are not known empty any more."""
        if self.notice and self.drained:
            return False
        self._wakes += 1
        self.drained = False
        return True

    def started(self) -> None:
        self.drained = False
        self._since = self._wakes
        self._empty = set()

    def asked(self, lanes: Iterable[Lane], heads: list[QueueHead]) -> None:
        """``queue_heads(lanes)`` answered ``heads``: the queues without one are empty."""
        headed = {(h.preset, h.lane) for h in heads}
        self._empty.update(q for q in lanes if q not in headed)

    def emptied(self, lane: Lane) -> None:
        """A claim on ``lane`` got less than it asked for: the queue is empty now."""
        self._empty.add(lane)

    def ended(self, queues: frozenset[Lane]) -> None:
        """The pass ended without a fault; ``queues``: every queue that could hold work this
        node may place."""
        self.drained = self._wakes == self._since and queues <= self._empty
