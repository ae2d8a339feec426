"""The dynamic fallbacks of queued work: GPU-lane tasks that move to the CPU lane as they wait.

One loop (``FallbackMover``) for three movers. Each moves only ``auto`` tasks (a task sent
with device "gpu", or with fallback false, waits for a GPU whatever happens), and only for
the kinds in its preset's ``fallback`` (Preset.falls_back):

- busy -> ``gpu_busy``: a queued task moves when its expected wait for a GPU passes the
  preset's fallback_after_ms and the CPU would start it sooner. Expected wait = waited so far
  + until a GPU worker can take work (none warm: a first worker's load time, measured or
  LOAD_GUESS_S) + tasks ahead of it / the GPU lane's drain rate (the per-worker rate
  measured on this node x its warm GPU workers; not measured yet: that term is left out, so
  a guess never moves work). The CPU's start is figured the same way from its own queue,
  workers and rate, and while the CPU lane's rate is unmeasured it takes one task per worker
  (whose batch measures it). So the CPU takes no more than it can start before the GPU would
  have: what stays on the GPU waits about fallback_after_ms at most. While other presets hold
  every CPU slot (none of them this preset's) nothing moves: the CPU would not start it.
- error -> ``gpu_unavailable``: the preset's GPU start circuit on this node is open (its
  workers keep failing to start, and the cooldown runs) and no GPU worker of it is live: its
  queued tasks move. A half-open circuit moves nothing: the task at the head starts the probe
  worker, and once a probe is ready new tasks go to the GPU again (the router sends them to
  the CPU only while the circuit is open).
- error -> ``device_lost``: every GPU of this node is lost and no other live node has a GPU:
  queued tasks move (those that ran on the lost GPU were requeued by device_health.py).

Every move sets the task's fallback_reason, appends a ``fallback`` event ({reason, from, to}
and what explains it) and is counted in the node's fallback log (``record``).

Cost: a round reads QueueStats (O(1), no query) and stops there unless a preset that falls
back has GPU-lane tasks queued (and, for busy, the CPU lane could start one more); then it
reads at most SCAN_LIMIT of them per preset (id, device wish and created_at: no input), at
most once per tick of that preset. Rounds run on a wake-up (a submit, a capacity
change), at most one per ROUND_GAP_S, and on the shortest tick.

In a fleet the GPU lane drains on every node with GPUs; each node figures the wait from its
own warm workers and measures, so with GPUs on several nodes the wait is overestimated and
tasks may move a little early. A node without GPUs moves nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from gpulane.errors import StoreUnavailableError
from gpulane.model import DeviceWish, FallbackReason
from gpulane.presets import FallbackKind, Preset, PresetRegistry
from gpulane.runtime.outcomes import FALLBACK_EVENT
from gpulane.runtime.supervisor import Supervisor
from gpulane.scheduling.ledger import Ledger
from gpulane.scheduling.queues import PerRegistry
from gpulane.scheduling.router import CPU_LANE, GPU_LANE
from gpulane.store import NewEvent, QueuedTask, Store

log = logging.getLogger("gpulane.fallback")

BUSY_TICK_S = 0.25
"""The longest wait between two rounds while a preset falls back on busy (fallback_after_ms
/ 4 when that is shorter): a task's expected wait is looked at again this often."""
IDLE_TICK_S = 1.0
"""The wait between rounds when no preset falls back on busy (circuits, lost GPUs)."""
ROUND_GAP_S = 0.02
"""The shortest time between two rounds: a storm of submits wakes one round per gap."""
SCAN_LIMIT = 1000
"""GPU-lane tasks a round reads per preset (store.queued), head first."""
LOAD_GUESS_S = 2.0
"""A worker's load time before one was measured on this node (both lanes alike)."""
ERROR_TAIL_CHARS = 300
"""How much of a failing worker's last error a gpu_unavailable event carries."""


@dataclass(frozen=True, slots=True)
class LaneOutlook:
    """How soon one (preset, lane) starts a queued task, as this node measures it."""

    ready_s: float
    """Until a worker can take work: 0 with one warm, else a first worker's load time."""
    rate: float | None
    """Tasks per second the lane drains (per-worker rate x workers); None: not measured."""
    first: int
    """Tasks its workers take at once (one each) before any rate is known."""

    def start_s(self, ahead: int) -> float | None:
        """Seconds until a task with ``ahead`` tasks before it starts; None: unknown."""
        if self.rate is not None:
            return self.ready_s + ahead / self.rate
        return self.ready_s if ahead < self.first else None


def outlook(supervisor: Supervisor, preset: Preset, lane: str) -> LaneOutlook:
    """The lane's outlook from its warm workers and the supervisor's measures."""
    warm = supervisor.warm_count(preset.name, lane)
    measures = supervisor.measures
    ready = 0.0 if warm else measures.load_s(preset.name, lane)
    per_worker = measures.drain_rate(preset.name, lane)
    return LaneOutlook(LOAD_GUESS_S if ready is None else ready,
                       None if per_worker is None else per_worker * max(warm, 1),
                       max(warm, 1))


def _nowhere() -> bool:
    """No other node has a GPU (a node alone)."""
    return False


class FallbackMover:
    """Moves queued GPU-lane tasks to the CPU lane when their preset's policy says so."""

    def __init__(self, store: Store, registry: Callable[[], PresetRegistry],
                 supervisor: Supervisor, ledger: Ledger, *,
                 record: Callable[[str, str, int], None], on_moved: Callable[[], None],
                 elsewhere: Callable[[], bool] = _nowhere,
                 clock: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.store = store
        self.registry = registry
        self.supervisor = supervisor
        self.ledger = ledger
        self.record = record  # (reason, preset, n): the node's fallback log
        self.on_moved = on_moved  # the CPU lane has new work: the scheduler looks
        self.elsewhere = elsewhere  # another live node has a GPU
        self.clock = clock  # wall clock, the one tasks' created_at is stamped by
        self.monotonic = monotonic  # when scans ran
        self.paused: Callable[[], bool] = lambda: False  # a draining node moves nothing
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self.moved = 0  # tasks moved since start
        self._scanned: dict[str, float] = {}  # preset -> when its busy scan last ran (monotonic)
        self._candidates = PerRegistry(registry, _moving_presets)  # not twice per round

    def wake(self) -> None:
        """Something changed (a submit, a worker's end): a round runs soon."""
        self._wake.set()

    def start(self) -> None:
        self._stopping = False
        self._task = asyncio.create_task(self._loop(), name="gpulane-fallback")

    async def stop(self) -> None:
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):  # the cancel we just asked for
                await self._task

    def _tick_s(self, presets: Sequence[Preset]) -> float:
        busy = [_busy_tick_s(p) for p in presets if p.falls_back(FallbackKind.BUSY)]
        return min(busy) if busy else IDLE_TICK_S

    async def _loop(self) -> None:
        while not self._stopping:
            with contextlib.suppress(TimeoutError):  # no wake-up: the tick's round
                async with asyncio.timeout(self._tick_s(self._candidates())):
                    await self._wake.wait()
            self._wake.clear()
            try:
                await self.run_round()
            except StoreUnavailableError:
                pass  # the scheduler logs the outage; the next round tries again
            except Exception:  # a bad round must not stop the movers for good
                log.exception("fallback round failed")
            await asyncio.sleep(ROUND_GAP_S)

    async def run_round(self) -> int:
        """Move what the presets' policies say should move now; how many tasks moved."""
        if self.paused() or not self.ledger.gpus:
            return 0
        presets = self._candidates()
        if not presets:
            return 0
        stats = await self.store.queue_stats()
        moved = 0
        for preset in presets:
            st = stats.get(preset.name)
            if st is None or not st.lanes.get(GPU_LANE):
                continue  # no GPU backlog: nothing to look at
            broken = self._broken(preset)
            if broken is None and not preset.falls_back(FallbackKind.BUSY):
                continue
            if not self._scan_due(preset):
                continue  # looked at less than a tick ago
            if broken is not None:
                reason, data = broken
                tasks = await self.store.queued(preset.name, GPU_LANE, SCAN_LIMIT)
                moved += await self._move(preset, [t for t in tasks if _movable(t)], reason,
                                          data)
            else:
                moved += await self._busy(preset, st.lanes.get(CPU_LANE, 0))
        if moved:
            self.moved += moved
            self.on_moved()
        return moved

    def _scan_due(self, preset: Preset) -> bool:
        """A scan reads up to SCAN_LIMIT tasks: once per tick of the preset (half a tick of
        slack for the timer), however many submits wake the loop meanwhile."""
        now = self.monotonic()
        if now - self._scanned.get(preset.name, float("-inf")) < _busy_tick_s(preset) / 2:
            return False
        self._scanned[preset.name] = now
        return True

    def _broken(self, preset: Preset) -> tuple[str, dict[str, Any]] | None:
        """Why the preset's GPU lane cannot run here now (error kind), with what explains
        it; None when it can."""
        if not preset.falls_back(FallbackKind.ERROR):
            return None
        if self.ledger.all_lost and not self.elsewhere():
            return FallbackReason.DEVICE_LOST, {
                "lost_gpus": sorted(self.ledger.gpus),
                "message": "every GPU of this node is lost"}
        circuit = self.supervisor.circuits.get((preset.name, GPU_LANE))
        if circuit is None or self.supervisor.session_workers(preset.name, GPU_LANE):
            return None
        if not circuit.is_open():
            return None
        state = circuit.to_json()
        return FallbackReason.GPU_UNAVAILABLE, {
            "start_failures": state["start_failures"], "retry_in_s": state["retry_in_s"],
            "last_error": (circuit.last_error or "")[-ERROR_TAIL_CHARS:]}

    async def _busy(self, preset: Preset, cpu_queued: int) -> int:
        """Move the tasks whose expected wait for a GPU passes fallback_after_ms, where the
        CPU would start them sooner (see the module's docstring)."""
        gpu = outlook(self.supervisor, preset, GPU_LANE)
        cpu = outlook(self.supervisor, preset, CPU_LANE)
        if cpu.start_s(cpu_queued) is None:
            return 0  # its rate unmeasured, the CPU lane has all it can start: no read
        if not self._cpu_slot_for(preset):
            return 0  # other presets hold every CPU slot: the CPU starts nothing soon
        after_s = preset.fallback_after_ms / 1000
        tasks = await self.store.queued(preset.name, GPU_LANE, SCAN_LIMIT)
        now = self.clock()
        picked: list[QueuedTask] = []
        expected: list[float] = []
        for i, task in enumerate(tasks):
            ahead = i - len(picked)  # those picked before it leave the GPU queue
            gpu_s = gpu.start_s(ahead)
            gpu_s = gpu.ready_s if gpu_s is None else gpu_s  # no rate yet: no guess
            wait_s = max(now - task.created_at, 0.0) + gpu_s
            if not _movable(task) or wait_s <= after_s:
                continue
            cpu_s = cpu.start_s(cpu_queued + len(picked))
            if cpu_s is None:
                break  # the CPU starts no more before its rate is known
            if cpu_s >= gpu_s:
                continue
            picked.append(task)
            expected.append(wait_s)
        if not picked:
            return 0
        return await self._move(preset, picked, FallbackReason.GPU_BUSY, {
            # The least of those moved together: each one's was at least this.
            "expected_wait_ms": round(min(expected) * 1000),
            "fallback_after_ms": preset.fallback_after_ms, "gpu_queued": len(tasks),
            "gpu_tasks_per_s": None if gpu.rate is None else round(gpu.rate, 2)})

    def _cpu_slot_for(self, preset: Preset) -> bool:
        """Whether the preset's CPU lane can run a batch soon: a CPU slot is free, or one of
        its own CPU workers holds one (a batch there takes a slot: the outlook's rate is
        only true while the preset gets slots)."""
        if self.ledger.cpu_used < self.ledger.cpu_slots:
            return True
        return any(w.busy for w in self.supervisor.session_workers(preset.name, CPU_LANE))

    async def _move(self, preset: Preset, tasks: list[QueuedTask], reason: str,
                    data: dict[str, Any]) -> int:
        if not tasks:
            return 0
        event = NewEvent(FALLBACK_EVENT, {"reason": reason, "from": GPU_LANE, "to": CPU_LANE,
                                          **data})
        moved = await self.store.move_queued([t.id for t in tasks], CPU_LANE, reason, [event])
        if moved:
            self.record(reason, preset.name, len(moved))
            log.info("%d queued task(s) of %s moved to the CPU lane (%s)", len(moved),
                     preset.name, reason)
        return len(moved)


def _moving_presets(registry: PresetRegistry) -> list[Preset]:
    """The presets whose GPU tasks may move (a round runs on every submit and task end: this
    is worked out once per registry)."""
    return [p for p in registry.values() if p.allows_gpu and (
        p.falls_back(FallbackKind.BUSY) or p.falls_back(FallbackKind.ERROR))]


def _busy_tick_s(preset: Preset) -> float:
    """How often a preset that falls back on busy has its GPU queue looked at."""
    return min(BUSY_TICK_S, preset.fallback_after_ms / 4000)


def _movable(task: QueuedTask) -> bool:
    """Only ``auto`` tasks may move (those read are queued in the GPU lane)."""
    return task.device_wish is DeviceWish.AUTO
