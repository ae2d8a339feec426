"""The node's workers: a registry of ``Worker`` objects, and their life from start to exit.

The scheduler decides *what* runs *where*; the supervisor makes it happen: it starts workers
(and boots them, counting start failures against the preset's circuit), looks them up, cancels
and preempts their tasks, unloads idle ones and stops them all at shutdown. What happens to
the tasks in between (batches sent, lines read, outcomes stored) is the pipeline's job
(runtime/pipeline.py). The scheduler reads workers through the queries below, which answer
read-only ``WorkerView``s; runtime reports freed capacity to the ``RuntimeListener`` it is
handed (runtime/view.py) and never touches the ledger itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import time
from collections.abc import Coroutine, Iterator

from gpulane.errors import StaleTokenError
from gpulane.model import ErrorKind, Task, TaskState, task_error
from gpulane.presets import Preset, Runtime
from gpulane.protocol import ENV_INPUT, ENV_INPUT_FILE, ENV_TASK_ID, cancel_op
from gpulane.runtime.circuit import PresetCircuit
from gpulane.runtime.containers import kill_leftovers
from gpulane.runtime.lanes import LaneState, forming_room, lane_states, next_room
from gpulane.runtime.launchers import (
    LABEL_DATA_DIR,
    LABEL_NODE,
    DeviceAssignment,
    DockerLauncher,
    launcher_for,
)
from gpulane.runtime.measures import LaneMeasures
from gpulane.runtime.pipeline import Pipeline
from gpulane.runtime.taskrun import TaskRun
from gpulane.runtime.view import RuntimeListener, WorkerView
from gpulane.runtime.worker import Worker
from gpulane.runtime.worker_process import WorkerProcess, WorkerStartError, WorkerState
from gpulane.store import Store

log = logging.getLogger("gpulane.supervisor")

INLINE_INPUT_MAX_BYTES = 64 * 1024
"""Larger one-off inputs go through a file (GPULANE_INPUT_FILE) instead of the environment."""
REAPER_INTERVAL_S = 1.0
"""How often idle workers are checked for unloading."""
CANCELLED_MESSAGE = "cancelled by request"
"""The error message of every cancelled task."""


class Supervisor:
    """The node's workers and the task attempts running on them."""

    def __init__(self, store: Store, node: str, *, scratch_dir: str, stderr_tail_lines: int,
                 shutdown_grace_s: float, listener: RuntimeListener) -> None:
        self.store = store
        self.node = node
        self.scratch_dir = scratch_dir
        self.stderr_tail_lines = stderr_tail_lines
        self.shutdown_grace_s = shutdown_grace_s
        self.listener = listener
        self.workers: dict[str, Worker] = {}  # worker id -> everything about it
        # (preset, lane) -> the start-failure circuit of its workers there
        self.circuits: dict[tuple[str, str], PresetCircuit] = {}
        self.measures = LaneMeasures()  # load times and drain rates (runtime/measures.py)
        self.pipeline = Pipeline(store, self.workers, listener, spawn=self._spawn_bg,
                                 stop=self._stop_worker)
        self.pipeline.measures = self.measures
        self._ids = itertools.count(1)
        self._background: set[asyncio.Task[None]] = set()
        self._reaper: asyncio.Task[None] | None = None
        self._leftovers: asyncio.Task[list[str]] | None = None  # see runtime/containers.py
        # What this node's containers carry (the scratch dir lives in the node's data dir).
        self.labels = {LABEL_NODE: node,
                       LABEL_DATA_DIR: os.path.dirname(os.path.abspath(scratch_dir))}
        self._closing = False
        self.worker_env: dict[str, str] = {}
        """Variables every worker of this node gets (the folders task files lie in)."""

    # -- queries the scheduler asks ------------------------------------------------------------

    def worker(self, worker_id: str) -> WorkerView | None:
        return self.workers.get(worker_id)

    def _live_sessions(self, preset: str, lane: str) -> Iterator[Worker]:
        return (w for w in self.workers.values()
                if w.session and w.preset_name == preset and w.device.kind == lane
                and w.alive)

    def session_workers(self, preset: str, lane: str) -> list[WorkerView]:
        return list(self._live_sessions(preset, lane))

    def warm_count(self, preset: str, lane: str) -> int:
        """Live session workers of the preset on ``lane`` that are ready or busy: those that
        drain its queue now (a booting one has its model still to load)."""
        return sum(1 for w in self._live_sessions(preset, lane) if w.proc.started)

    def live_workers(self) -> list[WorkerView]:
        """Every live worker, of any preset, lane and mode."""
        return [w for w in self.workers.values() if w.alive]

    def idle_worker(self, preset: str, lane: str) -> WorkerView | None:
        """A live session worker of the preset with nothing in flight (ready or booting)."""
        return next((w for w in self._live_sessions(preset, lane) if not w.runs), None)

    def forming_worker(self, preset: str, lane: str) -> tuple[WorkerView, int] | None:
        """A worker whose batch waits to fill (max_wait_ms), and how many more it takes."""
        for w in self.workers.values():
            if w.alive and w.preset_name == preset and w.device.kind == lane:
                room = forming_room(w)
                if room > 0:
                    return w, room
        return None

    def next_batch_worker(self, preset: str, lane: str) -> tuple[WorkerView, int] | None:
        """A busy worker whose next batch has room, and how much (see Pipeline.dispatch).
        The scheduler asks last: an idle or new worker starts the tasks sooner."""
        for w in self.workers.values():
            if w.session and w.preset_name == preset and w.device.kind == lane:
                room = next_room(w)
                if room > 0:
                    return w, room
        return None

    def lane_states(self) -> dict[tuple[str, str], LaneState]:
        """What each (preset, lane)'s session workers offer, from one scan (runtime/lanes.py):
        a pass asks it once instead of the three queries above per queue."""
        return lane_states(self.workers.values())

    def idle_gpu_workers(self, device: int | None) -> list[WorkerView]:
        """Idle GPU session workers on ``device`` (any device when None), least recently used
        first: what may be unloaded to make room."""
        return sorted((w for w in self.workers.values()
                       if w.idle and w.device.kind == "gpu"
                       and (device is None or w.device.index == device)),
                      key=lambda w: w.last_used)

    def held_runs(self) -> list[tuple[str, int]]:
        """(task id, token) of every attempt a live worker still holds: the batches sent to
        it and its next batch (cancelled ones are final already). What the node heartbeats,
        so that only the attempts nobody holds any more are reaped after the claim TTL."""
        return [(r.id, r.token) for w in self.workers.values() for r in w.runs.values()
                if not r.cancelled]

    def circuit(self, preset: str, lane: str) -> PresetCircuit:
        """The start-failure circuit of the preset's workers on ``lane`` ("gpu" or "cpu",
        see runtime/circuit.py): a GPU that cannot start them (a broken driver, CUDA out of
        memory at load) must not stop the CPU's, which the GPU's tasks then fall back to."""
        circ = self.circuits.get((preset, lane))
        if circ is None:
            circ = self.circuits[(preset, lane)] = PresetCircuit()
        return circ

    def may_start(self, preset: str, lane: str) -> bool:
        """Whether a new worker of the preset may start on ``lane`` (its circuit is not open)."""
        circ = self.circuits.get((preset, lane))
        return circ is None or circ.allows_start()

    def _start_failed(self, worker: Worker, message: str) -> None:
        """Count a worker that never started against its preset's circuit (once per worker:
        its exit and its start timeout may both report it)."""
        if worker.start_failure_counted:
            return
        worker.start_failure_counted = True
        preset, lane = worker.preset_name, worker.device.kind
        circ = self.circuit(preset, lane)
        if circ.failed(message):
            log.error("preset %s: %d workers in a row failed to start on the %s; no new one "
                      "starts there for %.0f s. Last error: %s", preset, circ.failures,
                      lane.upper(), circ.open_until - time.monotonic(), message)

    # -- starting work ---------------------------------------------------------------------------

    def next_worker_id(self, preset: Preset, device: DeviceAssignment) -> str:
        return f"{preset.name}-{device.name.replace(':', '')}-{next(self._ids)}"

    def start_worker(self, preset: Preset, device: DeviceAssignment, wid: str) -> WorkerView:
        """Create a session worker and boot it in the background. The caller has already
        taken the device's capacity in the ledger under ``wid``."""
        return self._create(wid, preset, device, session=True, extra_env=None)

    def dispatch(self, worker_id: str, tasks: list[Task]) -> None:
        """Give claimed tasks to a session worker (see Pipeline.dispatch)."""
        worker = self.workers.get(worker_id)
        if worker is None or not worker.alive:
            # It exited, or began to stop, while its tasks were being claimed: it will never
            # run them, so they must not wait for its exit (nor be dropped with it).
            self._spawn_bg(self.pipeline.return_claimed(tasks))
            return
        self.pipeline.dispatch(worker, tasks)

    def hold_cpu(self, worker_id: str) -> None:
        """The worker holds a CPU slot for its current work: it goes back when the work ends."""
        worker = self.workers.get(worker_id)
        if worker is None or not worker.alive:  # it takes no new work: the slot goes back
            self.listener.cpu_slot_freed(worker_id)
        else:
            worker.holds_cpu = True

    def run_oneoff(self, preset: Preset, device: DeviceAssignment, task: Task,
                   worker_id: str) -> None:
        """Start a one-off worker for one claimed task; it gets its input in the environment."""
        import orjson

        payload = orjson.dumps(task.input)
        extra = {ENV_TASK_ID: task.id}
        path = None
        if len(payload) <= INLINE_INPUT_MAX_BYTES:
            extra[ENV_INPUT] = payload.decode()
        else:
            os.makedirs(self.scratch_dir, exist_ok=True)
            path = os.path.join(self.scratch_dir, f"{task.id}.input.json")
            with open(path, "wb") as fh:
                fh.write(payload)
            extra[ENV_INPUT_FILE] = path
        worker = self._create(worker_id, preset, device, session=False, extra_env=extra)
        worker.input_file = path
        worker.hold({task.id: TaskRun(task, preset, worker_id, task.token,
                                      task.timeout_s or preset.timeout_s)})
        worker.proc.state = WorkerState.BUSY
        self.pipeline.arm_watchdog(worker)

    def _create(self, wid: str, preset: Preset, device: DeviceAssignment, *, session: bool,
                extra_env: dict[str, str] | None) -> Worker:
        spec = launcher_for(preset).build(preset, device, wid,
                                          {**self.worker_env, **(extra_env or {})},
                                          labels=self.labels)
        proc = WorkerProcess(wid, preset.name, device, spec, session=session,
                             stderr_tail_lines=self.stderr_tail_lines,
                             on_messages=self.pipeline.on_messages, on_exit=self._on_exit)
        worker = self.workers[wid] = Worker(proc, preset,
                                            self.pipeline.crash_ceiling(preset.name))
        self.circuit(preset.name, device.kind).starting()
        self._spawn_bg(self._boot(worker))
        return worker

    async def _boot(self, worker: Worker) -> None:
        proc, preset = worker.proc, worker.preset
        if preset.runtime is Runtime.DOCKER and self._leftovers is not None:
            # A dead predecessor's containers go first: they hold GPU memory, and the
            # cleanup must not take this node's own for theirs.
            with contextlib.suppress(Exception):
                await asyncio.shield(self._leftovers)
        if self._closing:  # the node stops: a worker not spawned yet is never spawned
            proc.state = WorkerState.EXITED
            await self._on_exit(proc)
            return
        spawned_at = time.monotonic()
        try:
            await proc.spawn()
        except OSError as exc:
            proc.state = WorkerState.EXITED
            proc.stderr_tail.append(f"cannot start {proc.spec.argv[0]!r}: {exc}")
            self._start_failed(worker, proc.stderr_tail[-1])
            await self._on_exit(proc)
            return
        if worker.preempted:  # drained while it was being spawned
            proc.kill()
        try:
            if proc.session:
                await proc.wait_ready(preset.start_timeout_s)
            else:
                await proc.wait_connected(preset.start_timeout_s)
        except WorkerStartError as exc:
            if worker.preempted or self._closing:
                return  # killed for a lease, or stopped with its node: not a start failure
            log.warning("worker %s failed to start: %s", worker.id, exc)
            self._start_failed(worker, str(exc))
            # Out of the pool first, so that a retry is not handed straight back to it.
            proc.state = WorkerState.STOPPING
            proc.kill()
            for run in list(worker.runs.values()):
                await self.pipeline.attempt_failed(run, exc.kind, str(exc))
            return
        self.circuit(preset.name, worker.device.kind).started()
        if proc.session:
            self.measures.loaded(preset.name, worker.device.kind, time.monotonic() - spawned_at)
        if worker.preempted:
            proc.kill()  # it said ready as it was drained: it ran nothing yet
            return
        if proc.session:
            proc.state = WorkerState.READY
            log.info("worker %s ready on %s (pid %s)", worker.id, worker.device.name, proc.pid)
            if worker.runs:
                self.pipeline.send_batch(worker, list(worker.runs.values()))
            else:
                self.listener.capacity_changed()

    # -- the end of a worker -----------------------------------------------------------------

    async def _on_exit(self, proc: WorkerProcess) -> None:
        worker = self.workers.get(proc.id)
        if worker is None:
            return
        rc = proc.returncode
        if not proc.started and not self._closing and not worker.preempted:
            # Counted before its tasks are retried, so the retry already sees the circuit.
            self._start_failed(worker, f"worker exited with code {rc} before it was ready; "
                                       f"last stderr: {proc.stderr_text() or '(none)'}")
        try:
            await self.pipeline.worker_gone(worker, closing=self._closing)
        finally:
            # Dropped even when storing what it held failed (WorkerProcess logs the error):
            # else its device stays taken in the ledger, and its timers run on, for good.
            if proc.state is not WorkerState.STOPPING and proc.session and not self._closing:
                log.warning("worker %s exited with code %s", worker.id, rc)
            proc.state = WorkerState.EXITED
            worker.close()
            del self.workers[worker.id]
            if worker.take_cpu_slot():
                self.listener.cpu_slot_freed(worker.id)
            self.listener.worker_exited(worker.id)
            self.listener.capacity_changed()

    # -- preemption --------------------------------------------------------------------------

    def preempt(self, worker_id: str, grace_s: float) -> None:
        """Drain a worker to free its VRAM: no new work, stop after its batch, kill after
        grace_s. Its unfinished tasks go back to the queue without using up an attempt."""
        worker = self.workers.get(worker_id)
        if worker is None or not worker.alive:
            return
        worker.proc.state = WorkerState.STOPPING
        worker.preempted = True
        if not worker.proc.started:
            # Still booting: it ran nothing, so it is stopped at once and what it holds goes
            # back to the queue, instead of loading a model only to be drained.
            self.pipeline.requeue_unsent(worker, "preempted", everything=True)
            worker.proc.kill()  # before its spawn ended: _boot kills it once it has a pid
            return
        if not worker.runs:
            self._stop_worker(worker)
        else:  # what it was never sent goes back to the queue now (the rest drains)
            self.pipeline.requeue_unsent(worker, "preempted")
        worker.grace_timer = asyncio.get_running_loop().call_later(grace_s, worker.proc.kill)

    def device_lost(self, index: int) -> list[str]:
        """GPU ``index`` is lost: its workers stop at once (a lost GPU cannot finish a batch)
        and every task they hold goes back to a queue unspent (Pipeline.device_lost). Returns
        the ids of the workers stopped; their exits give their room back."""
        hit = [w for w in self.workers.values()
               if w.state is not WorkerState.EXITED and index in w.device.gpu_indexes]
        for worker in hit:
            log.warning("worker %s stopped: GPU %d is lost", worker.id, index)
            # Preempted: its exit is no start failure, and finds nothing left to put back.
            worker.preempted = True
            worker.proc.state = WorkerState.STOPPING
            self.pipeline.device_lost(worker)
            worker.proc.kill()  # before its spawn ended: _boot kills it once it has a pid
        return [w.id for w in hit]

    # -- cancel, idle, shutdown --------------------------------------------------------------

    async def cancel(self, task_id: str) -> bool:
        """Cancel a running task: a session worker gets the cancel op, a one-off is stopped.

        The task is final at once; its worker counts as busy until it finishes the task (or
        its watchdog kills it), so nothing new lands on a worker still working on it.
        """
        run = next((w.runs[task_id] for w in self.workers.values() if task_id in w.runs), None)
        if run is None or run.cancelled:
            return False
        run.cancelled = True
        try:
            await self.store.finish(run.id, run.token, TaskState.CANCELLED,
                                    error=task_error(ErrorKind.CANCELLED, CANCELLED_MESSAGE),
                                    events=run.held)
        except StaleTokenError as exc:
            log.info("cancel raced with the task's end: %s", exc)
        except BaseException:
            # Not cancelled after all: the run goes on (its finish is stored as usual) and
            # the caller hears why. Had it ended meanwhile, its outcome was dropped as a
            # cancelled one's: the task waits for the claim-TTL reaper and runs again.
            run.cancelled = False
            raise
        self.pipeline.resolved(run, TaskState.CANCELLED, None)
        self._call_off(run)
        return True

    def abandon_lost(self, lost: list[tuple[str, int]]) -> None:
        """Stop working on attempts this node held in vain (task id, token): the store no
        longer has them as the tasks' running attempts (reaped after a stall longer than the
        claim TTL, perhaps running elsewhere now), so their outcome could not be recorded.
        They are called off as a cancel is, with nothing stored: the task's current attempt
        owns its outcome."""
        wanted = dict(lost)
        for worker in list(self.workers.values()):
            for run in list(worker.runs.values()):
                if wanted.get(run.id) == run.token and not run.cancelled:
                    run.cancelled = True
                    self._call_off(run)

    def _call_off(self, run: TaskRun) -> None:
        """Tell a cancelled run's worker to stop it: a session worker gets the cancel op, a
        one-off is stopped. The run stays held until the worker lets go (see cancel)."""
        worker = self.workers.get(run.worker_id)
        if worker is not None:  # else it exited meanwhile, and let go of the run as it did
            if worker.session:
                worker.proc.send(cancel_op(run.id))
            else:
                worker.proc.kill()

    def start_reaper(self) -> None:
        """Start the idle reaper, and kill the containers a dead predecessor of this node
        left running (runtime/containers.py), in the background."""
        self._reaper = asyncio.create_task(self._reap_idle(), name="gpulane-reaper")
        self._leftovers = asyncio.create_task(
            kill_leftovers(self.labels, DockerLauncher.docker), name="gpulane-leftovers")

    async def _reap_idle(self) -> None:
        while True:
            await asyncio.sleep(REAPER_INTERVAL_S)
            now = time.monotonic()
            for w in list(self.workers.values()):
                unload_s = w.preset.idle_unload_s
                if w.idle and unload_s > 0 and now - w.last_used >= unload_s:
                    log.info("unloading worker %s: idle for %.0fs", w.id, now - w.last_used)
                    self._stop_worker(w)

    def stop(self, worker_id: str) -> None:
        """Stop a worker in the background; its exit gives its capacity back."""
        worker = self.workers.get(worker_id)
        if worker is not None:
            self._stop_worker(worker)

    def _stop_worker(self, worker: Worker) -> None:
        # Out of the pool now, not when the stop starts running: the pass that unloads it
        # must not hand it a batch.
        if worker.alive:
            worker.proc.state = WorkerState.STOPPING
        self._spawn_bg(worker.proc.stop(self.shutdown_grace_s))

    async def stop_all(self) -> None:
        """Stop every worker; attempts still running go back to the queue for the next start."""
        self._closing = True
        chores = [c for c in (self._reaper, self._leftovers) if c is not None]
        for chore in chores:
            chore.cancel()
        # Awaited, so that a docker call of the cleanup is reaped before the loop ends.
        await asyncio.gather(*chores, return_exceptions=True)
        for w in self.workers.values():
            w.disarm_watchdog()
        stopping = [w.proc for w in self.workers.values()]
        await asyncio.gather(*(p.stop(self.shutdown_grace_s) for p in stopping),
                             return_exceptions=True)
        # Each exit handled (its attempts put back in the queue) before the node goes on to
        # close its store: a stopped process is not yet a handled exit.
        await asyncio.gather(*(p.wait_handled(self.shutdown_grace_s) for p in stopping))
        # Outcomes kept through a store outage get the workers' grace to land.
        await self.pipeline.outcomes.close(self.shutdown_grace_s)
        for task in list(self._background):
            task.cancel()

    def _spawn_bg(self, coro: Coroutine[object, object, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background_done)

    def _background_done(self, task: asyncio.Task[None]) -> None:
        """Forget a finished background step; a bug in one is logged with its traceback at
        once, not when the task is collected (or never, if it is kept)."""
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("a background step of the supervisor failed", exc_info=task.exception())
