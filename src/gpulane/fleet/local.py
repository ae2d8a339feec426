"""The fleet of one node, in this process: what a node on the SQLite store (the default) uses.

The registry holds this node only (it expires after its TTL like any other, so a node that
stopped heartbeating reads as gone here too); a call to this node runs its handler directly
and a call to any other name is ``unknown_node``; the lease book is a dict of leases and a
list of events per lease, in memory, with ``follow_lease`` woken by a
:class:`~gpulane.notify.Notifier`.

Both backends fence the book the same way: an ended lease is never saved back to life, and
one that another node ended (``ended_by``) keeps that end (``fenced``).

An ended lease (saved with ``keep_s``) stays readable ``keep_s`` seconds, then is dropped; at
most ``ENDED_MAX`` ended leases are kept (the oldest-to-expire go first), so the book holds
only live leases plus a bounded tail. ``shared`` is False: no other node can be seen, so the
housekeeper never takes a node's work over on this fleet's word.
"""

from __future__ import annotations

import asyncio
import copy
import heapq
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from gpulane.errors import ConflictError, NotFoundError, UnavailableError
from gpulane.fleet.base import Handler, NodeInfo
from gpulane.notify import Notifier

ENDED_MAX = 10_000
"""Ended leases kept readable at most (each for its ``keep_s``): the book's bound."""
ENDED_STATES = ("released", "expired", "revoked", "timed_out")
"""A lease in one of these states has ended for good: no save brings it back."""


def unknown_node(node: str) -> NotFoundError:
    """The error of a call to a node that is not in the registry (shared by the backends)."""
    return NotFoundError("unknown_node", f"node {node!r} is not in the fleet (not registered, "
                         "or its heartbeat lapsed): ask GET /v1/nodes for the live ones",
                         field="node")


def fenced(lease_id: str) -> ConflictError:
    """The error of a save that would bring back a lease the book has ended (shared by the
    backends): a node taken for dead while it lived saves a lease that another node ended
    ``expired`` (``node_lost``). The book keeps the end; the saving node must end it too."""
    return ConflictError("lease_ended", f"lease {lease_id} has ended in the fleet's lease book "
                         "(another node took its node for dead): acquire a new lease",
                         field="id")


def ended(stored: dict[str, Any] | None, keep_s: float | None) -> bool:
    """Whether a save over ``stored`` must be refused (``fenced``): it is ended, and the save
    would bring it back (``keep_s`` None) or it was ended by another node (``ended_by``)."""
    return (stored is not None and stored.get("state") in ENDED_STATES
            and (keep_s is None or bool(stored.get("ended_by"))))


def unreachable(node: str, why: str) -> UnavailableError:
    """The error of a call that got no answer (shared by the backends): 503, retry later."""
    return UnavailableError("node_unreachable", f"node {node!r} {why}; retry later",
                            field="node", headers={"Retry-After": "1"})


async def run_handler(node: str, handler: Handler | None, op: str, payload: dict[str, Any],
                      timeout_s: float, running: set[asyncio.Task[dict[str, Any]]]
                      ) -> dict[str, Any]:
    """Run this node's handler for a call to itself, answering within ``timeout_s``.

    A handler slower than that is not cancelled (a call to another node is not either: its
    node finishes it and the answer expires unread); the caller gets ``node_unreachable``.
    ``running`` keeps such a task referenced until it ends."""
    if handler is None:
        raise unreachable(node, "serves no calls (not started, or stopping)")
    task = asyncio.ensure_future(handler(op, payload))
    running.add(task)
    task.add_done_callback(running.discard)
    try:
        return await asyncio.wait_for(asyncio.shield(task), timeout_s)
    except TimeoutError:
        raise unreachable(node, f"gave no answer to {op!r} within {timeout_s:g} s") from None


class LocalFleet:
    """A fleet of this node alone (see the module docstring)."""

    shared = False
    """No other node shares this fleet: an unregistered node's work is not ours to judge."""

    def __init__(self, name: str, *, ended_max: int = ENDED_MAX) -> None:
        self.name = name
        self.ended_max = ended_max
        self.clock: Callable[[], float] = time.time
        """The clock TTLs count on (a test may set its own)."""
        self._info: NodeInfo | None = None
        self._expires_at = 0.0
        self._handler: Handler | None = None
        self._calls: set[asyncio.Task[dict[str, Any]]] = set()
        self._leases: dict[str, dict[str, Any]] = {}
        self._events: dict[str, list[dict[str, Any]]] = {}
        self._ended: dict[str, float] = {}
        """Ended lease id -> when it is dropped."""
        self._drops: list[tuple[float, str]] = []
        """A heap of (drop time, lease id); an entry whose time no longer matches is stale."""
        self.notifier = Notifier()

    async def open(self) -> None:
        return None

    async def close(self) -> None:
        self._handler = None

    # -- the node registry ---------------------------------------------------------------------

    async def register(self, info: NodeInfo, ttl_s: float) -> None:
        self._info = info
        self._expires_at = self.clock() + ttl_s

    async def deregister(self) -> None:
        self._info = None

    async def nodes(self) -> list[NodeInfo]:
        if self._info is None or self.clock() >= self._expires_at:
            return []
        return [self._info]

    # -- calls ---------------------------------------------------------------------------------

    def serve(self, handler: Handler) -> None:
        self._handler = handler

    async def call(self, node: str, op: str, payload: dict[str, Any],
                   timeout_s: float) -> dict[str, Any]:
        if node != self.name:
            raise unknown_node(node)
        return await run_handler(node, self._handler, op, payload, timeout_s, self._calls)

    # -- the lease book ------------------------------------------------------------------------

    async def save_lease(self, lease: dict[str, Any], events: list[dict[str, Any]],
                         keep_s: float | None = None) -> None:
        self._expire()
        lease_id = str(lease["id"])
        if ended(self._leases.get(lease_id), keep_s):
            raise fenced(lease_id)
        self._leases[lease_id] = copy.deepcopy(lease)
        log = self._events.setdefault(lease_id, [])
        last = log[-1]["id"] if log else 0
        log.extend(copy.deepcopy(e) for e in events if e["id"] > last)  # a re-save adds none
        if keep_s is None:
            self._ended.pop(lease_id, None)
        else:
            at = self.clock() + keep_s
            self._ended[lease_id] = at
            heapq.heappush(self._drops, (at, lease_id))
            while len(self._ended) > self.ended_max:
                self._drop_next()
        self.notifier.notify(lease_id)

    async def lease(self, lease_id: str) -> dict[str, Any] | None:
        self._expire()
        found = self._leases.get(lease_id)
        return copy.deepcopy(found) if found is not None else None

    async def leases(self, node: str | None = None) -> list[dict[str, Any]]:
        self._expire()
        return [copy.deepcopy(v) for k, v in self._leases.items()  # dict order: oldest first
                if k not in self._ended and (node is None or v.get("node") == node)]

    async def lease_events(self, lease_id: str, after: int = 0) -> list[dict[str, Any]]:
        self._expire()
        return [copy.deepcopy(e) for e in self._events.get(lease_id, ()) if e["id"] > after]

    async def follow_lease(self, lease_id: str, after: int, quiet_s: float
                           ) -> AsyncIterator[list[dict[str, Any]]]:
        while True:
            seen = self.notifier.version(lease_id)
            if await self.lease(lease_id) is None:
                return
            batch = await self.lease_events(lease_id, after)
            if batch:
                after = batch[-1]["id"]
                yield batch
            elif not await self.notifier.wait(lease_id, seen, quiet_s):
                yield []

    def _expire(self) -> None:
        """Drop the ended leases whose ``keep_s`` has passed."""
        now = self.clock()
        while self._drops and self._drops[0][0] <= now:
            self._drop_next()

    def _drop_next(self) -> None:
        at, lease_id = heapq.heappop(self._drops)
        if self._ended.get(lease_id) != at:
            return  # saved again since: a later entry stands for it
        del self._ended[lease_id]
        self._leases.pop(lease_id, None)
        self._events.pop(lease_id, None)
        self.notifier.notify(lease_id)  # a follower wakes, finds it gone, and ends
        self.notifier.forget(lease_id)

    def view(self) -> dict[str, Any]:
        """What the book holds in memory, for the node's status view."""
        return {"backend": "local", "leases": len(self._leases), "ended": len(self._ended),
                "notifier_keys": len(self.notifier)}
