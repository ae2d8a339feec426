"""Group commit: submits that arrive together are written in one store call.

A node under many clients (threads, connections) gets single ``POST /v1/tasks`` calls side by
side; each written alone costs a transaction (SQLite: BEGIN, the inserts, COMMIT, about
0.11 ms a task) or a round trip (Redis). :class:`SubmitGroups` gathers the submits made within
one turn of the event loop and writes them with one call of the store's own write (SQLite:
about 0.04 ms a task). The write is scheduled on the loop's ready queue (``create_task``),
never a timer: a lone submit is written on the very next turn, and what came in the same turn
joins it.

Nothing is answered before its group is written: each submitter awaits its own future, which
the write resolves after the store's commit. A write that fails fails every submit of the
group with the store's error, as it would have failed each alone. One exception: a submit whose
idempotency key was used with another body makes the write refuse the whole group
(ConflictError, nothing written); the group is then written one call at a time, so that only
that call gets the 409, as it would have alone.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence

from gpulane.errors import ConflictError
from gpulane.model import Task, TaskSpec

GROUP_MAX = 1_000
"""Most tasks a group gathers before it is closed: a busier turn is written in several groups,
each one transaction that stays in the milliseconds (a bigger bulk is a group of its own)."""

Write = Callable[[Sequence[TaskSpec]], Awaitable[list[tuple[Task, bool]]]]
"""A store's own write of many submits: all or none, answers in the order given."""

Waiting = tuple[Sequence[TaskSpec], "asyncio.Future[list[tuple[Task, bool]]]"]
"""One call's specs and the future its caller awaits."""


class SubmitGroups:
    """One store's submit calls, written in groups (see the module docstring).

    A call is a list of specs, all or none (a bulk, or a single submit as a list of one): a
    group writes the calls of one turn together, and answers each its own part. Grouping
    calls rather than single specs lets a store that wraps this one (the online lane's
    tiered store) pass its single submits on as lists and have them grouped all the same.
    """

    def __init__(self, write: Write) -> None:
        self._write = write
        self._pending: list[Waiting] = []
        self._size = 0  # specs pending
        self._writers: set[asyncio.Task[None]] = set()  # referenced while they run
        self.writes = 0
        """Store writes made so far (a group, or a call retried alone): what a test or a
        benchmark compares with the submits to see the grouping."""

    async def submit(self, specs: Sequence[TaskSpec]) -> list[tuple[Task, bool]]:
        """``specs`` written, all or none, once their group is: each one's task, or the one
        its idempotency key made (created=False)."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[list[tuple[Task, bool]]] = loop.create_future()
        if not self._pending or self._size + len(specs) > GROUP_MAX:
            # A new group: written on the loop's next turn, with what joins it meanwhile.
            group: list[Waiting] = []
            self._pending = group
            self._size = 0
            writer = loop.create_task(self._flush(group))
            self._writers.add(writer)
            writer.add_done_callback(self._writers.discard)
        self._pending.append((specs, fut))
        self._size += len(specs)
        return await fut

    async def _flush(self, group: list[Waiting]) -> None:
        if self._pending is group:  # closed: a submit from now on starts the next group
            self._pending = []
        try:
            await self._write_group(group)
        finally:
            for _, fut in group:  # cancelled mid-write (the loop shutting down)
                if not fut.done():
                    fut.cancel()

    async def _write_group(self, group: list[Waiting]) -> None:
        self.writes += 1
        try:
            out = await self._write([spec for specs, _ in group for spec in specs])
        except ConflictError as exc:
            if len(group) == 1:
                _fail(group[0][1], exc)
                return
            for call in group:  # nothing was written: each call alone, the 409 to its own
                await self._write_group([call])
            return
        except Exception as exc:
            for _, fut in group:
                _fail(fut, exc)
            return
        at = 0
        for specs, fut in group:
            if not fut.done():  # its caller may have gone (cancelled): nobody to tell
                fut.set_result(out[at:at + len(specs)])
            at += len(specs)


def _fail(fut: asyncio.Future[list[tuple[Task, bool]]], exc: Exception) -> None:
    if not fut.done():
        fut.set_exception(exc)
