"""How many queued tasks one session worker takes at a time, and how long it waits for them.

Sizes count items, not tasks (runtime/items.py): a task of 32 texts is 32 of ``max_size``.
A preset's ``batch`` settings give the bounds (``max_size``, ``max_wait_ms``) and the mode:

* fixed (``adaptive: false``): every batch takes up to ``max_size`` tasks;
* adaptive (the default): the size starts at 1 and follows the load. After a full batch (a
  backlog is likely) it grows, at most doubling and never past where the measured batch
  latency would cross ``target_latency_ms``; a batch that overshot the target shrinks it in
  proportion. With no target it doubles up to ``max_size`` while batches come back full.

Waiting: a batch that is not full may wait up to ``max_wait_ms`` for more tasks (the scheduler
tops it up as they arrive). An adaptive batcher waits only once its size has grown past 1,
that is, once batches have been filling; a wait that brought nothing halves the size again,
so a lone caller soon stops paying for it.

Out of memory: a batch that failed with kind ``oom`` lowers this worker's ceiling to half its
size for good (the model does not shrink), and the batch's tasks run again in smaller ones.

Crashes: the preset's crash ceiling (runtime/poison.py), shared by all its workers, caps the
size too while inputs suspected of killing a worker are out.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from gpulane.presets import BatchSettings
from gpulane.runtime.poison import CrashCeiling

GROWTH_FACTOR = 2.0
"""At most this much bigger per batch: growth stays measured even when latency looks low."""


@dataclass(slots=True)
class BatchStats:
    batches: int = 0
    tasks: int = 0
    items: int = 0  # what the batches held: a task of N texts is N (runtime/items.py)
    last_size: int = 0
    last_latency_ms: float | None = None
    ooms: int = 0
    busy_s: float = 0.0  # summed batch latencies: how long the worker had work
    sizes: dict[int, int] = field(default_factory=dict)  # batch size -> how many batches


class Batcher:
    """The batch policy of one session worker (fixed or adaptive, with an OOM ceiling)."""

    def __init__(self, settings: BatchSettings, crash: CrashCeiling | None = None) -> None:
        self.max_size = settings.max_size
        self.adaptive = settings.adaptive and settings.max_size > 1
        self.target_s = (settings.target_latency_ms / 1000
                         if settings.target_latency_ms is not None else None)
        self.max_wait_s = settings.max_wait_ms / 1000
        self.ceiling = self.max_size  # lowered by OOM, never raised again
        self._limit = 1 if self.adaptive else self.max_size
        self.stats = BatchStats()
        self.crash = crash  # the preset's, shared with its other workers

    @property
    def size(self) -> int:
        """How many tasks the next batch may take."""
        cap = self.crash.cap if self.crash is not None else None
        size = min(self._limit, self.ceiling)
        return max(1, size if cap is None else min(size, cap))

    def tasks_for(self, items: int) -> int:
        """How many tasks to claim for ``items`` items of room: by the mean items per task
        seen so far (one each before any), at least one."""
        s = self.stats
        per_task = s.items / s.tasks if s.tasks else 1.0
        return max(1, int(items / per_task))

    @property
    def waits(self) -> bool:
        """Whether a batch that is not full should wait up to ``max_wait_s`` for more."""
        return self.max_wait_s > 0 and self.size > 1

    def observe(self, n: int, seconds: float, tasks: int | None = None, *,
                full: bool) -> None:
        """A batch of ``n`` items (in ``tasks`` tasks, ``n`` when not said) took ``seconds``
        from being sent to its last finish; ``full`` when it took as many as it was allowed
        (more were probably waiting)."""
        s = self.stats
        # A task bigger than the batch runs alone: it counts as a full batch, not its own
        # length, else one task of 10,000 texts would set the mean items per task (and so
        # every later claim) to one task a batch for the next thousands of tasks.
        n = min(n, self.max_size)
        s.batches += 1
        s.tasks += n if tasks is None else tasks
        s.items += n
        s.last_size = n
        s.last_latency_ms = round(seconds * 1000, 3)
        s.busy_s += seconds
        s.sizes[n] = s.sizes.get(n, 0) + 1
        if not self.adaptive:
            return
        limit = self.size
        if self.target_s is not None and seconds > self.target_s:
            # Overshot: shrink in proportion (latency grows about linearly with batch size).
            self._limit = max(1, min(limit - 1, int(limit * self.target_s / seconds)))
        elif full:
            grown = limit * GROWTH_FACTOR
            if self.target_s is not None and seconds > 0:
                grown = min(grown, limit * self.target_s / seconds)
            self._limit = min(self.ceiling, max(limit, int(grown)))

    def waited_in_vain(self) -> None:
        """A batch waited ``max_wait_s`` and still holds a single task: stop waiting so long."""
        if self.adaptive:
            self._limit = max(1, self.size // 2)

    def oom(self, n: int) -> None:
        """A batch of ``n`` ran out of device memory: never try that many again."""
        self.stats.ooms += 1
        self.ceiling = max(1, min(self.ceiling, n // 2))
        self._limit = min(self._limit, self.ceiling)

    def to_json(self) -> dict[str, object]:
        s = self.stats
        return {"mode": "adaptive" if self.adaptive else "fixed", "size": self.size,
                "max_size": self.max_size, "ceiling": self.ceiling,
                "target_latency_ms": None if self.target_s is None else self.target_s * 1000,
                "max_wait_ms": self.max_wait_s * 1000, "batches": s.batches, "tasks": s.tasks,
                "items": s.items,
                "mean_size": round(s.items / s.batches, 2) if s.batches else None,
                "last_size": s.last_size, "last_latency_ms": s.last_latency_ms,
                "busy_s": round(s.busy_s, 6), "ooms": s.ooms,
                "crash_ceiling": None if self.crash is None else self.crash.cap}
