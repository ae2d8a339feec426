"""The claim loop: picks the next queued work, finds it a device, hands it to the runtime.

Queues are per (preset, lane). Each pass compares their heads, highest priority first and
oldest first among equals, and places as many as capacity allows: a batch for an idle or new
session worker, or one task for a new one-off worker. Work that cannot be placed now stays
queued; the pass runs again whenever capacity changes (a batch ends, a worker exits or becomes
ready) or something is submitted.

The scheduler sees workers only through the read-only views the supervisor's queries answer
(runtime/view.py), and owns capacity: it takes ledger room before a worker starts, gives it
back when runtime reports an exit or a freed CPU slot (``CapacityEvents``), and decides which
idle workers to unload when a new one needs room (``evict_idle``).

In a fleet, a node claims only what it can place now (room is reserved before the claim; a
node without GPUs never looks at GPU lanes), and warm goes first: before starting a new
session worker for a queue head, a node leaves a head younger than ``warm_window_s`` to
another node that has that preset's worker idle (``warm_elsewhere``), and looks again when the
window ends. Alone (no fleet) the check is one call that answers False.

A worker's ledger priority follows the tasks it holds (scheduling/priorities.py); a lane with
live session workers gets another only when it pays (scheduling/scaling.py); an immediate
task that nothing can place preempts lower-priority workers (scheduling/task_preemption.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from gpulane.config import DEFAULT_TASK_PREEMPT_GRACE_S
from gpulane.errors import StoreUnavailableError
from gpulane.model import Priority, Task
from gpulane.presets import Mode, Preset, PresetRegistry
from gpulane.runtime.lanes import LaneState
from gpulane.runtime.launchers import DeviceAssignment
from gpulane.runtime.supervisor import Supervisor
from gpulane.runtime.view import WorkerView
from gpulane.scheduling.capacity_events import CapacityEvents, task_created_at
from gpulane.scheduling.ledger import Ledger
from gpulane.scheduling.priorities import follow_all
from gpulane.scheduling.queues import Queues
from gpulane.scheduling.quiet import Lane, Quiet
from gpulane.scheduling.router import CPU_LANE, GPU_LANE
from gpulane.scheduling.scaling import ScaleOut
from gpulane.scheduling.task_preemption import TaskPreemption
from gpulane.store import QueueHead, Store

log = logging.getLogger("gpulane.scheduler")

__all__ = ["CapacityEvents", "Scheduler"]

AGEING_CHECK_S = 5.0
"""Ageing is applied at most this often (and at least twice per ageing step)."""
PASS_ROUNDS_MAX = 256
"""A pass places queue heads round after round until a round places nothing; this bounds the
rounds so that one pass cannot hold the event loop for long while work keeps arriving."""
SAFETY_TICK_S = 1.0
"""A pass runs at least this often even with no wake-up, so nothing can be forgotten."""


def _nowhere(preset: str, lane: str) -> bool:
    """No other node has anything warm (a node alone)."""
    return False


class Scheduler:
    """Places queued tasks on this node's devices."""

    def __init__(self, store: Store, registry: PresetRegistry, ledger: Ledger,
                 supervisor: Supervisor, node: str) -> None:
        self.store = store
        self.registry = registry
        self.ledger = ledger
        self.supervisor = supervisor
        self.node = node
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._tick: asyncio.TimerHandle | None = None  # the safety tick's next wake-up
        self.queues = Queues(lambda: self.registry, ledger)  # worked out once per registry
        self._full: set[Lane] = set()  # queues a claim of this round emptied of all it asked
        self.passes = 0
        self._stopping = False
        self.ageing_s = 0.0  # set by the node from its settings
        self._aged_at = 0.0
        self.reserved: Callable[[], set[int]] = set  # devices kept clear for urgent leases
        self.paused = False  # a draining node claims nothing (running work finishes)
        # Fleet: another node has (preset, lane) warm, and gets the first claim for this long.
        self.warm_elsewhere: Callable[[str, str], bool] = _nowhere
        self.warm_window_s = 0.0
        self._window_wake: asyncio.TimerHandle | None = None
        self._left_since: dict[tuple[str, str], tuple[str, float]] = {}
        """(preset, lane) -> the head left to a warm node and when it was first left: a head
        is never left longer than the window, whatever clock its id was stamped by."""
        self._store_down = False  # the last pass met an unreachable store (logged once)
        self.scaling = ScaleOut(store, supervisor)  # whether a lane's next worker pays
        self.preemption = TaskPreemption(ledger, supervisor,
                                         grace_s=DEFAULT_TASK_PREEMPT_GRACE_S)
        self.quiet = Quiet()  # skips the passes that cannot place anything (quiet.py)
        supervisor.pipeline.on_freed = self._worker_freed
        supervisor.pipeline.on_next_open = self._next_opened

    def wake(self) -> None:
        if self.quiet.woken():
            self._wake.set()

    def _next_opened(self) -> None:
        """A busy worker's next batch opened: it frees no room (leases, drains and movers
        have nothing to hear), so with the queues drained it has nothing to take either."""
        if not self.quiet.drained:
            self._worker_freed()

    def _worker_freed(self) -> None:
        """A run ended or a next batch opened: a capacity change whose pass is skipped while
        the queues are drained (scheduling/quiet.py)."""
        self.quiet.notice = True
        try:
            self.supervisor.listener.capacity_changed()
        finally:
            self.quiet.notice = False

    def start(self) -> None:
        self._stopping = False
        self._safety_tick()
        self._task = asyncio.create_task(self._loop(), name="gpulane-scheduler")

    def _safety_tick(self) -> None:
        """Wake a pass every SAFETY_TICK_S: one timer for the loop's life, not a timeout armed
        and cancelled around every wait (two of them per task under sequential load)."""
        self._tick = asyncio.get_running_loop().call_later(SAFETY_TICK_S, self._safety_tick)
        self.wake()

    async def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._tick is not None:
            self._tick.cancel()
        if self._window_wake is not None:
            self._window_wake.cancel()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):  # the cancel we just asked for
                await self._task

    async def _loop(self) -> None:
        while not self._stopping:
            await self._wake.wait()  # a wake-up, or the safety tick's
            self._wake.clear()
            try:
                await self._age()
                await self.run_pass()
            except StoreUnavailableError as exc:  # Redis away: passes go on, logged once
                if not self._store_down:
                    self._store_down = True
                    log.warning("the store is unreachable (%s): nothing is claimed until it "
                                "answers again", exc)
                continue
            except Exception:  # a bad pass must not stop scheduling for good
                log.exception("scheduler pass failed")
            if self._store_down:
                self._store_down = False
                log.info("the store answers again: claiming resumes")

    async def _age(self) -> None:
        """Apply priority ageing at most a few times per ageing step."""
        if self.ageing_s <= 0:
            return
        now = time.monotonic()
        if now - self._aged_at >= min(self.ageing_s / 2, AGEING_CHECK_S):
            self._aged_at = now
            await self.store.age_queued(self.ageing_s)

    async def run_pass(self) -> int:
        """Place everything that fits now; returns how many tasks were dispatched."""
        self.passes += 1
        placed = 0
        self.quiet.started()
        self.preemption.expire()
        if self.paused:
            return 0
        await self.scaling.refresh()
        candidates = self.queues.all()
        for _ in range(PASS_ROUNDS_MAX):
            # Only queues that could take work now are looked at: with every worker busy (the
            # usual case under load, when each submit wakes a pass) a pass costs no query.
            states = self.supervisor.lane_states()  # one scan of the workers per round
            lanes = [(name, lane) for name, lane, preset in candidates
                     if self._could_place(preset, lane, states)]
            if not lanes:
                break
            heads = await self.store.queue_heads(lanes)
            self.quiet.asked(lanes, heads)
            if not heads:
                break
            heads.sort(key=lambda h: (-h.priority, h.seq))
            progress = 0
            self._full = set()
            for head in heads:
                progress += await self._place(head)
            placed += progress
            if not progress:
                break
            # Another round only for the queues whose claims got all they asked for: one
            # that got less is empty, and one that placed nothing will not place now either
            # (a round only takes capacity; what frees some wakes another pass).
            candidates = [q for q in candidates if (q[0], q[1]) in self._full]
        self.quiet.ended(self.queues.served())
        return placed

    async def _claim(self, preset: str, lane: str, asked: int, device: str) -> list[Task]:
        """Claim up to ``asked`` tasks of the queue for ``device``, noting whether the claim got
        all it asked for (its queue may hold more) or less (the queue is empty now)."""
        tasks = await self.store.claim(preset, lane, asked, self.node, device)
        if len(tasks) >= asked:
            self._full.add((preset, lane))
        else:
            self.quiet.emptied((preset, lane))
        return tasks

    def _could_place(self, preset: Preset, lane: str, states: dict[Lane, LaneState]) -> bool:
        """A cheap, in-memory "maybe": False only when placing is sure to fail now.
        ``states``: the supervisor's lane_states() of this round."""
        if lane == GPU_LANE and not self.ledger.gpus:
            return False  # work for another node's GPUs: never claimed here
        if preset.mode is Mode.SESSION:
            st = states.get((preset.name, lane))
            if st is not None and st.forming:
                return True  # a top-up: the batch holds its CPU slot already
            if st is not None and st.idle:
                return lane != CPU_LANE or self.ledger.cpu_used < self.ledger.cpu_slots
            if st is not None and st.next_room:
                return True  # a busy worker's next batch has room (its CPU slot is held)
            live = st.live if st is not None else []
            if not self.scaling.may_add(preset, lane, live, self.queues.max_workers(preset, lane)):
                return False
        if not self.supervisor.may_start(preset.name, lane):
            return False
        return lane != CPU_LANE or self.ledger.cpu_used < self.ledger.cpu_slots

    async def _place(self, head: QueueHead) -> int:
        preset = self.registry.get(head.preset)
        if preset is None:
            return 0
        if preset.mode is Mode.SESSION:
            return await self._place_session(preset, head)
        return await self._place_oneoff(preset, head)

    def capacity_changed(self) -> None:
        """Runtime reported a change (the node calls this first, synchronously): workers'
        ledger priorities follow what they hold now, and room freed for an immediate task's
        worker is held for it before anyone else can take it."""
        follow_all(self.ledger, self.supervisor.live_workers())
        self.preemption.hold_freed_room()

    def _dispatch(self, worker: WorkerView, tasks: list[Task]) -> None:
        self.supervisor.dispatch(worker.id, tasks)
        follow_all(self.ledger, [worker])

    def _preempt_for(self, preset: Preset, head: QueueHead) -> None:
        """An immediate GPU task that nothing can place: clear room for its preset's worker
        (scheduling/task_preemption.py)."""
        if head.lane == GPU_LANE and head.priority >= Priority.IMMEDIATE:
            self.preemption.preempt_for(preset, head.priority, self.reserved())

    async def _place_session(self, preset: Preset, head: QueueHead) -> int:
        lane = head.lane
        forming = self.supervisor.forming_worker(preset.name, lane)
        if forming is not None:
            # A batch waiting to fill (max_wait_ms) takes what has come in since.
            waiting, room = forming
            tasks = await self._claim(preset.name, lane, room, waiting.device.name)
            if tasks:
                self._dispatch(waiting, tasks)
            return len(tasks)
        worker = self.supervisor.idle_worker(preset.name, lane)
        if worker is None:
            live = self.supervisor.session_workers(preset.name, lane)
            reserved = None
            # A preset whose workers keep failing to start gets no new one (its circuit).
            if (self.scaling.may_add(preset, lane, live, self.queues.max_workers(preset, lane))
                    and self.supervisor.may_start(preset.name, lane)
                    and not self._left_to_warm(preset, head)):
                reserved = self._reserve(preset, lane, head.priority)
                if reserved is None and not live:  # no worker of its preset will take it
                    self._preempt_for(preset, head)
            if reserved is None:
                return await self._top_up_next(preset, lane)
            device, wid = reserved
            worker = self.supervisor.start_worker(preset, device, wid)
        if lane == CPU_LANE and not self.ledger.acquire_cpu():
            return 0
        try:
            tasks = await self._claim(preset.name, lane, worker.batch_size, worker.device.name)
        except BaseException:  # a failing store must not keep the slot taken for good
            if lane == CPU_LANE:
                self.ledger.release_cpu()
            raise
        if not tasks:
            if lane == CPU_LANE:
                self.ledger.release_cpu()
            return 0
        if lane == CPU_LANE:
            self.supervisor.hold_cpu(worker.id)
        self._dispatch(worker, tasks)
        return len(tasks)

    async def _top_up_next(self, preset: Preset, lane: str) -> int:
        """No worker is free: claim tasks for a busy worker's next batch, so it starts them
        the moment its batch ends instead of waiting on a claim then."""
        nxt = self.supervisor.next_batch_worker(preset.name, lane)
        if nxt is None:
            return 0
        worker, room = nxt
        tasks = await self._claim(preset.name, lane, room, worker.device.name)
        if tasks:
            self._dispatch(worker, tasks)
        return len(tasks)

    async def _place_oneoff(self, preset: Preset, head: QueueHead) -> int:
        lane = head.lane
        if not self.supervisor.may_start(preset.name, lane):
            return 0
        reserved = self._reserve(preset, lane, head.priority)
        if reserved is None:
            self._preempt_for(preset, head)
            return 0
        device, wid = reserved
        try:
            tasks = await self._claim(preset.name, lane, 1, device.name)
        except BaseException:  # a failing store must not keep the room taken for good
            self._unreserve(device, wid)
            raise
        if not tasks:
            self._unreserve(device, wid)
            return 0
        try:
            self.supervisor.run_oneoff(preset, device, tasks[0], wid)
        except Exception as exc:  # its input file could not be written (a full disk)...
            self._unreserve(device, wid)
            with contextlib.suppress(Exception):  # else the claim-TTL reaper requeues it
                await self.store.requeue(tasks[0].id, tasks[0].token, {
                    "kind": "internal", "message": f"the worker could not start: {exc}"},
                    spent=False)
            raise
        if device.kind == CPU_LANE:
            self.supervisor.hold_cpu(wid)
        return 1

    def _left_to_warm(self, preset: Preset, head: QueueHead) -> bool:
        """Whether to leave ``head`` to another node that has its preset warm: only while
        the head is younger than warm_window_s (then a pass looks again)."""
        if self.warm_window_s <= 0 or not self.warm_elsewhere(preset.name, head.lane):
            return False
        now, queue = time.time(), (preset.name, head.lane)
        if self._left_since.get(queue, ("", 0.0))[0] != head.task_id:
            self._left_since[queue] = (head.task_id, now)
        # The id's stamp is the submitting node's clock: one ahead of this node's must not
        # hold the head longer than the window from when this node first left it.
        born = min(task_created_at(head.task_id), self._left_since[queue][1])
        left = self.warm_window_s - (now - born)
        if left <= 0:
            return False
        if self._window_wake is None or self._window_wake.when() > (
                asyncio.get_running_loop().time() + left):
            if self._window_wake is not None:
                self._window_wake.cancel()
            self._window_wake = asyncio.get_running_loop().call_later(left, self._window_ended)
        return True

    def _window_ended(self) -> None:
        self._window_wake = None
        self.wake()

    def _unreserve(self, device: DeviceAssignment, wid: str) -> None:
        """Give back what ``_reserve`` took for a one-off that will not start."""
        if device.kind == GPU_LANE:
            self.ledger.release(wid)
        else:
            self.ledger.release_cpu()

    def _reserve(self, preset: Preset, lane: str,
                 priority: int = Priority.NORMAL) -> tuple[DeviceAssignment, str] | None:
        """Reserve room for one new worker of the preset, under the worker's id to be, held
        at ``priority`` (the head it starts for) until it holds tasks.

        GPU: room cleared for the preset by preemption first; else VRAM on the fullest
        device that fits (binpack), at most ``replicas`` session workers of one preset per
        device, none being cleared for an urgent lease or another preset's immediate task;
        ``gpus: N`` (N >= 2) takes N whole empty devices instead (see _reserve_whole). CPU: a
        one-off takes a CPU slot for its life; a session worker takes one per batch instead
        (see _place_session).
        """
        if lane == CPU_LANE:
            device = DeviceAssignment("cpu")
            if preset.mode is Mode.ONEOFF and not self.ledger.acquire_cpu():
                return None
            return device, self.supervisor.next_worker_id(preset, device)
        if preset.gpus > 1:
            return self._reserve_whole(preset, priority)
        cleared = self.preemption.take(preset.name)
        if cleared is not None:
            return cleared
        kept = self.reserved() | self.preemption.reserved_devices(preset.name)
        for index in self.ledger.fits(preset.vram_mb):
            if index in kept:
                continue  # being cleared for an urgent lease or another immediate task
            if preset.mode is Mode.SESSION and self._count_on(preset, index) >= preset.replicas:
                continue
            gpu = self.ledger.gpus[index]
            device = DeviceAssignment("gpu", index, gpu.uuid, gpu.simulated)
            wid = self.supervisor.next_worker_id(preset, device)
            if self.ledger.acquire(wid, index, preset.vram_mb, priority=priority,
                                   preemptible=preset.preemptible):
                self.preemption.done(preset.name)  # room found: no clearing needed now
                return device, wid
        # No room: unload idle workers of other presets (least recently used); their exit
        # wakes the scheduler, and the next pass finds the room.
        self.evict_idle(None, preset.vram_mb)
        return None

    def _reserve_whole(self, preset: Preset,
                       priority: int) -> tuple[DeviceAssignment, str] | None:
        """Hold ``preset.gpus`` whole GPUs for one worker: empty devices (each with at least
        the preset's vram_mb), lowest index first, none being cleared for an urgent lease.

        If too few are empty, the devices that only idle session workers hold are cleared
        (fewest declared MB first) when that would be enough; their exits wake the scheduler.
        """
        reserved = self.reserved() | self.preemption.reserved_devices()
        empty = [d for d in self.ledger.empty_devices(preset.vram_mb) if d not in reserved]
        if len(empty) >= preset.gpus:
            picked = empty[:preset.gpus]
            gpus = [self.ledger.gpus[d] for d in picked]
            device = DeviceAssignment.gpus(picked, [g.uuid for g in gpus],
                                           any(g.simulated for g in gpus))
            wid = self.supervisor.next_worker_id(preset, device)
            if self.ledger.acquire_whole(wid, picked, priority=priority,
                                         preemptible=preset.preemptible):
                return device, wid
            return None
        clearable = sorted((g for d, g in self.ledger.gpus.items()
                            if d not in reserved and d not in empty and g.holdings
                            and g.total_vram_mb >= preset.vram_mb and self._idle_only(d)),
                           key=lambda g: (g.declared_mb, g.index))
        missing = preset.gpus - len(empty)
        if len(clearable) >= missing:
            for g in clearable[:missing]:
                self.evict_idle(g.index, g.total_vram_mb)
        return None

    def evict_idle(self, device: int | None, needed_mb: int) -> bool:
        """Stop idle GPU session workers, least recently used first, until ``needed_mb`` would
        be free on ``device`` (any device when None). True if something was stopped.

        Their room comes back in the ledger only as they exit (CapacityEvents), and the
        scheduler looks again then."""
        stopped = False
        for w in self.supervisor.idle_gpu_workers(device):
            acct = self.ledger.gpus[w.device.index or 0]
            if acct.free_mb >= needed_mb:
                break
            log.info("unloading idle worker %s (%s) to make room for %d MB", w.id,
                     w.preset_name, needed_mb)
            self.supervisor.stop(w.id)
            stopped = True
        return stopped

    def _idle_only(self, index: int) -> bool:
        """Whether every holder of the GPU is an idle session worker that evict_idle(index)
        would stop (no lease, no work in flight)."""
        for h in self.ledger.holders(index):
            w = self.supervisor.worker(h.holder)
            if w is None or not w.idle or w.device.index != index:
                return False
        return True

    def _count_on(self, preset: Preset, index: int) -> int:
        return sum(1 for w in self.supervisor.session_workers(preset.name, GPU_LANE)
                   if index in w.device.gpu_indexes)
