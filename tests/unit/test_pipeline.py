"""The batch pipeline on one worker, without a process: a run ends and is forgotten in one
step, a store that fails cannot keep a worker busy, and batch latency runs on a fake clock."""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any

import orjson
import pytest

from gpulane.model import DeviceWish, Task, TaskState
from gpulane.presets import BatchSettings, DeviceKind, Preset
from gpulane.protocol import WorkerMessage, parse_line
from gpulane.runtime.launchers import DeviceAssignment, LaunchSpec
from gpulane.runtime.pipeline import Pipeline
from gpulane.runtime.worker import Worker
from gpulane.runtime.worker_process import WorkerProcess, WorkerState
from gpulane.store import Finish
from tests.unit.conftest import Clock


class FakeProc(WorkerProcess):
    """A worker process that is never spawned: it records the ops it is sent."""

    def __init__(self, *, pipelines: bool = False) -> None:
        super().__init__("w-1", "batched", DeviceAssignment("cpu"), LaunchSpec(["true"], {}, None),
                         session=True, stderr_tail_lines=5, on_messages=print, on_exit=print)
        self.state = WorkerState.READY
        self._ready.set()  # as if it had said ready
        self.pipelines = pipelines
        self.ops: list[Any] = []

    def send(self, data: bytes) -> bool:
        self.ops.append(orjson.loads(data))
        return True

    def kill(self) -> None:
        raise AssertionError("the worker was killed")


class FakeStore:
    def __init__(self, *, fail: bool = False) -> None:
        self.fail = fail
        self.finished: list[Finish] = []
        self.requeued: list[str] = []
        self.appended: list[tuple[str, object]] = []

    async def finish_many(self, ends: list[Finish]) -> list[object]:
        if self.fail:
            raise RuntimeError("disk full")
        self.finished.extend(ends)
        return [None for _ in ends]

    async def append_events(self, task_id: str, events: list[object]) -> None:
        self.appended.extend((task_id, e) for e in events)

    async def requeue(self, task_id: str, token: int, error: object, *,
                      events: list[object], spent: bool = True) -> None:
        self.requeued.append(task_id)


class Listener:
    def __init__(self) -> None:
        self.heard: list[str] = []

    def worker_exited(self, worker_id: str) -> None:
        self.heard.append(f"exited {worker_id}")

    def cpu_slot_freed(self, worker_id: str) -> None:
        self.heard.append(f"cpu {worker_id}")

    def capacity_changed(self) -> None:
        self.heard.append("capacity")


def make(store: FakeStore, *, pipelines: bool = False
         ) -> tuple[Pipeline, Worker, Listener, Clock]:
    preset = Preset(name="batched", argv=("python", "w.py"), devices=(DeviceKind.CPU,),
                    batch=BatchSettings(max_size=2, adaptive=False))
    worker = Worker(FakeProc(pipelines=pipelines), preset)
    listener, clock = Listener(), Clock(100.0)
    spawned: list[Coroutine[object, object, None]] = []
    pipeline = Pipeline(store, {worker.id: worker}, listener,  # type: ignore[arg-type]
                        spawn=spawned.append, stop=lambda w: None, clock=clock)
    return pipeline, worker, listener, clock


def tasks(*ids: str) -> list[Task]:
    return [Task(id=i, preset="batched", state=TaskState.RUNNING, input={}, priority=50,
                 device_wish=DeviceWish.AUTO, created_at=0.0, attempts=1, lane="cpu")
            for i in ids]


def finish(task_id: str) -> WorkerMessage:
    return parse_line(f'{{"event":"finish","task":"{task_id}","status":"completed"}}'.encode())


async def test_a_finished_run_is_done_and_gone_and_frees_the_worker() -> None:
    store = FakeStore()
    pipeline, worker, listener, _ = make(store)
    worker.holds_cpu = True
    pipeline.dispatch(worker, tasks("a", "b"))
    assert worker.state is WorkerState.BUSY and worker.proc.ops[0]["op"] == "run"  # type: ignore[attr-defined]
    runs = list(worker.runs.values())
    await pipeline.on_messages(worker.proc, [finish("a")])
    assert runs[0].done and "a" not in worker.runs and not runs[1].done
    assert listener.heard == []  # the worker still owes b
    await pipeline.on_messages(worker.proc, [finish("b")])
    assert all(r.done for r in runs) and not worker.runs and not worker.sent
    assert worker.state is WorkerState.READY and worker.watchdog is None
    assert listener.heard == ["cpu w-1", "capacity"]
    assert [f.task_id for f in store.finished] == ["a", "b"]
    worker.close()


async def test_a_store_that_fails_storing_finishes_still_frees_the_worker() -> None:
    pipeline, worker, listener, _ = make(FakeStore(fail=True))
    worker.holds_cpu = True
    pipeline.dispatch(worker, tasks("a", "b"))
    runs = list(worker.runs.values())
    await pipeline.on_messages(worker.proc, [finish("a"), finish("b")])  # logged, not raised
    assert all(r.done for r in runs) and not worker.runs
    assert worker.state is WorkerState.READY and not worker.holds_cpu
    assert listener.heard == ["cpu w-1", "capacity"]
    worker.close()


async def test_a_queued_batch_counts_its_latency_from_when_the_worker_could_start_it() -> None:
    pipeline, worker, _, clock = make(FakeStore(), pipelines=True)
    pipeline.dispatch(worker, tasks("a1", "a2"))  # sent at t=100
    clock.now = 100.3
    pipeline.dispatch(worker, tasks("b1", "b2"))  # full: sent ahead, queued behind a
    assert len(worker.sent) == 2 and len(worker.proc.ops) == 2  # type: ignore[attr-defined]
    clock.now = 101.0
    await pipeline.on_messages(worker.proc, [finish("a1"), finish("a2")])
    assert worker.batcher is not None
    assert worker.batcher.stats.last_latency_ms == pytest.approx(1000)
    clock.now = 101.4
    await pipeline.on_messages(worker.proc, [finish("b1"), finish("b2")])
    # From a's end, when the worker could start b: 400 ms, not the 1100 ms since b was sent.
    assert worker.batcher.stats.last_latency_ms == pytest.approx(400)
    assert worker.batcher.stats.busy_s == pytest.approx(1.4)
    worker.close()


async def test_close_cancels_every_timer_and_lets_go_of_every_run() -> None:
    pipeline, worker, _, _ = make(FakeStore())
    pipeline.dispatch(worker, tasks("a", "b"))
    pipeline.dispatch(worker, tasks("c"))  # the next batch, held on the node
    await pipeline.on_messages(worker.proc, [finish("a"), finish("b")])  # c goes out
    runs = list(worker.runs.values())
    assert worker.watchdog is not None and worker.next_timer is not None
    worker.close()
    assert all(r.done for r in runs) and not worker.runs and not worker.sent
    assert worker.watchdog is None and worker.next_timer is None and worker.forming is None


async def test_a_line_naming_no_task_after_a_finish_is_not_the_next_batchs() -> None:
    """The lines of one read were written before the worker saw the batch that a finish among
    them sent out: a stray stdout line after the finish belongs to no run, not to the next
    batch's only task (which would store it as that task's log event)."""
    store = FakeStore()
    pipeline, worker, _, _ = make(store)
    pipeline.dispatch(worker, tasks("a"))
    pipeline.dispatch(worker, tasks("c"))  # forms on the node while a runs
    assert list(worker.next) == ["c"]
    stray = parse_line(b"a print() that went to stdout")
    await pipeline.on_messages(worker.proc, [finish("a"), stray])
    assert list(worker.runs) == ["c"] and worker.proc.ops[-1]["tasks"][0]["task"] == "c"  # type: ignore[attr-defined]
    assert store.appended == []
    await pipeline.on_messages(worker.proc, [stray])  # a later read: c is the one it runs
    assert [task for task, _ in store.appended] == ["c"]
    worker.close()
