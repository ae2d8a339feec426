"""Starts, feeds, watches and stops the node's workers, and turns what they say into task state.

The scheduler decides *what* runs *where*; the supervisor makes it happen: it boots workers,
hands them batches, writes their events to the store, enforces timeouts, retries attempts whose
worker died, and unloads idle workers. Capacity goes back to the ledger whenever a worker or a
batch ends, and ``on_capacity`` tells the scheduler to look again.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import time
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass

from gpulane.errors import StaleTokenError
from gpulane.model import ErrorKind, Task, TaskState, task_error
from gpulane.presets import Preset
from gpulane.protocol import (
    ENV_INPUT,
    ENV_INPUT_FILE,
    ENV_TASK_ID,
    EventType,
    WorkerMessage,
    cancel_op,
    run_op,
)
from gpulane.runtime.batcher import Batcher
from gpulane.runtime.circuit import PresetCircuit
from gpulane.runtime.launchers import DeviceAssignment, launcher_for
from gpulane.runtime.taskrun import TaskRun
from gpulane.runtime.worker_process import (
    WorkerProcess,
    WorkerStartError,
    WorkerState,
)
from gpulane.scheduling.ledger import Ledger
from gpulane.store import Finish, NewEvent, Store

log = logging.getLogger("gpulane.supervisor")

INLINE_INPUT_MAX_BYTES = 64 * 1024
"""Larger one-off inputs go through a file (GPULANE_INPUT_FILE) instead of the environment."""
REAPER_INTERVAL_S = 1.0
"""How often idle workers are checked for unloading."""
CANCELLED_MESSAGE = "cancelled by request"
"""The error message of every cancelled task."""
PIPELINE_DEPTH = 2
"""Batches a pipelining worker may hold: the one it runs and the one it starts next."""
NEXT_BATCH_AT = 0.75
"""A running batch's next one starts forming when this share of the last batch's latency
has passed: late enough that the tasks arrived meanwhile are claimed together, early enough
that the batch is ready (and, when full, already sent) as the running one ends."""
RETRYABLE_KINDS = frozenset({ErrorKind.WORKER_DIED.value, ErrorKind.START_TIMEOUT.value})
"""Failures that are the worker's, not the input's: the task gets another attempt."""


@dataclass(slots=True)
class SentBatch:
    """A batch given to a session worker, and the tasks of it the worker still owes."""

    owed: set[str]
    size: int
    full: bool  # it took as many tasks as the batcher allowed: more were probably waiting
    started: float | None  # when the worker could start it; None while one runs before it


class Supervisor:
    """The node's workers and the task attempts running on them."""

    def __init__(self, store: Store, ledger: Ledger, node: str, *, scratch_dir: str,
                 stderr_tail_lines: int, shutdown_grace_s: float,
                 on_capacity: Callable[[], None]) -> None:
        self.store = store
        self.ledger = ledger
        self.node = node
        self.scratch_dir = scratch_dir
        self.stderr_tail_lines = stderr_tail_lines
        self.shutdown_grace_s = shutdown_grace_s
        self.on_capacity = on_capacity
        self.workers: dict[str, WorkerProcess] = {}
        self.presets: dict[str, Preset] = {}  # worker id -> its preset
        self.inflight: dict[str, dict[str, TaskRun]] = {}  # worker id -> task id -> run
        self.runs: dict[str, TaskRun] = {}  # task id -> run
        self._cpu_busy: set[str] = set()  # workers holding a CPU slot for their current work
        self._timers: dict[str, asyncio.TimerHandle] = {}  # worker id -> its watchdog
        self._input_files: dict[str, str] = {}  # one-off worker id -> its input file
        self._preempted: set[str] = set()  # workers being drained for an urgent lease
        self.batchers: dict[str, Batcher] = {}  # session worker id -> its batch policy
        self.circuits: dict[str, PresetCircuit] = {}  # preset -> its start-failure circuit
        self._forming: dict[str, asyncio.TimerHandle] = {}  # worker id -> its batch's flush
        self._sent: dict[str, deque[SentBatch]] = {}  # worker id -> its batches, running first
        self._next: dict[str, dict[str, TaskRun]] = {}  # worker id -> the batch after those
        self._next_open: dict[str, asyncio.TimerHandle | None] = {}  # None: forming now
        self._ids = itertools.count(1)
        self._background: set[asyncio.Task[None]] = set()
        self._reaper: asyncio.Task[None] | None = None
        self._closing = False

    # -- queries the scheduler asks ------------------------------------------------------------

    def session_workers(self, preset: str, lane: str) -> list[WorkerProcess]:
        return [w for w in self.workers.values()
                if w.session and w.preset_name == preset and w.device.kind == lane
                and w.alive]

    def idle_worker(self, preset: str, lane: str) -> WorkerProcess | None:
        """A live session worker of the preset with nothing in flight (ready or booting)."""
        for w in self.session_workers(preset, lane):
            if not self.inflight.get(w.id):
                return w
        return None

    def forming_worker(self, preset: str, lane: str) -> tuple[WorkerProcess, int] | None:
        """A worker whose batch waits to fill (max_wait_ms), and how many more it takes."""
        for wid in self._forming:
            w = self.workers.get(wid)
            if w is not None and w.preset_name == preset and w.device.kind == lane:
                room = self.batchers[wid].size - len(self.inflight.get(wid) or ())
                if room > 0:
                    return w, room
        return None

    def next_batch_worker(self, preset: str, lane: str) -> tuple[WorkerProcess, int] | None:
        """A busy worker whose next batch has room, and how much (see ``dispatch``). The
        scheduler asks last: an idle or new worker starts the tasks sooner."""
        for w in self.session_workers(preset, lane):
            if (w.state is WorkerState.BUSY and w.id not in self._preempted
                    and w.id in self._next_open and self._next_open[w.id] is None):
                room = self.batchers[w.id].size - len(self._next.get(w.id) or ())
                if room > 0:
                    return w, room
        return None

    def batches_held(self, worker_id: str) -> dict[str, int]:
        """What the worker holds now: batches sent (the running one first, then at most one
        queued behind it) and tasks forming its next batch on the node."""
        return {"sent_batches": len(self._sent.get(worker_id) or ()),
                "next_batch_tasks": len(self._next.get(worker_id) or ())}

    def circuit(self, preset: str) -> PresetCircuit:
        """The preset's start-failure circuit (see runtime/circuit.py)."""
        circ = self.circuits.get(preset)
        if circ is None:
            circ = self.circuits[preset] = PresetCircuit()
        return circ

    def may_start(self, preset: str) -> bool:
        """Whether a new worker of the preset may start (its circuit is not open)."""
        circ = self.circuits.get(preset)
        return circ is None or circ.allows_start()

    def _start_failed(self, worker: WorkerProcess, message: str) -> None:
        """Count a worker that never started against its preset's circuit (once per worker:
        its exit and its start timeout may both report it)."""
        if worker.start_failure_counted:
            return
        worker.start_failure_counted = True
        preset = worker.preset_name
        if self.circuit(preset).failed(message):
            circ = self.circuits[preset]
            log.error("preset %s: %d workers in a row failed to start; no new one starts for "
                      "%.0f s. Last error: %s", preset, circ.failures,
                      circ.open_until - time.monotonic(), message)

    def batch_size(self, worker: WorkerProcess) -> int:
        """How many tasks the worker's next batch may take."""
        batcher = self.batchers.get(worker.id)
        return batcher.size if batcher is not None else 1

    def evict_idle(self, device: int | None, needed_mb: int) -> bool:
        """Stop idle GPU session workers, least recently used first, until ``needed_mb`` would
        be free on ``device`` (any device when None). True if something was stopped."""
        idle = sorted((w for w in self.workers.values()
                       if w.session and w.device.kind == "gpu" and w.state is WorkerState.READY
                       and not self.inflight.get(w.id)
                       and (device is None or w.device.index == device)),
                      key=lambda w: w.last_used)
        stopped = False
        for w in idle:
            acct = self.ledger.gpus[w.device.index or 0]
            if acct.free_mb >= needed_mb:
                break
            log.info("unloading idle worker %s (%s) to make room for %d MB", w.id,
                     w.preset_name, needed_mb)
            self._spawn_bg(self._stop_worker(w))
            stopped = True
        return stopped

    # -- starting work ---------------------------------------------------------------------------

    def start_worker(self, preset: Preset, device: DeviceAssignment, wid: str) -> WorkerProcess:
        """Create a session worker and boot it in the background. The caller has already
        taken the device's capacity in the ledger under ``wid``."""
        return self._create(wid, preset, device, session=True, extra_env=None)

    def next_worker_id(self, preset: Preset, device: DeviceAssignment) -> str:
        return f"{preset.name}-{device.name.replace(':', '')}-{next(self._ids)}"

    def _create(self, wid: str, preset: Preset, device: DeviceAssignment, *, session: bool,
                extra_env: dict[str, str] | None) -> WorkerProcess:
        spec = launcher_for(preset).build(preset, device, wid, extra_env)
        worker = WorkerProcess(wid, preset.name, device, spec, session=session,
                               stderr_tail_lines=self.stderr_tail_lines,
                               on_messages=self._on_messages, on_exit=self._on_exit)
        self.workers[wid] = worker
        self.presets[wid] = preset
        self.inflight[wid] = {}
        if session:
            self.batchers[wid] = Batcher(preset.batch)
        self.circuit(preset.name).starting()
        self._spawn_bg(self._boot(worker, preset))
        return worker

    async def _boot(self, worker: WorkerProcess, preset: Preset) -> None:
        try:
            await worker.spawn()
        except OSError as exc:
            worker.state = WorkerState.EXITED
            worker.stderr_tail.append(f"cannot start {worker.spec.argv[0]!r}: {exc}")
            self._start_failed(worker, worker.stderr_tail[-1])
            await self._on_exit(worker)
            return
        try:
            if worker.session:
                await worker.wait_ready(preset.start_timeout_s)
            else:
                await worker.wait_connected(preset.start_timeout_s)
        except WorkerStartError as exc:
            log.warning("worker %s failed to start: %s", worker.id, exc)
            self._start_failed(worker, str(exc))
            # Out of the pool first, so that a retry is not handed straight back to it.
            worker.state = WorkerState.STOPPING
            worker.kill()
            for run in list(self.inflight.get(worker.id, {}).values()):
                await self._attempt_failed(run, exc.kind, str(exc))
            return
        self.circuit(preset.name).started()
        if worker.session:
            worker.state = WorkerState.READY
            log.info("worker %s ready on %s (pid %s)", worker.id, worker.device.name,
                     worker.pid)
            if self.inflight[worker.id]:
                self._send_batch(worker, list(self.inflight[worker.id].values()))
            else:
                self.on_capacity()

    def dispatch(self, worker: WorkerProcess, tasks: list[Task]) -> None:
        """Give claimed tasks to a session worker: a new batch, or more for a forming one.

        A batch that is not full waits up to the preset's max_wait_ms for more tasks (the
        scheduler tops it up through ``forming_worker``) when the worker's batcher says so."""
        preset = self.presets[worker.id]
        new = {t.id: TaskRun(t, preset, worker.id, t.token, t.timeout_s or preset.timeout_s)
               for t in tasks}
        self.inflight[worker.id].update(new)
        self.runs.update(new)
        if worker.state is WorkerState.BUSY:
            # The next batch forms on the node while the worker runs one, so it goes out
            # the moment that one ends (or, to a pipelining worker, as soon as it is full).
            self._next.setdefault(worker.id, {}).update(new)
            self._feed(worker)
            return
        if worker.state is not WorkerState.READY:
            return  # still booting: the batch goes out once it is ready
        batcher = self.batchers[worker.id]
        held = len(self.inflight[worker.id])
        if held < batcher.size and batcher.waits:
            if worker.id not in self._forming:
                self._forming[worker.id] = asyncio.get_running_loop().call_later(
                    batcher.max_wait_s, self._flush, worker.id)
            return
        self._send_batch(worker, list(self.inflight[worker.id].values()))

    def _flush(self, worker_id: str) -> None:
        """A forming batch's wait is over: send what it holds."""
        self._forming.pop(worker_id, None)
        worker = self.workers.get(worker_id)
        if worker is None or worker.state is not WorkerState.READY:
            return
        if len(self.inflight.get(worker_id) or ()) == 1:
            self.batchers[worker_id].waited_in_vain()
        self._send_batch(worker, list(self.inflight[worker_id].values()))

    def _feed(self, worker: WorkerProcess) -> None:
        """Send the worker its next batch when it may take it: at once when nothing runs, or
        ahead of time, once full, to a worker that pipelines."""
        held = self._next.get(worker.id)
        if not held or worker.id in self._preempted or not worker.alive:
            return
        sent = self._sent.get(worker.id) or ()
        depth = PIPELINE_DEPTH if worker.pipelines else 1
        if not sent or (len(sent) < depth and len(held) >= self.batch_size(worker)):
            self._next[worker.id] = {}
            self._send_batch(worker, list(held.values()))

    def _send_batch(self, worker: WorkerProcess, runs: list[TaskRun]) -> None:
        timer = self._forming.pop(worker.id, None)
        if timer is not None:
            timer.cancel()
        for run in runs:
            if run.cancelled:
                self._forget(run)  # cancelled while its batch formed: never sent
        runs = [r for r in runs if not r.cancelled]
        if not runs:
            return  # the last _forget gave the worker (and its CPU slot) back
        worker.state = WorkerState.BUSY
        worker.last_used = time.monotonic()
        sent = self._sent.setdefault(worker.id, deque())
        sent.append(SentBatch({r.id for r in runs}, len(runs),
                              len(runs) >= self.batch_size(worker),
                              None if sent else time.monotonic()))
        if len(sent) == 1:
            self._time_next_batch(worker.id)
        if not worker.send(run_op([(r.id, r.task.input) for r in runs])):
            worker.kill()  # its exit fails these attempts and retries them
            return
        self._arm_watchdog(worker)

    def run_oneoff(self, preset: Preset, device: DeviceAssignment, task: Task,
                   worker_id: str) -> None:
        """Start a one-off worker for one claimed task; it gets its input in the environment."""
        import orjson

        payload = orjson.dumps(task.input)
        extra = {ENV_TASK_ID: task.id}
        if len(payload) <= INLINE_INPUT_MAX_BYTES:
            extra[ENV_INPUT] = payload.decode()
        else:
            os.makedirs(self.scratch_dir, exist_ok=True)
            path = os.path.join(self.scratch_dir, f"{task.id}.input.json")
            with open(path, "wb") as fh:
                fh.write(payload)
            extra[ENV_INPUT_FILE] = path
            self._input_files[worker_id] = path
        run = TaskRun(task, preset, worker_id, task.token, task.timeout_s or preset.timeout_s)
        self.runs[task.id] = run
        self.inflight[worker_id] = {task.id: run}
        worker = self._create(worker_id, preset, device, session=False, extra_env=extra)
        worker.state = WorkerState.BUSY
        self.inflight[worker.id] = {task.id: run}
        self._arm_watchdog(worker)

    def hold_cpu(self, worker_id: str) -> None:
        self._cpu_busy.add(worker_id)

    def _release_cpu(self, worker_id: str) -> None:
        if worker_id in self._cpu_busy:
            self._cpu_busy.discard(worker_id)
            self.ledger.release_cpu()

    # -- what workers say ------------------------------------------------------------------------

    def _route(self, worker: WorkerProcess, msg: WorkerMessage) -> TaskRun | None:
        runs = self.inflight.get(worker.id) or {}
        if msg.task is not None:
            return runs.get(msg.task)
        if len(runs) == 1:
            return next(iter(runs.values()))
        return None

    async def _on_messages(self, worker: WorkerProcess, msgs: list[WorkerMessage]) -> None:
        """Lines the worker wrote together. Streamed events are stored as they come; the
        finishes among them (a whole batch, usually) are stored in one transaction."""
        ends: list[tuple[TaskRun, Finish]] = []
        ooms: list[TaskRun] = []
        for msg in msgs:
            if worker.session and msg.type in (EventType.CONNECTION, EventType.WORKER):
                continue  # worker-level news; WorkerProcess tracks readiness itself
            run = self._route(worker, msg)
            if run is not None and run.cancelled:
                if msg.type is EventType.FINISH:
                    self._forget(run)  # the worker let go of the cancelled task
                continue
            if run is None or run.done:
                if msg.type is not EventType.LOG:
                    log.debug("worker %s: %s event for no running task: %s", worker.id,
                              msg.type.value, msg.raw or msg.data)
                else:
                    log.info("[%s stdout] %s", worker.id, msg.data.get("line"))
                continue
            if msg.type is EventType.UNKNOWN:
                log.warning("worker %s emitted an unknown event %r; kept as 'unknown'",
                            worker.id, msg.data.get("event"))
            if msg.type is EventType.FINISH:
                run.done = True
                end = self._finish_of(run, msg)
                if self._shrinks_on_oom(worker, end):
                    ooms.append(run)
                else:
                    ends.append((run, end))
                continue
            event, _held = run.take(msg)
            if event is not None:
                with contextlib.suppress(StaleTokenError):  # the attempt was ended elsewhere
                    await self.store.append_events(run.id, [event])
        if ends:
            await self._store_ends(ends)
        if ooms:
            await self._rerun_smaller(worker, ooms)

    async def _requeue(self, runs: list[TaskRun], event: dict[str, object]) -> None:
        """Put attempts back in the queue without holding them against max_attempts (the
        worker never started them, or they must run again in a smaller batch), each with an
        ``error`` event saying why."""
        for run in runs:
            run.done = True
            with contextlib.suppress(StaleTokenError):  # ended elsewhere (e.g. cancelled)
                await self.store.requeue(run.id, run.token, None, events=[NewEvent(
                    EventType.ERROR.value, {**event, "retrying": True})])
            self._forget(run)

    def _shrinks_on_oom(self, worker: WorkerProcess, end: Finish) -> bool:
        """An ``oom`` failure in a batch of several: the batch shrinks and its tasks run
        again, instead of failing (a batch of one has nothing left to shrink)."""
        if end.error is None or end.error.get("kind") != ErrorKind.OOM.value:
            return False
        sent = self._sent.get(worker.id)
        return sent is not None and len(sent) > 0 and sent[0].size > 1

    async def _rerun_smaller(self, worker: WorkerProcess, runs: list[TaskRun]) -> None:
        batcher = self.batchers[worker.id]
        n = self._sent[worker.id][0].size
        if batcher.ceiling > n // 2:
            batcher.oom(n)
            log.warning("worker %s ran out of memory on a batch of %d; its batches are now "
                        "at most %d", worker.id, n, batcher.ceiling)
        # Not the input's fault, and bounded (the ceiling halves each time): the attempts
        # are not held against max_attempts.
        await self._requeue(runs, {
            "kind": ErrorKind.OOM.value, "batch_size": n,
            "message": f"out of device memory in a batch of {n}: runs again in a batch of "
                       f"at most {batcher.ceiling}"})

    def _finish_of(self, run: TaskRun, msg: WorkerMessage) -> Finish:
        status = msg.data.get("status", "completed")
        events = [*run.held, NewEvent(EventType.FINISH.value, msg.data)]
        if status == "completed":
            return Finish(run.id, run.token, TaskState.SUCCEEDED, output=run.final_output(),
                          events=events)
        raw_err = msg.data.get("error")
        err: dict[str, object] = raw_err if isinstance(raw_err, dict) else {}
        kind = str(err.get("kind") or ErrorKind.INTERNAL.value)
        message = str(err.get("message") or f"worker reported status {status!r}")
        return Finish(run.id, run.token, TaskState.FAILED, error=task_error(kind, message),
                      events=events)

    async def _store_ends(self, ends: list[tuple[TaskRun, Finish]]) -> None:
        """Free the runs' capacity, then write their final states (the runs are already
        marked done).

        Freeing first sends the worker its next batch, when the node holds one, before the
        node spends its time storing and answering this one, which the worker would
        otherwise idle through."""
        for run, _ in ends:
            self._forget(run)
        try:
            results = await self.store.finish_many([f for _, f in ends])
        except Exception:
            log.exception("storing %d task outcomes failed", len(ends))
            results = []
        for got in results:
            if isinstance(got, StaleTokenError):
                log.info("dropped the outcome of a stale attempt: %s", got)

    async def _end(self, run: TaskRun, state: TaskState, *, output: object = None,
                   error: dict[str, object] | None = None,
                   events: list[NewEvent] | None = None) -> None:
        """Write a run's final state once and give its worker back its capacity."""
        if run.done:
            return
        run.done = True
        await self._store_ends([(run, Finish(run.id, run.token, state, output=output,
                                             error=error, events=events or []))])

    def _forget(self, run: TaskRun) -> None:
        self.runs.pop(run.id, None)
        wid = run.worker_id
        runs = self.inflight.get(wid)
        if runs is None:
            return
        runs.pop(run.id, None)
        held = self._next.get(wid)
        if held:
            held.pop(run.id, None)
        worker = self.workers.get(wid)
        if worker is not None:
            worker.tasks_done += 1
            worker.last_used = time.monotonic()
        sent = self._sent.get(wid)
        if worker is not None and (not sent or self._owed_less(wid, sent, run.id)):
            self._feed(worker)  # a batch ended (or none runs): the next one may go out now
        if runs:
            if worker is not None:
                self._arm_watchdog(worker)  # the next task it owes gets its own clock
            return
        self._disarm_watchdog(wid)
        self._close_next(wid)
        self._release_cpu(wid)
        if worker is not None and worker.session and worker.state is WorkerState.BUSY:
            worker.state = WorkerState.READY
        if worker is not None and wid in self._preempted:
            self._spawn_bg(self._stop_worker(worker))  # drained: its batch is done
        self.on_capacity()

    def _owed_less(self, wid: str, sent: deque[SentBatch], task_id: str) -> bool:
        """A task of a sent batch ended; batches with nothing left owed are done (True when
        one was), and the batcher learns how long each took from when the worker could start
        it."""
        for batch in sent:
            if task_id in batch.owed:
                batch.owed.discard(task_id)
                break
        now = time.monotonic()
        ended = False
        while sent and not sent[0].owed:
            ended = True
            done = sent.popleft()
            batcher = self.batchers.get(wid)
            if batcher is not None and done.started is not None:
                batcher.observe(done.size, now - done.started, full=done.full)
            if sent:
                sent[0].started = now
                self._time_next_batch(wid)
        return ended

    def _time_next_batch(self, wid: str) -> None:
        """A batch started running: its successor may start forming (see ``dispatch``) once
        NEXT_BATCH_AT of the last batch's latency has passed; until then, tasks wait in the
        queue, where one claim takes them all, not one claim per arrival."""
        self._close_next(wid)
        batcher = self.batchers.get(wid)
        last = batcher.stats.last_latency_ms if batcher is not None else None
        if last is None:
            return  # nothing measured yet: the next batch is claimed when this one ends
        self._next_open[wid] = asyncio.get_running_loop().call_later(
            last / 1000 * NEXT_BATCH_AT, self._open_next, wid)

    def _open_next(self, wid: str) -> None:
        self._next_open[wid] = None
        self.on_capacity()

    def _close_next(self, wid: str) -> None:
        timer = self._next_open.pop(wid, None)
        if timer is not None:
            timer.cancel()

    async def _attempt_failed(self, run: TaskRun, kind: str, message: str) -> None:
        """An attempt ended through no fault of its input: retry it while attempts remain."""
        if run.done:
            return
        if kind in RETRYABLE_KINDS and run.token < run.preset.max_attempts:
            run.done = True
            error = task_error(kind, message, attempt=run.token)
            try:
                await self.store.requeue(run.id, run.token, error, events=[
                    NewEvent(EventType.ERROR.value, {"kind": kind, "message": message,
                                                     "attempt": run.token, "retrying": True})])
            except StaleTokenError as exc:
                log.info("dropped a retry of a stale attempt: %s", exc)
            self._forget(run)
            return
        await self._end(run, TaskState.FAILED, error=task_error(
            kind, message, attempts=run.token))

    async def _on_exit(self, worker: WorkerProcess) -> None:
        rc = worker.returncode
        if not worker.started and not self._closing:
            # Counted before its tasks are retried, so the retry already sees the circuit.
            self._start_failed(worker, f"worker exited with code {rc} before it was ready; "
                                       f"last stderr: {worker.stderr_text() or '(none)'}")
        runs = list(self.inflight.get(worker.id, {}).values())
        if not worker.session and runs and rc == 0:
            # A plain-protocol one-off that exits cleanly without a finish line succeeded.
            run = runs[0]
            await self._end(run, TaskState.SUCCEEDED, output=run.final_output(),
                            events=run.held)
        elif self._closing or worker.id in self._preempted:
            for run in runs:  # not the task's fault: it runs again (node restart, preemption)
                if not run.done:
                    run.done = True
                    with contextlib.suppress(StaleTokenError):
                        await self.store.requeue(run.id, run.token, None, events=[NewEvent(
                            EventType.ERROR.value, {"kind": "preempted" if not self._closing
                                                    else "node_stopping", "retrying": True})])
        else:
            tail = worker.stderr_text()
            for run in runs:
                await self._attempt_failed(
                    run, ErrorKind.WORKER_DIED.value,
                    f"worker {worker.id} exited with code {rc} while running the task; "
                    f"last stderr lines:\n{tail or '(none)'}")
        if worker.state is not WorkerState.STOPPING and worker.session and not self._closing:
            log.warning("worker %s exited with code %s", worker.id, rc)
        worker.state = WorkerState.EXITED
        self._disarm_watchdog(worker.id)
        for run in runs:
            self.runs.pop(run.id, None)
        self._release_cpu(worker.id)
        self.ledger.release(worker.id)
        self._preempted.discard(worker.id)
        self.workers.pop(worker.id, None)
        self.presets.pop(worker.id, None)
        self.inflight.pop(worker.id, None)
        self.batchers.pop(worker.id, None)
        self._sent.pop(worker.id, None)
        self._next.pop(worker.id, None)
        self._close_next(worker.id)
        timer = self._forming.pop(worker.id, None)
        if timer is not None:
            timer.cancel()
        input_file = self._input_files.pop(worker.id, None)
        if input_file is not None:
            with contextlib.suppress(OSError):
                os.unlink(input_file)
        self.on_capacity()

    # -- preemption --------------------------------------------------------------------------

    def preempt(self, worker_id: str, grace_s: float) -> None:
        """Drain a worker to free its VRAM: no new work, stop after its batch, kill after
        grace_s. Its unfinished tasks go back to the queue without using up an attempt."""
        worker = self.workers.get(worker_id)
        if worker is None or not worker.alive:
            return
        worker.state = WorkerState.STOPPING
        self._preempted.add(worker_id)
        held = self._next.pop(worker_id, None)
        if held:  # its next batch never started: back to the queue now
            self._spawn_bg(self._requeue(list(held.values()), {"kind": "preempted"}))
        if not self.inflight.get(worker_id):
            self._spawn_bg(self._stop_worker(worker))
        asyncio.get_running_loop().call_later(grace_s, worker.kill)

    # -- timeouts, cancel, idle, shutdown ----------------------------------------------------

    def _arm_watchdog(self, worker: WorkerProcess) -> None:
        """(Re)start the worker's clock on the oldest task it still owes.

        Workers may run a batch item by item, so each task's timeout_s counts from the moment
        the worker could start it: when the batch was sent, or when the task before it ended.
        A worker that makes no progress for that long is stuck and gets killed.
        """
        self._disarm_watchdog(worker.id)
        runs = self.inflight.get(worker.id)
        if not runs:
            return
        oldest = next(iter(runs.values()))
        loop = asyncio.get_running_loop()
        self._timers[worker.id] = loop.call_later(oldest.timeout_s, self._on_timeout, oldest,
                                                  worker)

    def _disarm_watchdog(self, worker_id: str) -> None:
        timer = self._timers.pop(worker_id, None)
        if timer is not None:
            timer.cancel()

    def _on_timeout(self, run: TaskRun, worker: WorkerProcess) -> None:
        self._timers.pop(worker.id, None)
        if run.done and not run.cancelled:
            return
        self._spawn_bg(self._timeout(run, worker))

    async def _timeout(self, run: TaskRun, worker: WorkerProcess) -> None:
        # Killing is the only sure way to stop the work; the batch's other tasks are retried.
        # Out of the pool first, so that nothing new is handed to a worker about to die.
        worker.state = WorkerState.STOPPING
        if run.cancelled:  # it never let go of a cancelled task
            worker.kill()
            return
        await self._end(run, TaskState.FAILED, error=task_error(
            ErrorKind.TIMEOUT, f"the task ran past its timeout_s={run.timeout_s:g}; "
            f"worker {worker.id} was killed (raise timeout_s in the request or the preset)"),
            events=run.held)
        worker.kill()

    async def cancel(self, task_id: str) -> bool:
        """Cancel a running task: a session worker gets the cancel op, a one-off is stopped.

        The task is final at once; its worker counts as busy until it finishes the task (or
        its watchdog kills it), so nothing new lands on a worker still working on it.
        """
        run = self.runs.get(task_id)
        if run is None or run.done:
            return False
        run.done = run.cancelled = True
        try:
            await self.store.finish(run.id, run.token, TaskState.CANCELLED,
                                    error=task_error(ErrorKind.CANCELLED, CANCELLED_MESSAGE),
                                    events=run.held)
        except StaleTokenError as exc:
            log.info("cancel raced with the task's end: %s", exc)
        worker = self.workers.get(run.worker_id)
        if worker is None:
            self._forget(run)
        elif worker.session:
            worker.send(cancel_op(task_id))
        else:
            worker.kill()
        return True

    def start_reaper(self) -> None:
        self._reaper = asyncio.create_task(self._reap_idle(), name="gpulane-reaper")

    async def _reap_idle(self) -> None:
        while True:
            await asyncio.sleep(REAPER_INTERVAL_S)
            now = time.monotonic()
            for w in list(self.workers.values()):
                preset = self.presets.get(w.id)
                if (preset is None or not w.session or w.state is not WorkerState.READY
                        or self.inflight.get(w.id) or preset.idle_unload_s <= 0):
                    continue
                if now - w.last_used >= preset.idle_unload_s:
                    log.info("unloading worker %s: idle for %.0fs", w.id, now - w.last_used)
                    self._spawn_bg(self._stop_worker(w))

    async def _stop_worker(self, worker: WorkerProcess) -> None:
        await worker.stop(self.shutdown_grace_s)

    async def stop_all(self) -> None:
        """Stop every worker; attempts still running go back to the queue for the next start."""
        self._closing = True
        if self._reaper is not None:
            self._reaper.cancel()
        for wid in list(self._timers):
            self._disarm_watchdog(wid)
        await asyncio.gather(*(w.stop(self.shutdown_grace_s)
                               for w in list(self.workers.values())),
                             return_exceptions=True)
        for task in list(self._background):
            task.cancel()

    def _spawn_bg(self, coro: Coroutine[object, object, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
