"""A node's drain: stop claiming, let running work finish, and (to exit) hand over the rest.

``start()`` pauses the scheduler (nothing new is claimed; running batches finish) and the node
refuses submits while ``draining``. ``start(exit=True)`` then waits up to a grace for the work
it runs to finish and calls ``on_exit`` (the server's: stop the process). The stop that follows
requeues what is still running without spending attempts, ends this node's leases and leaves
the fleet (node.py). ``resume()`` takes work again, unless the drain is already exiting.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from gpulane.errors import ConflictError
from gpulane.fleet import Fleet
from gpulane.runtime.supervisor import Supervisor
from gpulane.scheduling.scheduler import Scheduler

log = logging.getLogger("gpulane.node")

CALL_TIMEOUT_S = 10.0
"""How long a node waits for another node's answer to a call (drain, resume)."""


class Drain:
    """Whether the node drains, and the wait of a drain that is to exit."""

    def __init__(self, name: str, scheduler: Scheduler, supervisor: Supervisor,
                 grace_s: float, *, fleet: Fleet | None = None,
                 status: Callable[[], Awaitable[dict[str, Any]]] | None = None) -> None:
        self.name = name
        self.scheduler = scheduler
        self.supervisor = supervisor
        self.grace_s = grace_s
        self.draining = False
        self.on_exit: Callable[[], None] | None = None
        """Set by the server: asks the process to exit (a drain with exit=True ends so)."""
        self._exiting: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()
        self.fleet = fleet
        """The fleet other nodes are reached through (a drain of another node)."""
        self.status = status
        """The node's status view: what a drain or resume answers."""

    @property
    def exiting(self) -> bool:
        return self._exiting is not None

    def capacity_changed(self) -> None:
        """Runtime freed something (a batch ended, a worker exited): look again."""
        self._changed.set()

    def start(self, *, exit: bool = False, grace_s: float | None = None) -> None:
        self.draining = True
        self.scheduler.paused = True
        log.info("draining: no new tasks are taken or started")
        if exit and self._exiting is None:
            grace = self.grace_s if grace_s is None else grace_s
            self._exiting = asyncio.create_task(self._exit_after(grace), name="gpulane-drain")

    def resume(self) -> None:
        if self._exiting is not None:
            raise ConflictError("exiting", f"node {self.name} is draining to exit: it cannot "
                                "resume; start it again instead", field="node")
        self.draining = False
        self.scheduler.paused = False
        self.scheduler.wake()
        log.info("resumed after a drain")

    async def node(self, node: str | None, op: str, payload: dict[str, Any]
                   ) -> dict[str, Any]:
        """Drain (op "drain", payload exit, grace_s) or resume ``node`` (this one when None),
        wherever in the fleet it runs; its status view."""
        if node is not None and node != self.name and self.fleet is not None:
            return await self.fleet.call(node, op, payload, CALL_TIMEOUT_S)
        return await (self.call_drain(payload) if op == "drain" else self.call_resume(payload))

    async def call_drain(self, payload: dict[str, Any]) -> dict[str, Any]:
        """Serves "drain" here (asked by this node's API or another node's)."""
        grace = payload.get("grace_s")
        self.start(exit=bool(payload.get("exit")),
                   grace_s=float(grace) if grace is not None else None)
        return await self._status()

    async def call_resume(self, payload: dict[str, Any]) -> dict[str, Any]:
        """Serves "resume" here."""
        self.resume()
        return await self._status()

    async def _status(self) -> dict[str, Any]:
        return await self.status() if self.status is not None else {"node": self.name}

    async def _exit_after(self, grace_s: float) -> None:
        deadline = time.monotonic() + grace_s
        while self.supervisor.held_runs() and (left := deadline - time.monotonic()) > 0:
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(left):
                    await self._changed.wait()
        held = len(self.supervisor.held_runs())
        log.info("drained: exiting%s", f"; {held} running task(s) go back to the queue"
                 if held else "")
        if self.on_exit is not None:
            self.on_exit()

    async def close(self) -> None:
        if self._exiting is not None and not self._exiting.done():
            self._exiting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._exiting
