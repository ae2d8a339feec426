"""One worker as the node runs it: its process and everything the node keeps about it.

A ``Worker`` owns its ``WorkerProcess``, its preset, its batcher (session workers), the task
runs it holds, the batches sent to it, the next batch forming on the node, its timers (the
watchdog, the forming batch's flush, the next batch's opening, a preempted worker's kill after
its grace period), the CPU slot it may hold, a
one-off's input file and whether it is being drained for a lease. It is created and dropped as
a unit: ``close()`` cancels every timer, removes the input file and lets go of every run.

A run leaves the worker only through ``release()``, which marks it done in the same step: a
run is never done and still held, nor held and done. What the pipeline does around that (send
the next batch, free the worker) lives in runtime/pipeline.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from gpulane.presets import Preset
from gpulane.runtime.batcher import Batcher
from gpulane.runtime.launchers import DeviceAssignment
from gpulane.runtime.poison import CrashCeiling
from gpulane.runtime.taskrun import TaskRun
from gpulane.runtime.worker_process import WorkerProcess, WorkerState


@dataclass(slots=True)
class SentBatch:
    """A batch given to a session worker, and the tasks of it the worker still owes."""

    owed: set[str]
    size: int
    full: bool  # it took as many tasks as the batcher allowed: more were probably waiting
    started: float | None  # when the worker could start it; None while one runs before it
    items: int = 0  # what its tasks count towards the batch (runtime/items.py)


def _cancel(timer: asyncio.TimerHandle | None) -> None:
    if timer is not None:
        timer.cancel()


class Worker:
    """A worker process and the node's state about it (a ``WorkerView`` for scheduling)."""

    def __init__(self, proc: WorkerProcess, preset: Preset,
                 crash: CrashCeiling | None = None) -> None:
        self.proc = proc
        self.preset = preset
        self.batcher: Batcher | None = Batcher(preset.batch, crash) if proc.session else None
        self.runs: dict[str, TaskRun] = {}  # task id -> run, oldest first: what it holds
        self.sent: deque[SentBatch] = deque()  # batches given to it, the running one first
        self.next: dict[str, TaskRun] = {}  # the batch after those, forming on the node
        self.watchdog: asyncio.TimerHandle | None = None  # on the oldest task it owes
        self.forming: asyncio.TimerHandle | None = None  # a waiting batch's flush
        self.next_timer: asyncio.TimerHandle | None = None  # when its next batch opens
        self.grace_timer: asyncio.TimerHandle | None = None  # a preempted worker's kill
        self.next_open = False  # its next batch takes tasks (see Pipeline.dispatch)
        self.holds_cpu = False  # it holds a CPU slot for its current work
        self.input_file: str | None = None  # a one-off's input, when too big for the env
        self.preempted = False  # being drained for an urgent lease
        self.start_failure_counted = False  # counted against its preset's circuit once
        self.timed_out = False  # killed by the node for a task past its timeout_s

    # -- the view scheduling reads (runtime/view.py) -------------------------------------------

    @property
    def id(self) -> str:
        return self.proc.id

    @property
    def preset_name(self) -> str:
        return self.proc.preset_name

    @property
    def device(self) -> DeviceAssignment:
        return self.proc.device

    @property
    def session(self) -> bool:
        return self.proc.session

    @property
    def state(self) -> WorkerState:
        return self.proc.state

    @property
    def alive(self) -> bool:
        return self.proc.alive

    @property
    def last_used(self) -> float:
        return self.proc.last_used

    @property
    def idle(self) -> bool:
        return self.proc.session and self.proc.state is WorkerState.READY and not self.runs

    @property
    def batch_size(self) -> int:
        """How many tasks its next batch may take: its batcher's size in items over the mean
        items per task (runtime/items.py)."""
        return self.batcher.tasks_for(self.batcher.size) if self.batcher is not None else 1

    @property
    def held_items(self) -> int:
        """The items of the runs it holds."""
        return sum(r.items for r in self.runs.values())

    @property
    def loading(self) -> bool:
        """Alive and not ready yet: its process is starting (a model loading)."""
        return self.proc.alive and not self.proc.started

    @property
    def busy(self) -> bool:
        """Alive and holding work (a batch sent, forming, or its next one)."""
        return self.proc.alive and bool(self.runs)

    @property
    def serving_priority(self) -> int | None:
        """The highest priority of the tasks it holds; None when it holds none."""
        return max((r.task.priority for r in self.runs.values() if not r.cancelled),
                   default=None)

    # -- runs ------------------------------------------------------------------------------------

    def hold(self, runs: dict[str, TaskRun]) -> None:
        self.runs.update(runs)

    def release(self, run: TaskRun) -> bool:
        """Let go of a run for good and mark it done, in one step; False if it was done
        already. It no longer counts in the runs held, the next batch, or its sent batch."""
        if run.done:
            return False
        run.done = True
        if self.runs.pop(run.id, None) is None:
            return True
        self.next.pop(run.id, None)
        for batch in self.sent:
            if run.id in batch.owed:
                batch.owed.discard(run.id)
                break
        self.proc.tasks_done += 1
        self.proc.last_used = time.monotonic()
        return True

    def take_next(self) -> list[TaskRun]:
        """The next batch, taken off the node to be sent (or requeued)."""
        held = list(self.next.values())
        self.next = {}
        return held

    def take_cpu_slot(self) -> bool:
        """Give up the CPU slot; True if it held one (the listener hears of it)."""
        held, self.holds_cpu = self.holds_cpu, False
        return held

    # -- timers ----------------------------------------------------------------------------------

    def disarm_watchdog(self) -> None:
        _cancel(self.watchdog)
        self.watchdog = None

    def stop_forming(self) -> None:
        _cancel(self.forming)
        self.forming = None

    def close_next(self) -> None:
        """No next batch forms until the running one's timing opens it again."""
        _cancel(self.next_timer)
        self.next_timer = None
        self.next_open = False

    def close(self) -> None:
        """Drop the worker's state as a unit: every timer, the input file, every run."""
        self.disarm_watchdog()
        self.stop_forming()
        self.close_next()
        _cancel(self.grace_timer)
        self.grace_timer = None
        if self.input_file is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.input_file)
            self.input_file = None
        for run in self.runs.values():
            run.done = True
        self.runs.clear()
        self.next.clear()
        self.sent.clear()

    def to_json(self) -> dict[str, Any]:
        """Its /v1/workers entry: the process, and for a session worker its batching."""
        view = self.proc.to_json()
        view["batch"] = None if self.batcher is None else self.batcher.to_json() | {
            "sent_batches": len(self.sent), "next_batch_tasks": len(self.next)}
        return view
