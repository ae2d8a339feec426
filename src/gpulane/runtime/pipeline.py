"""The batch pipeline of a node's workers, top to bottom: form, send, receive, store.

1. form: ``dispatch`` takes claimed tasks for a session worker: a new batch, a top-up of one
   waiting to fill (max_wait_ms), or the *next* batch, which forms on the node while the
   worker runs one and goes out the moment that one ends (or, full, ahead of it to a worker
   that pipelines, PIPELINE_DEPTH).
2. send: ``send_batch`` writes the run op, records the batch, times when its successor opens
   (NEXT_BATCH_AT) and arms the watchdog on the oldest task the worker owes.
3. receive: ``on_messages`` turns the worker's lines into events; a finish ends its run at
   once; an ``oom`` in a batch of several halves the batch and runs its tasks again; in a
   batch of one on a GPU it reruns the task on the CPU (gpu_oom, see ``_oom_falls_back``).
4. store: streamed events are appended as they come; the finishes of one read are stored in
   one transaction, after their runs let go of the worker.

Every run ends through ``_settle``: the worker releases it (marking it done in the same step),
then the worker gets its next batch, or is freed (CPU slot, capacity, a drained worker stops).
Only then are outcomes written, so a store that fails cannot keep a worker busy. A cancelled
run stays held until the worker lets go of it (its finish, or its exit).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine, Iterable

from gpulane.metrics import Meters
from gpulane.model import DeviceWish, ErrorKind, Task, TaskState, task_error
from gpulane.protocol import EventType, WorkerMessage, run_op
from gpulane.runtime.items import fit
from gpulane.runtime.measures import LaneMeasures
from gpulane.runtime.outcomes import OutcomeWriter
from gpulane.runtime.poison import CrashCeiling
from gpulane.runtime.taskrun import TaskRun
from gpulane.runtime.view import RuntimeListener
from gpulane.runtime.worker import SentBatch, Worker
from gpulane.runtime.worker_process import WorkerProcess, WorkerState
from gpulane.store import Finish, NewEvent, Store

log = logging.getLogger("gpulane.supervisor")

PIPELINE_DEPTH = 2
"""Batches a pipelining worker may hold: the one it runs and the one it starts next."""
NEXT_BATCH_AT = 0.75
"""A running batch's next one starts forming when this share of the last batch's latency
has passed: late enough that the tasks arrived meanwhile are claimed together, early enough
that the batch is ready (and, when full, already sent) as the running one ends."""
RETRYABLE_KINDS = frozenset({ErrorKind.WORKER_DIED.value, ErrorKind.START_TIMEOUT.value})
"""Failures that are the worker's, not the input's: the task gets another attempt."""


class Pipeline:
    """Moves task runs through the node's workers (held by the Supervisor's registry)."""

    def __init__(self, store: Store, workers: dict[str, Worker], listener: RuntimeListener,
                 *, spawn: Callable[[Coroutine[object, object, None]], None],
                 stop: Callable[[Worker], None],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.store = store
        self.workers = workers
        self.listener = listener
        self._spawn = spawn
        self._stop = stop
        self._clock = clock  # batch latencies (a test hands in a fake one)
        self.crash_ceilings: dict[str, CrashCeiling] = {}  # preset -> its poison isolation
        self.outcomes = OutcomeWriter(store, listener)
        self.measures = LaneMeasures()  # the supervisor hands in its own
        self.meters = Meters()  # the node's metrics hand in theirs (task ends, batches)
        self.on_freed: Callable[[], None] = listener.capacity_changed  # a run ended (_settle)
        self.on_next_open: Callable[[], None] = listener.capacity_changed  # see _open_next

    def crash_ceiling(self, preset: str) -> CrashCeiling:
        """The preset's crash ceiling (runtime/poison.py), shared by all its workers."""
        return self.crash_ceilings.setdefault(preset, CrashCeiling())

    def resolved(self, run: TaskRun, state: TaskState, error: dict[str, object] | None) -> None:
        """The run reached a final outcome: counted, and its task no longer suspected."""
        self.meters.task_ended(run.task, state.value, error)
        if (ceiling := self.crash_ceilings.get(run.preset.name)) is not None:
            ceiling.resolved(run.id)

    # -- 1. form ---------------------------------------------------------------------------------

    def dispatch(self, worker: Worker, tasks: list[Task]) -> None:
        """Give claimed tasks to a session worker: a new batch, or more for a forming one.

        A batch that is not full waits up to the preset's max_wait_ms for more tasks (the
        scheduler tops it up through ``forming_worker``) when the worker's batcher says so."""
        preset = worker.preset
        new = {t.id: TaskRun(t, preset, worker.id, t.token, t.timeout_s or preset.timeout_s)
               for t in tasks}
        worker.hold(new)
        if worker.state is WorkerState.BUSY:
            # The next batch forms on the node while the worker runs one, so it goes out
            # the moment that one ends (or, to a pipelining worker, as soon as it is full).
            worker.next.update(new)
            self._feed(worker)
            return
        if worker.state is not WorkerState.READY:
            return  # still booting: the batch goes out once it is ready
        batcher = worker.batcher
        if batcher is not None and worker.held_items < batcher.size and batcher.waits:
            if worker.forming is None:
                worker.forming = asyncio.get_running_loop().call_later(
                    batcher.max_wait_s, self._flush, worker)
            return
        self.send_batch(worker, list(worker.runs.values()))

    def _flush(self, worker: Worker) -> None:
        """A forming batch's wait is over: send what it holds."""
        worker.forming = None
        if worker.state is not WorkerState.READY:
            return
        if len(worker.runs) == 1 and worker.batcher is not None:
            worker.batcher.waited_in_vain()
        self.send_batch(worker, list(worker.runs.values()))

    def _feed(self, worker: Worker) -> None:
        """Send the worker its next batch when it may take it: at once when nothing runs, or
        ahead of time, once full, to a worker that pipelines."""
        if not worker.next or worker.preempted or not worker.alive:
            return
        depth = PIPELINE_DEPTH if worker.proc.pipelines else 1
        if not worker.sent or (len(worker.sent) < depth
                               and len(worker.next) >= worker.batch_size):
            self.send_batch(worker, worker.take_next())

    # -- 2. send ---------------------------------------------------------------------------------

    def send_batch(self, worker: Worker, batch: list[TaskRun]) -> None:
        worker.stop_forming()
        runs = []
        for run in batch:
            if run.cancelled:
                self._settle(run)  # cancelled while its batch formed: never sent
            else:
                runs.append(run)
        if not runs:
            return  # the last _settle gave the worker (and its CPU slot) back
        # The cap fell since these were claimed (a crash ceiling, an OOM): the rest go back.
        size = worker.batcher.size if worker.batcher is not None else 1  # items: see items.py
        runs, over, items = fit(runs, size)
        proc = worker.proc
        proc.state = WorkerState.BUSY
        proc.last_used = time.monotonic()  # the idle reaper's clock, as in Worker.release
        now = self._clock()
        sent = worker.sent
        sent.append(SentBatch({r.id for r in runs}, len(runs), items >= size,
                              None if sent else now, items))
        if len(sent) == 1:
            self._time_next_batch(worker)
        if over:  # settled while the batch is owed: the worker stays busy with it
            again = self._settle_unsent(over)
            self._spawn(self.outcomes.requeue_unspent(again, {
                "kind": "batch_cut", "message": f"the preset's batches are now at most {size} "
                                                f"items: runs in a later batch"}))
        if not proc.send(run_op([(r.id, r.task.input) for r in runs])):
            proc.kill()  # its exit fails these attempts and retries them
            return
        self.arm_watchdog(worker)
        self.meters.batch_sent(worker.preset_name, worker.device.kind, len(runs))

    def _time_next_batch(self, worker: Worker) -> None:
        """A batch started running: its successor may start forming (see ``dispatch``) once
        NEXT_BATCH_AT of the last batch's latency has passed; until then, tasks wait in the
        queue, where one claim takes them all, not one claim per arrival."""
        worker.close_next()
        last = worker.batcher.stats.last_latency_ms if worker.batcher is not None else None
        if last is None:
            return  # nothing measured yet: the next batch is claimed when this one ends
        worker.next_timer = asyncio.get_running_loop().call_later(
            last / 1000 * NEXT_BATCH_AT, self._open_next, worker)

    def _open_next(self, worker: Worker) -> None:
        worker.next_timer = None
        worker.next_open = True
        self.on_next_open()

    # -- 3. receive ------------------------------------------------------------------------------

    @staticmethod
    def _route(worker: Worker, msg: WorkerMessage, *, by_position: bool) -> TaskRun | None:
        """The run a message is about: named by its task id, else (``by_position``) the one
        run the worker holds, as for a plain-protocol worker that names no task."""
        runs = worker.runs
        if msg.task is not None:
            return runs.get(msg.task)
        if by_position and len(runs) == 1:
            return next(iter(runs.values()))
        return None

    async def on_messages(self, proc: WorkerProcess, msgs: list[WorkerMessage]) -> None:
        """Lines the worker wrote together. Streamed events are stored as they come; the
        finishes among them (a whole batch, usually) are stored in one transaction."""
        worker = self.workers.get(proc.id)
        if worker is None:
            return
        ends: list[Finish] = []
        ooms: list[TaskRun] = []
        to_cpu: list[TaskRun] = []
        oom_size = 0
        settled = False
        for msg in msgs:
            if worker.session and msg.type in (EventType.CONNECTION, EventType.WORKER):
                continue  # worker-level news; WorkerProcess tracks readiness itself
            # Lines of one read were written before the worker could see what a finish among
            # them made the node send next: a line naming no task after a finish belongs to
            # no run, not to the next batch's.
            run = self._route(worker, msg, by_position=not settled)
            if run is not None and run.cancelled:
                if msg.type is EventType.FINISH:
                    settled = self._settle(run)  # the worker let go of the cancelled task
                continue
            if run is None:
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
                end = self._finish_of(run, msg)
                if self._shrinks_on_oom(worker, end):  # asked before the run leaves its batch
                    oom_size = worker.sent[0].size
                    self._lower_ceiling(worker, oom_size)
                    ooms.append(run)
                elif self._oom_falls_back(worker, run, end):
                    to_cpu.append(run)
                else:
                    ends.append(end)
                    self.resolved(run, end.state, end.error)
                self._settle(run)
                settled = True
                continue
            event, _held = run.take(msg)
            if event is not None:
                await self.outcomes.append(run, event)
        if ends:
            await self.outcomes.finish_many(ends)
        if ooms and worker.batcher is not None:
            # Not the input's fault, and bounded (the ceiling halves each time): the attempts
            # are not held against max_attempts.
            await self.outcomes.requeue_unspent([(r.id, r.token) for r in ooms], {
                "kind": ErrorKind.OOM.value, "batch_size": oom_size,
                "message": f"out of device memory in a batch of {oom_size}: runs again in a "
                           f"batch of at most {worker.batcher.ceiling}"})
        await self.outcomes.gpu_oom(to_cpu, worker.device.name)

    @staticmethod
    def _finish_of(run: TaskRun, msg: WorkerMessage) -> Finish:
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

    @staticmethod
    def _shrinks_on_oom(worker: Worker, end: Finish) -> bool:
        """An ``oom`` failure in a batch of several: the batch shrinks and its tasks run
        again, instead of failing (a batch of one has nothing left to shrink)."""
        if end.error is None or end.error.get("kind") != ErrorKind.OOM.value:
            return False
        return len(worker.sent) > 0 and worker.sent[0].size > 1

    @staticmethod
    def _oom_falls_back(worker: Worker, run: TaskRun, end: Finish) -> bool:
        """An ``oom`` on a GPU with nothing left to shrink (a batch of one, a one-off), of an
        ``auto`` task whose preset falls back on ``oom``: it reruns on the CPU, not failed."""
        return (end.error is not None and end.error.get("kind") == ErrorKind.OOM.value
                and worker.device.kind == "gpu" and run.task.device_wish is DeviceWish.AUTO
                and run.preset.falls_back("oom") and (not worker.sent or worker.sent[0].size <= 1))

    @staticmethod
    def _lower_ceiling(worker: Worker, n: int) -> None:
        """Before its runs let go of the worker, so that no batch that big goes out again."""
        batcher = worker.batcher
        if batcher is not None and batcher.ceiling > n // 2:
            batcher.oom(n)
            log.warning("worker %s ran out of memory on a batch of %d; its batches are now "
                        "at most %d", worker.id, n, batcher.ceiling)

    # -- 4. end and store ------------------------------------------------------------------------

    def _settle(self, run: TaskRun) -> bool:
        """End the run on its worker: released and done in one step, then the worker takes
        its next batch or, holding nothing more, is freed. False if it had ended already.

        Freeing comes before storing the outcome, so the worker gets its next batch, when the
        node holds one, before the node spends its time storing and answering this one,
        which the worker would otherwise idle through."""
        worker = self.workers.get(run.worker_id)
        if worker is None or not worker.release(run):
            return False
        if not worker.sent or self._batch_ended(worker):
            self._feed(worker)  # a batch ended (or none runs): the next one may go out now
        if worker.runs:
            self.arm_watchdog(worker)  # the next task it owes gets its own clock
            return True
        worker.disarm_watchdog()
        worker.close_next()
        if worker.take_cpu_slot():
            self.listener.cpu_slot_freed(worker.id)
        if worker.session and worker.state is WorkerState.BUSY:
            worker.proc.state = WorkerState.READY
        if worker.preempted:
            self._stop(worker)  # drained: its batch is done
        self.on_freed()
        return True

    def _batch_ended(self, worker: Worker) -> bool:
        """Sent batches with nothing owed are done (True if one was); the batcher learns each
        one's latency, from when the worker could start it."""
        sent = worker.sent
        now = self._clock()
        ended = False
        while sent and not sent[0].owed:
            ended = True
            done = sent.popleft()
            if worker.batcher is not None and done.started is not None:
                worker.batcher.observe(done.items, now - done.started, done.size, full=done.full)
                self.measures.batch(worker.preset_name, worker.device.kind, done.size,
                                    now - done.started, full=done.full)
            if sent:
                sent[0].started = now
                self._time_next_batch(worker)
        return ended

    async def end(self, run: TaskRun, state: TaskState, *, output: object = None,
                  error: dict[str, object] | None = None,
                  events: list[NewEvent] | None = None) -> None:
        """Write a run's final state once and give its worker back its capacity."""
        if run.cancelled or not self._settle(run):
            return
        self.resolved(run, state, error)
        await self.outcomes.finish_many([Finish(run.id, run.token, state, output=output,
                                                error=error, events=events or [])])

    def requeue_unsent(self, worker: Worker, kind: str, *, everything: bool = False) -> None:
        """What the worker was never sent (its next batch, or a batch still forming; with
        ``everything``, all it holds: a worker still booting) ends now and goes back to the
        queue."""
        unsent = worker.take_next()
        if worker.forming is not None or everything:  # all it holds was never sent
            worker.stop_forming()
            unsent = list(worker.runs.values())
        runs = self._settle_unsent(unsent)
        if runs:
            self._spawn(self.outcomes.requeue_unspent(runs, {"kind": kind}))

    def device_lost(self, worker: Worker) -> None:
        """The worker's GPU was lost (the supervisor kills it): every run it holds, sent or
        not, ends now and goes back to a queue unspent (OutcomeWriter.device_lost)."""
        worker.stop_forming()
        worker.sent.clear()  # settled below without a batch time: none of them finished
        runs = [r for r in list(worker.runs.values()) if self._settle(r) and not r.cancelled]
        self._spawn(self.outcomes.device_lost(runs, worker.device.name, worker.id))

    def _settle_unsent(self, runs: Iterable[TaskRun]) -> list[tuple[str, int]]:
        """Settle runs never sent; the (task id, token) of those that go back (not cancelled)."""
        return [(r.id, r.token) for r in runs if self._settle(r) and not r.cancelled]

    async def return_claimed(self, tasks: list[Task]) -> None:
        """Tasks claimed for a worker gone or stopping meanwhile: back unspent (never run)."""
        await self.outcomes.requeue_unspent([(t.id, t.token) for t in tasks],
                                  {"kind": ErrorKind.WORKER_DIED.value})

    async def attempt_failed(self, run: TaskRun, kind: str, message: str) -> None:
        """An attempt ended through no fault of its input: retry it while attempts remain."""
        if run.done or run.cancelled:
            return
        attempt = run.task.attempts  # this one included
        if kind in RETRYABLE_KINDS and attempt < run.preset.max_attempts:
            if not self._settle(run):
                return
            await self.outcomes.retry(run.id, run.token, task_error(
                kind, message, attempt=attempt), NewEvent(EventType.ERROR.value, {
                    "kind": kind, "message": message, "attempt": attempt, "retrying": True}))
            return
        await self.end(run, TaskState.FAILED, error=task_error(
            kind, message, attempts=attempt))

    async def worker_gone(self, worker: Worker, *, closing: bool) -> None:
        """The worker exited: end what it held (the supervisor then drops the worker). Every
        run is settled before anything is stored, so a failing store loses outcomes (the
        claim-TTL reaper requeues them) but never keeps a run held."""
        proc = worker.proc
        rc = proc.returncode
        runs = list(worker.runs.values())
        if not worker.session and runs and rc == 0:
            # A plain-protocol one-off that exits cleanly without a finish line succeeded.
            run = runs[0]
            await self.end(run, TaskState.SUCCEEDED, output=run.final_output(),
                           events=run.held)
        elif closing or worker.preempted or worker.timed_out:
            # Not the task's fault: it runs again (node restart, preemption, or a batch-mate
            # ran past its timeout and the node killed the worker for it).
            again = [(r.id, r.token) for r in runs if not r.cancelled and self._settle(r)]
            kind = "node_stopping" if closing else "preempted" if worker.preempted \
                else "worker_killed"
            await self.outcomes.requeue_unspent(again, {"kind": kind})
        elif not worker.session:
            await self._crashed(worker, runs, f"worker {worker.id} exited with code {rc} while "
                                              f"running the task")
        else:
            await self._session_crashed(worker, runs)

    async def _session_crashed(self, worker: Worker, runs: list[TaskRun]) -> None:
        """A session worker died on its own (see runtime/poison.py). The tasks of the batch it
        was running are suspects: more than one go back unspent and the preset's batches
        halve; a single one spends its attempt. What it was sent but had not started, its
        next batch and a batch still forming go back unspent (never run); what it held while
        it booted spends an attempt, as a start failure."""
        proc = worker.proc
        died = f"worker {worker.id} exited with code {proc.returncode}"
        owed = set(worker.sent[0].owed) if worker.sent else set()
        ran = [r for r in runs if r.id in owed]
        never_ran = [r for r in runs if r.id not in owed]
        # Dead while it booted: nothing was sent, and what it held spends an attempt.
        unsent, booting = (never_ran, []) if proc.started else ([], never_ran)
        returned = self._settle_unsent(unsent)  # settled before any store call
        ceiling = self.crash_ceiling(worker.preset_name)
        if len(owed) > 1:
            # One in many crashed batches (its suspicion lapsed between them) spends anyway.
            worn = [r for r in ran if ceiling.worn(r.id) and not r.cancelled]
            again = [(r.id, r.token) for r in ran
                     if r not in worn and self._settle(r) and not r.cancelled]
            cap = ceiling.crashed([*(r.id for r in worn), *(t for t, _ in again)], len(owed))
            booting = worn + booting
            log.warning("%s owing %d tasks of its batch: they run again in batches of at most "
                        "%d to find the input that crashes it", died, len(owed), cap)
            await self.outcomes.requeue_unspent(again, {
                "kind": ErrorKind.WORKER_DIED.value, "batch_size": len(owed),
                "message": f"{died} while running a batch of {len(owed)}: runs again in a "
                           f"batch of at most {cap}, no attempt spent"})
        else:  # it stands alone: it spends its attempt, and retries alone (cap 1)
            alone = [r.id for r in ran if not r.cancelled]
            if alone:
                ceiling.crashed(alone, 1)
            booting = ran + booting
        await self._crashed(worker, booting, f"{died} while running the task")
        if returned:
            await self.outcomes.requeue_unspent(returned, {
                "kind": ErrorKind.WORKER_DIED.value,
                "message": f"{died} before it started the task"})

    async def _crashed(self, worker: Worker, runs: list[TaskRun], message: str) -> None:
        """Each run spends its attempt on the worker's death (retried while attempts remain),
        with the worker's last stderr lines in its error."""
        tail = worker.proc.stderr_text()
        for run in runs:
            await self.attempt_failed(run, ErrorKind.WORKER_DIED.value,
                                      f"{message}; last stderr lines:\n{tail or '(none)'}")

    # -- the watchdog ----------------------------------------------------------------------------

    def arm_watchdog(self, worker: Worker) -> None:
        """(Re)start the worker's clock on the oldest task it still owes.

        Workers may run a batch item by item, so each task's timeout_s counts from the moment
        the worker could start it: when the batch was sent, or when the task before it ended.
        A worker that makes no progress for that long is stuck and gets killed.
        """
        worker.disarm_watchdog()
        if not worker.runs:
            return
        oldest = next(iter(worker.runs.values()))
        worker.watchdog = asyncio.get_running_loop().call_later(
            oldest.timeout_s, self._on_timeout, oldest, worker)

    def _on_timeout(self, run: TaskRun, worker: Worker) -> None:
        worker.watchdog = None
        # Once killed for one task, the rest of its batch goes back to the queue on its exit:
        # a clock re-armed for the next task must not fail that one as well meanwhile.
        if not run.done and not worker.timed_out:
            self._spawn(self._timeout(run, worker))

    async def _timeout(self, run: TaskRun, worker: Worker) -> None:
        # Killing is the only sure way to stop the work; the batch's other tasks are retried.
        # Out of the pool first, so that nothing new is handed to a worker about to die.
        worker.proc.state = WorkerState.STOPPING
        worker.timed_out = True
        if run.cancelled:  # it never let go of a cancelled task
            worker.proc.kill()
            return
        await self.end(run, TaskState.FAILED, error=task_error(
            ErrorKind.TIMEOUT, f"the task ran past its timeout_s={run.timeout_s:g}; "
            f"worker {worker.id} was killed (raise timeout_s in the request or the preset)"),
            events=run.held)
        worker.proc.kill()

