"""The supervisor's registry at a worker's edges, without a process: a worker that exits is
dropped as a unit (its capacity back) even when storing what it held fails, and a worker that
stops or dies takes no new work and sends back to the queue what it was never sent."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from gpulane.presets import BatchSettings, DeviceKind, Preset
from gpulane.runtime.batcher import Batcher
from gpulane.runtime.supervisor import Supervisor
from gpulane.runtime.worker import Worker
from gpulane.runtime.worker_process import WorkerState
from tests.unit.test_pipeline import FakeProc, FakeStore, Listener, finish, tasks


class FailingStore(FakeStore):
    """A store whose every write fails (a full disk, a lost connection)."""

    async def requeue(self, task_id: str, token: int, error: object, *,
                      events: list[object], spent: bool = True) -> None:
        raise RuntimeError("disk full")


class RecordingStore(FakeStore):
    """Remembers each requeue's error: None when the attempt is not held against the task."""

    def __init__(self) -> None:
        super().__init__()
        self.errors: dict[str, object] = {}

    async def requeue(self, task_id: str, token: int, error: object, *,
                      events: list[object], spent: bool = True) -> None:
        await super().requeue(task_id, token, error, events=events, spent=spent)
        self.errors[task_id] = error


class Stoppable(FakeProc):
    """A worker process that counts the stops it is asked for."""

    def __init__(self) -> None:
        super().__init__()
        self.stops = 0

    async def stop(self, grace_s: float) -> None:
        self.stops += 1


def registry(store: FakeStore, scratch: Path) -> tuple[Supervisor, Worker, Listener]:
    listener = Listener()
    sup = Supervisor(store, "node-1", scratch_dir=str(scratch),  # type: ignore[arg-type]
                     stderr_tail_lines=5, shutdown_grace_s=1.0, listener=listener)
    preset = Preset(name="batched", argv=("python", "w.py"), devices=(DeviceKind.CPU,),
                    batch=BatchSettings(max_size=2, adaptive=False))
    worker = sup.workers["w-1"] = Worker(FakeProc(), preset)
    return sup, worker, listener


async def test_a_worker_whose_exit_cannot_be_stored_is_still_dropped_and_frees_its_room(
        tmp_path: Path) -> None:
    sup, worker, listener = registry(FailingStore(), tmp_path)
    worker.holds_cpu = True
    sup.dispatch(worker.id, tasks("a", "b"))
    sup.dispatch(worker.id, tasks("c"))  # the next batch, held on the node
    runs = list(worker.runs.values())
    worker.proc.state, worker.proc.returncode = WorkerState.EXITED, 1
    try:
        await sup._on_exit(worker.proc)  # the retries' requeue fails (WorkerProcess logs it)
    except RuntimeError:
        pass
    assert worker.id not in sup.workers and all(r.done for r in runs)
    assert worker.watchdog is None and worker.next_timer is None and worker.forming is None
    assert listener.heard.count("cpu w-1") == 1  # the CPU slot, once
    assert "exited w-1" in listener.heard and listener.heard[-1] == "capacity"


async def test_tasks_claimed_for_a_worker_on_its_way_out_go_back_to_the_queue(
        tmp_path: Path) -> None:
    # Stopping (unloaded or drained while the claim ran) or exited and not yet dropped: the
    # worker will never run them, so they must not wait for its exit (or be lost with it).
    for state in (WorkerState.STOPPING, WorkerState.EXITED):
        store = FakeStore()
        sup, worker, listener = registry(store, tmp_path)
        worker.proc.state = state
        sup.hold_cpu(worker.id)  # as the scheduler does on the CPU lane, then dispatch
        sup.dispatch(worker.id, tasks("a", "b"))
        await asyncio.sleep(0)  # the requeue runs in the background
        assert not worker.runs and worker.forming is None and not worker.holds_cpu
        assert store.requeued == ["a", "b"]
        assert listener.heard == ["cpu w-1", "capacity"]  # the slot came back at once


async def test_a_crash_in_a_batch_gives_its_attempts_back_and_halves_the_presets_batches(
        tmp_path: Path) -> None:
    store = RecordingStore()
    sup, worker, listener = registry(store, tmp_path)
    sup.dispatch(worker.id, tasks("a", "b"))
    sup.dispatch(worker.id, tasks("c"))  # the next batch, held on the node: never sent
    worker.proc.state, worker.proc.returncode = WorkerState.EXITED, 139
    await sup._on_exit(worker.proc)
    assert sorted(store.requeued) == ["a", "b", "c"]
    # Which of a and b killed it is unknown: neither spends an attempt, and the preset's
    # batches are cut to one until they are resolved; c was never sent.
    assert store.errors == {"a": None, "b": None, "c": None}
    ceiling = sup.pipeline.crash_ceiling("batched")
    assert ceiling.cap == 1 and ceiling.suspects == {"a", "b"}
    assert worker.id not in sup.workers and listener.heard[-1] == "capacity"
    # The worker that replaces it batches at most one, though its preset says 2.
    sup.workers["w-2"] = second = Worker(FakeProc(), worker.preset, ceiling)
    assert second.batch_size == 1


async def test_a_crash_on_a_lone_task_spends_its_attempt_and_keeps_it_alone(
        tmp_path: Path) -> None:
    store = RecordingStore()
    sup, worker, _ = registry(store, tmp_path)
    sup.dispatch(worker.id, tasks("p"))
    worker.proc.state, worker.proc.returncode = WorkerState.EXITED, 139
    worker.proc.stderr_tail.append("Segmentation fault in libmodel.so")
    await sup._on_exit(worker.proc)
    error = store.errors["p"]
    assert isinstance(error, dict) and error["kind"] == "worker_died"
    assert "Segmentation fault in libmodel.so" in str(error["message"])
    assert sup.pipeline.crash_ceiling("batched").cap == 1  # its retry runs alone


async def test_a_worker_told_to_stop_is_out_of_the_pool_at_once(tmp_path: Path) -> None:
    # The scheduler unloads an idle worker to make room, then, in the same pass, looks for an
    # idle worker for the next queue: the one it is unloading must not be handed a batch.
    sup, worker, _ = registry(FakeStore(), tmp_path)
    assert sup.idle_worker("batched", "cpu") is worker
    sup.stop(worker.id)  # its stop runs in the background
    assert sup.idle_worker("batched", "cpu") is None and not sup.idle_gpu_workers(None)
    assert not worker.alive


async def test_a_stopping_worker_is_not_offered_for_a_top_up(tmp_path: Path) -> None:
    # Drained while its batch forms: what the scheduler would claim for it goes straight
    # back to the queue, so offering it again would claim and requeue the same tasks for good.
    sup, worker, _ = registry(FakeStore(), tmp_path)
    worker.batcher = Batcher(BatchSettings(max_size=4, max_wait_ms=400, adaptive=False))
    sup.dispatch(worker.id, tasks("a"))
    assert worker.forming is not None and sup.forming_worker("batched", "cpu") == (worker, 3)
    worker.proc.state = WorkerState.STOPPING
    assert sup.forming_worker("batched", "cpu") is None
    worker.close()


async def test_a_worker_drained_while_its_batch_forms_requeues_it_and_stops_at_once(
        tmp_path: Path) -> None:
    # The batch was never sent: it goes back to the queue now, and the worker stops now,
    # instead of both waiting out the lease's grace period for a kill.
    store = FakeStore()
    sup, worker, listener = registry(store, tmp_path)
    worker.proc = proc = Stoppable()
    worker.batcher = Batcher(BatchSettings(max_size=4, max_wait_ms=400, adaptive=False))
    worker.holds_cpu = True
    sup.dispatch(worker.id, tasks("a", "b"))
    assert worker.forming is not None
    sup.preempt(worker.id, grace_s=3600)
    await asyncio.sleep(0)
    assert store.requeued == ["a", "b"] and not worker.runs and worker.forming is None
    assert proc.stops == 1 and "cpu w-1" in listener.heard and proc.ops == []


async def test_held_runs_name_every_attempt_a_worker_holds_sent_or_next(
        tmp_path: Path) -> None:
    # What the node heartbeats: a run the reaper must not take back while a worker holds it.
    sup, worker, _ = registry(FakeStore(), tmp_path)
    sup.dispatch(worker.id, tasks("a", "b"))  # sent
    sup.dispatch(worker.id, tasks("c"))  # the next batch, on the node
    assert sorted(sup.held_runs()) == [("a", 0), ("b", 0), ("c", 0)]
    worker.runs["b"].cancelled = True  # final already: nothing to keep alive
    assert sorted(sup.held_runs()) == [("a", 0), ("c", 0)]
    worker.close()
    assert sup.held_runs() == []


class Killable(Stoppable):
    """A worker process that counts the kills it is asked for."""

    def __init__(self) -> None:
        super().__init__()
        self.kills = 0

    def kill(self) -> None:
        self.kills += 1


async def test_a_worker_preempted_while_it_boots_is_killed_at_once_and_its_tasks_requeued(
        tmp_path: Path) -> None:
    store = RecordingStore()
    sup, worker, listener = registry(store, tmp_path)
    worker.proc = proc = Killable()
    proc.state = WorkerState.STARTING
    proc._ready.clear()  # it has not said ready yet
    sup.dispatch(worker.id, tasks("a", "b"))  # held for when it is ready
    sup.preempt(worker.id, grace_s=3600)
    await asyncio.sleep(0)  # the requeue runs in the background
    assert proc.kills == 1 and proc.ops == []  # killed, not left to load and drain
    assert store.requeued == ["a", "b"] and store.errors == {"a": None, "b": None}
    assert not worker.runs and worker.grace_timer is None
    # Its exit is no start failure: the preset's circuit does not count it.
    proc.returncode = -9
    await sup._on_exit(proc)
    assert sup.circuit("batched", "gpu").failures == 0 and "exited w-1" in listener.heard


async def test_a_preempted_workers_grace_kill_goes_with_it(tmp_path: Path) -> None:
    sup, worker, _ = registry(FakeStore(), tmp_path)
    sup.dispatch(worker.id, tasks("a"))  # running: it drains
    sup.preempt(worker.id, grace_s=3600)
    timer = worker.grace_timer
    assert timer is not None and not timer.cancelled()
    worker.close()
    assert timer.cancelled() and worker.grace_timer is None


async def test_a_next_batch_formed_before_the_cap_fell_is_cut_to_it(tmp_path: Path) -> None:
    # Claimed for a batch of 2, then a crash elsewhere cut the preset's batches to 1: the
    # batch goes out at the new size, and what is over goes back to the queue unspent.
    store = RecordingStore()
    sup, worker, _ = registry(store, tmp_path)
    ceiling = sup.pipeline.crash_ceiling("batched")
    worker.batcher = Batcher(BatchSettings(max_size=2, adaptive=False), ceiling)
    sup.dispatch(worker.id, tasks("a", "b"))  # sent
    sup.dispatch(worker.id, tasks("c", "d"))  # the next batch, formed at size 2
    ceiling.crashed(["x", "y"], 2)
    await sup.pipeline.on_messages(worker.proc, [finish("a"), finish("b")])
    await asyncio.sleep(0)  # the requeue runs in the background
    assert [t["task"] for t in worker.proc.ops[-1]["tasks"]] == ["c"]  # type: ignore[attr-defined]
    assert store.requeued == ["d"] and store.errors == {"d": None}
    assert list(worker.runs) == ["c"]
    worker.close()


async def test_a_failing_background_step_is_logged_at_once(
        caplog: pytest.LogCaptureFixture) -> None:
    sup = Supervisor(FakeStore(), "n", scratch_dir="/nonexistent",  # type: ignore[arg-type]
                     stderr_tail_lines=5,
                     shutdown_grace_s=0.1, listener=Listener())

    async def broken() -> None:
        raise RuntimeError("a bug in a background step")

    with caplog.at_level("ERROR", logger="gpulane.supervisor"):
        sup._spawn_bg(broken())
        deadline = asyncio.get_running_loop().time() + 5
        while sup._background:
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0)
    assert "a bug in a background step" in caplog.text


async def test_an_attempt_held_in_vain_is_called_off_and_its_outcome_never_stored(
        tmp_path: Path) -> None:
    """The heartbeat found "a" is no longer this attempt's (reaped after a stall): its worker
    is told to stop it, it is no longer heartbeat, and its late finish stores nothing; "b",
    named with another token, is some other attempt's business and runs on."""
    store = FakeStore()
    sup, worker, _ = registry(store, tmp_path)
    sup.dispatch(worker.id, tasks("a", "b"))
    assert worker.proc.ops[-1]["op"] == "run"
    sup.abandon_lost([("a", 0), ("b", 7)])
    assert worker.proc.ops[-1] == {"op": "cancel", "task": "a"}
    assert sup.held_runs() == [("b", 0)]
    await sup.pipeline.on_messages(worker.proc, [finish("a"), finish("b")])
    assert [f.task_id for f in store.finished] == ["b"]
    assert not worker.runs
