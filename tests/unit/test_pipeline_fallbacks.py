"""The pipeline's fallbacks on a GPU worker, without a process: an OOM in a batch of several
still shrinks the batch, one in a batch of one reruns an auto task on the CPU (gpu_oom), and a
lost GPU gives every run back unspent, auto ones to the CPU (device_lost)."""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any

import orjson

from gpulane.model import DeviceWish, Task, TaskState
from gpulane.presets import BatchSettings, Preset
from gpulane.protocol import WorkerMessage, parse_line
from gpulane.runtime.launchers import DeviceAssignment, LaunchSpec
from gpulane.runtime.pipeline import Pipeline
from gpulane.runtime.worker import Worker
from gpulane.runtime.worker_process import WorkerProcess, WorkerState
from gpulane.store import Finish, NewEvent


class GpuProc(WorkerProcess):
    """A session worker on gpu:0 that is never spawned: it records the ops it is sent."""

    def __init__(self) -> None:
        super().__init__("w-gpu", "p", DeviceAssignment("gpu", 0, "GPU-0", True),
                         LaunchSpec(["true"], {}, None), session=True, stderr_tail_lines=5,
                         on_messages=print, on_exit=print)
        self.state = WorkerState.READY
        self._ready.set()
        self.ops: list[Any] = []

    def send(self, data: bytes) -> bool:
        self.ops.append(orjson.loads(data))
        return True


class Store:
    def __init__(self) -> None:
        self.finished: list[Finish] = []
        self.requeued: list[dict[str, Any]] = []

    async def finish_many(self, ends: list[Finish]) -> list[object]:
        self.finished.extend(ends)
        return [None for _ in ends]

    async def requeue(self, task_id: str, token: int, error: object, *,
                      events: list[NewEvent], spent: bool = True, lane: str | None = None,
                      fallback_reason: str | None = None) -> None:
        self.requeued.append({"id": task_id, "spent": spent, "lane": lane,
                              "reason": fallback_reason, "events": events})


class Listener:
    def __init__(self) -> None:
        self.fallbacks: list[tuple[str, str, int]] = []

    def worker_exited(self, worker_id: str) -> None: ...
    def cpu_slot_freed(self, worker_id: str) -> None: ...
    def capacity_changed(self) -> None: ...

    def fell_back(self, reason: str, preset: str, n: int) -> None:
        self.fallbacks.append((reason, preset, n))


def make(**fields: Any) -> tuple[Pipeline, Worker, Store, Listener,
                                 list[Coroutine[object, object, None]]]:
    preset = Preset(name="p", argv=("python", "w.py"),
                    batch=BatchSettings(max_size=2, adaptive=False), **fields)
    worker = Worker(GpuProc(), preset)
    store, listener = Store(), Listener()
    spawned: list[Coroutine[object, object, None]] = []
    pipeline = Pipeline(store, {worker.id: worker}, listener,  # type: ignore[arg-type]
                        spawn=spawned.append, stop=lambda w: None)
    return pipeline, worker, store, listener, spawned


def tasks(*ids: str, wish: DeviceWish = DeviceWish.AUTO) -> list[Task]:
    return [Task(id=i, preset="p", state=TaskState.RUNNING, input={}, priority=50,
                 device_wish=wish, created_at=0.0, attempts=1, lane="gpu", token=1)
            for i in ids]


def oom(task_id: str) -> WorkerMessage:
    return parse_line(orjson.dumps({"event": "finish", "task": task_id, "status": "failed",
                                    "error": {"kind": "oom", "message": "CUDA OOM"}}))


async def test_an_oom_shrinks_a_batch_of_two_then_falls_back_at_one() -> None:
    pipeline, worker, store, listener, _ = make()
    pipeline.dispatch(worker, tasks("a", "b"))
    await pipeline.on_messages(worker.proc, [oom("a"), oom("b")])
    assert [(r["id"], r["lane"], r["spent"]) for r in store.requeued] == [
        ("a", None, False), ("b", None, False)]  # halved: both run again on the GPU
    assert worker.batch_size == 1 and listener.fallbacks == []
    store.requeued.clear()
    pipeline.dispatch(worker, tasks("a"))
    await pipeline.on_messages(worker.proc, [oom("a")])
    [again] = store.requeued
    assert (again["id"], again["lane"], again["reason"], again["spent"]) == (
        "a", "cpu", "gpu_oom", False)
    error, fallback = again["events"]
    assert (error.type, error.data["kind"], error.data["retrying"]) == ("error", "oom", True)
    assert (fallback.type, fallback.data) == ("fallback", {
        "reason": "gpu_oom", "from": "gpu:0", "batch_size": 1, "to": "cpu"})
    assert listener.fallbacks == [("gpu_oom", "p", 1)] and store.finished == []
    worker.close()


async def test_an_oom_at_one_fails_a_strict_task_or_a_policy_without_oom() -> None:
    for wish, fields in ((DeviceWish.GPU, {}), (DeviceWish.AUTO, {"fallback": ["error"]})):
        pipeline, worker, store, listener, _ = make(**fields)
        worker.batcher.oom(2)  # type: ignore[union-attr]  # its batches are one task now
        pipeline.dispatch(worker, tasks("a", wish=wish))
        await pipeline.on_messages(worker.proc, [oom("a")])
        assert store.requeued == [] and listener.fallbacks == []
        [end] = store.finished
        assert end.state is TaskState.FAILED and end.error is not None
        assert end.error["kind"] == "oom"
        worker.close()


async def test_a_lost_gpu_gives_every_run_back_unspent() -> None:
    pipeline, worker, store, listener, spawned = make()
    pipeline.dispatch(worker, [*tasks("auto"), *tasks("strict", wish=DeviceWish.GPU)])
    worker.preempted = True  # as Supervisor.device_lost marks it
    pipeline.device_lost(worker)
    assert not worker.runs and not worker.sent
    for step in spawned:
        await step
    assert [(r["id"], r["lane"], r["reason"], r["spent"]) for r in store.requeued] == [
        ("auto", "cpu", "device_lost", False), ("strict", None, None, False)]
    assert store.requeued[0]["events"][1].data == {
        "reason": "device_lost", "from": "gpu:0", "to": "cpu"}
    assert store.requeued[1]["events"][0].data["kind"] == "device_lost"
    assert listener.fallbacks == [("device_lost", "p", 1)]
    assert pipeline.measures.lanes == {}  # a cut-short batch measures nothing
    worker.close()
