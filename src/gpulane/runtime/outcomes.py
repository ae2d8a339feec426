"""What the runtime writes to the store about task runs, written so that a store fault never
wedges a worker.

Every write here happens after its run has let go of its worker (see runtime/pipeline.py), and
none of them raises: a store that fails loses what was being written, logged once with the task
ids, and the run is forgotten all the same. Nothing is held in memory for a later try: a task
whose outcome or requeue was lost stays ``running`` in the store with nobody heartbeating it,
and the claim-TTL reaper puts it back in the queue. Execution is at least once; the fencing
token keeps the recorded outcome exactly once.

A ``StaleTokenError`` is no fault: the attempt was ended elsewhere (cancelled, reaped), and the
store was right to refuse.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from gpulane.errors import StaleTokenError
from gpulane.protocol import EventType
from gpulane.runtime.taskrun import TaskRun
from gpulane.runtime.view import RuntimeListener
from gpulane.store import Finish, NewEvent, Store

log = logging.getLogger("gpulane.supervisor")

LOGGED_IDS = 20
"""At most this many task ids in one log line: a big batch's ids do not flood the log."""


def ids(task_ids: Iterable[str]) -> str:
    """Task ids for a log line, bounded by LOGGED_IDS."""
    listed = list(task_ids)
    shown = ", ".join(listed[:LOGGED_IDS])
    extra = len(listed) - LOGGED_IDS
    return shown if extra <= 0 else f"{shown} and {extra} more"


class OutcomeWriter:
    """Writes runs' events, outcomes and requeues; logs a failing store, never raises it."""

    def __init__(self, store: Store, listener: RuntimeListener) -> None:
        self.store = store
        self.listener = listener

    async def append(self, run: TaskRun, event: NewEvent) -> None:
        """Store a streamed event. A failing store loses the event, not the run: its finish
        still settles it (logged once per run, not once per event)."""
        try:
            await self.store.append_events(run.id, [event])
        except StaleTokenError:
            pass  # the attempt was ended elsewhere (cancelled, reaped): its events are moot
        except Exception:
            if not run.store_failed:
                run.store_failed = True
                log.exception("storing a %s event of task %s failed; later ones may be lost "
                              "too", event.type, run.id)

    async def finish_many(self, ends: list[Finish]) -> None:
        """Write final states in one transaction; lost ones run again once their claim
        expires."""
        try:
            results = await self.store.finish_many(ends)
        except Exception:
            log.exception("storing the outcomes of tasks %s failed; they run again once their "
                          "claim expires", ids(e.task_id for e in ends))
            return
        for got in results:
            if isinstance(got, StaleTokenError):
                log.info("dropped the outcome of a stale attempt: %s", got)

    async def requeue_unspent(self, attempts: list[tuple[str, int]],
                              event: dict[str, object]) -> None:
        """Put settled attempts (task id, token) back in the queue without holding them
        against max_attempts, each with an ``error`` event saying why; then the scheduler
        looks again. One log line names those a failing store did not take."""
        failed: list[str] = []
        first: Exception | None = None
        for task_id, token in attempts:
            try:
                await self.store.requeue(task_id, token, None, events=[NewEvent(
                    EventType.ERROR.value, {**event, "retrying": True})], spent=False)
            except StaleTokenError:
                pass  # ended elsewhere (cancelled, reaped): nothing left to put back
            except Exception as exc:
                first = first or exc
                failed.append(task_id)
        if first is not None:
            log.error("tasks %s could not go back to the queue (%s); they do once their claim "
                      "expires", ids(failed), event.get("kind"), exc_info=first)
        self.listener.capacity_changed()

    async def retry(self, task_id: str, token: int, error: dict[str, object],
                    event: NewEvent) -> None:
        """Put a settled attempt back in the queue with its attempt spent."""
        try:
            await self.store.requeue(task_id, token, error, events=[event])
        except StaleTokenError as exc:
            log.info("dropped a retry of a stale attempt: %s", exc)
        except Exception:
            log.exception("requeueing task %s for a retry failed; it goes back once its claim "
                          "expires", task_id)
        self.listener.capacity_changed()
