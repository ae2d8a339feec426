"""Whether a node takes new tasks now: the refusals of a submit, a bulk submit or a retry.

A draining node refuses with 503 ``draining`` (Retry-After: DRAINING_RETRY_S) unless another
live node of its fleet takes work (the queue is the fleet's: the node gets ``draining`` as
False then, and the task waits for that node); a preset's full
queue with 429 ``queue_full`` (admission.py); more tasks of one preset than its max_queued
could ever hold with 422 ``exceeds_max_queued``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from gpulane.errors import RequestError, UnavailableError, ValidationError
from gpulane.model import TaskSpec
from gpulane.presets import PresetRegistry
from gpulane.scheduling.admission import Admission
from gpulane.store import Store

DRAINING_RETRY_S = 30
"""Retry-After of a submit refused while the node drains: a restart or a resume is usually
a matter of tens of seconds."""


class Intake:
    """The refusals for queueing tasks on one node."""

    def __init__(self, name: str, store: Store, admission: Admission,
                 registry: Callable[[], PresetRegistry], draining: Callable[[], bool]) -> None:
        self.name = name
        self.store = store
        self.admission = admission
        self.registry = registry
        self.draining = draining

    async def admit(self, specs: Sequence[TaskSpec], *, bulk: bool) -> None:
        """Raise the refusal (503 while draining, 429 past a queue limit) for queueing
        ``specs``. A repeated keyed submit was taken before: it still gets its task (the
        store answers it), so only the new ones are weighed."""
        refusal = await self.refusal([s.preset for s in specs], bulk)
        if refusal is None:
            return
        fresh = [s for s in specs if s.idempotency_key is None
                 or await self.store.task_for_key(s.idempotency_key) is None]
        if len(fresh) < len(specs):
            refusal = await self.refusal([s.preset for s in fresh], bulk) if fresh else None
        if refusal is not None:
            raise refusal

    async def refusal(self, presets: Sequence[str], bulk: bool) -> RequestError | None:
        """The refusal (503, 422, 429) for queueing one task of each of ``presets``."""
        if self.draining():
            return UnavailableError(
                "draining", f"node {self.name} is draining and takes no new tasks: retry "
                f"after {DRAINING_RETRY_S} s or send them to another node",
                headers={"Retry-After": str(DRAINING_RETRY_S)})
        return await self.queue_refusal(presets, bulk)

    async def queue_refusal(self, presets: Sequence[str], bulk: bool) -> RequestError | None:
        """The refusal (422, 429) for queueing one task of each of ``presets``, or None."""
        stats = await self.store.queue_stats()
        self.admission.observe(stats)
        adding: dict[str, tuple[int, str]] = {}
        for i, name in enumerate(presets):
            n, where = adding.get(name, (0, f"tasks[{i}]." if bulk else ""))
            adding[name] = (n + 1, where)
        registry = self.registry()
        for preset, (n, where) in adding.items():
            found = registry.get(preset)
            limit = self.admission.limit(found.max_queued if found else None)
            if n > limit:
                # Never fits, however long the caller waits: not a 429 to come back after.
                return ValidationError(
                    "exceeds_max_queued", f"this request adds {n} tasks of preset {preset!r}, "
                    f"more than its max_queued of {limit} can ever hold: send at most {limit} "
                    "at once, or raise max_queued", field=f"{where}preset",
                    extra={"adding": n, "max_queued": limit})
            refusal = self.admission.refusal(preset, found.max_queued if found else None,
                                             stats[preset].queued if preset in stats else 0,
                                             n, where)
            if refusal is not None:
                return refusal
        return None
