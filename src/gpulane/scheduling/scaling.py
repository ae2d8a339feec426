"""Scale-out by cost: whether a (preset, lane) that has session workers gets another one.

A new worker pays only if the backlog would not drain with the workers there are before it is
ready: ``backlog / (workers x drain rate) > load time``, from the lane's measured figures
(runtime/measures.py). A burst that the warm workers clear in a second gets no worker whose
model load would take the same cores for several (issue 13: 64 concurrent embed clients got
27 results/s, one client alone 34/s, because a second worker loaded in the middle of the
burst). Besides the rule:

* a lane with no live worker gets one (as before): nothing else would ever run its queue;
* one worker of a lane loads at a time: the next is decided with the first one's figures;
* no second worker before the first has measured a drain rate (nothing to weigh yet);
* an unmeasured load time is guessed as ``start_timeout_s / LOAD_GUESS_DIVISOR``;
* ``replicas x GPUs`` (the caller's cap) stays the upper bound;
* workers on simulated GPUs run on the host's cores: see ``cpu_room``.

The backlog is the lane's queued count from the store's O(1) counters (``QueueStats.lanes``,
the preset's whole queue on a store that does not count lanes), read at most every
``BACKLOG_FRESH_S`` and only while some lane has live session workers, so a pass of a busy
node usually costs no query. In a fleet that count is the whole fleet's queue, which every
node serving the lane drains: a node weighs only its workers' share of it (``elsewhere``,
the other nodes' live workers of the lane from their registry entries), else each node
would add workers for the backlog all of them together clear.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

from gpulane.devices import usable_cores
from gpulane.presets import Preset
from gpulane.runtime.supervisor import Supervisor
from gpulane.runtime.view import WorkerView
from gpulane.scheduling.router import CPU_LANE, GPU_LANE
from gpulane.store import QueueStats, Store

BACKLOG_FRESH_S = 0.25
"""A backlog reading is reused for this long: a pass after each submit reads it at most four
times a second (one round trip on a Redis store)."""
LOAD_GUESS_DIVISOR = 4.0
"""Unmeasured load time = start_timeout_s / this: presets set start_timeout_s to a few times
their expected load (embed: 120 s for a load of seconds), so a quarter of it errs long, which
errs toward not starting a worker before the lane's first one has been measured."""


def wants_another(*, live: int, loading: int, backlog: int, drain_rate: float | None,
                  load_s: float, cap: int) -> bool:
    """The rule: whether a lane with ``live`` session workers (``loading`` of them not ready)
    and ``backlog`` queued tasks gets one more worker, given one worker's measured
    ``drain_rate`` (tasks/s, None: not measured) and a new one's ``load_s``."""
    if live >= cap:
        return False
    if live == 0:
        return True
    if loading > 0 or drain_rate is None or drain_rate <= 0:
        return False
    # Would the backlog outlast a new worker's load with the workers there are?
    return backlog > live * drain_rate * load_s


def backlog_of(stats: QueueStats | None, lane: str) -> int:
    """Queued tasks of one lane: the lane's counter, else the preset's whole queue (a store
    that does not count per lane errs toward a larger backlog)."""
    if stats is None:
        return 0
    if stats.lanes:
        return stats.lanes.get(lane, 0)
    return stats.queued


def cpu_room(workers: list[WorkerView], cores: int) -> bool:
    """Whether one more simulated-GPU worker may load: fewer workers loading or busy on the
    host's cores (simulated-GPU and CPU-lane ones alike) than the host has cores.

    A simulated GPU has no compute of its own: its worker's model runs on the host's CPU,
    like the node itself and the CPU lane's workers (those the busy fallback keeps busy
    too). Past one loading or busy worker per core they only share the same cores, so
    another one adds no throughput, and its model load (seconds of full-core work) slows
    every worker already serving. Idle workers take no CPU and do not count; nor does a
    lane's first worker, which is always allowed (else its queue would never run).
    """
    working = sum(1 for w in workers
                  if (w.device.simulated or w.device.kind == CPU_LANE) and w.session
                  and (w.loading or w.busy))
    return working < cores


class ScaleOut:
    """Decides, per (preset, lane), whether a new session worker pays (see module doc)."""

    def __init__(self, store: Store, supervisor: Supervisor) -> None:
        self.store = store
        self.supervisor = supervisor
        self.cores = usable_cores()
        self._stats: Mapping[str, QueueStats] = {}
        self._read_at = float("-inf")
        # (preset, lane) -> other live nodes' session workers there (the node sets it from
        # its fleet view; alone, none).
        self.elsewhere: Callable[[str, str], int] = lambda preset, lane: 0

    async def refresh(self) -> None:
        """Read the backlog counters again when the last reading is stale and some lane has
        live session workers (only then does the rule look at a backlog)."""
        now = time.monotonic()
        if now - self._read_at < BACKLOG_FRESH_S:
            return
        if not any(w.session for w in self.supervisor.live_workers()):
            return
        self._stats = await self.store.queue_stats()
        self._read_at = now

    def may_add(self, preset: Preset, lane: str, live: list[WorkerView], cap: int) -> bool:
        """Whether (preset, lane), with ``live`` session workers, gets one more (cap included)."""
        if not live:
            return cap > 0
        measures = self.supervisor.measures
        load_s = measures.load_s(preset.name, lane)
        if load_s is None:
            load_s = preset.start_timeout_s / LOAD_GUESS_DIVISOR
        backlog = backlog_of(self._stats.get(preset.name), lane)
        others = self.elsewhere(preset.name, lane)
        if others > 0:  # the fleet's queue: this node's workers drain their share of it
            backlog = backlog * len(live) // (len(live) + others)
        if not wants_another(live=len(live), loading=sum(1 for w in live if w.loading),
                             backlog=backlog,
                             drain_rate=measures.drain_rate(preset.name, lane),
                             load_s=load_s, cap=cap):
            return False
        if lane == GPU_LANE and any(w.device.simulated for w in live):
            return cpu_room(self.supervisor.live_workers(), self.cores)
        return True
