"""The Fleet protocol: what nodes sharing one store know of each other.

A node registers itself (its devices, what it has warm, whether it drains) with a heartbeat
TTL; any node reads the live ones. Nodes call each other by name (``call``: a request and its
answer, carried by the fleet's backend), so a request that reaches node A for node B's GPU is
served by B. Leases live in the fleet's lease book, so a restarted node and every other node
see them, and their events can be followed from any node.

Backends: ``local.py`` (one node, in this process: the SQLite default) and ``redis.py`` (many
nodes on one Redis). ``factory.py`` picks one for a store URL. This module imports no backend.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

Handler = Callable[[str, dict[str, Any]], Awaitable[dict[str, Any]]]
"""Serves a call to this node: (op, payload) -> answer. A RequestError it raises reaches the
caller's node as the same RequestError (status, code, message, field, extra)."""


@dataclass(frozen=True, slots=True)
class NodeInfo:
    """One node as the fleet sees it: what it registered at its last heartbeat."""

    name: str
    url: str | None
    """Its API as other hosts reach it (``--advertise-url``), when known."""
    started_at: float
    heartbeat_at: float
    draining: bool = False
    devices: list[dict[str, Any]] = field(default_factory=list)
    """Its GPUs: DeviceSnapshot.to_json() plus ``schedulable_free_vram_mb`` from its ledger."""
    cpu: dict[str, Any] = field(default_factory=dict)
    warm: list[str] = field(default_factory=list)
    """``preset/lane`` of each idle session worker it has: it should get that work first."""
    running: int = 0
    """Tasks it runs now."""
    simulated: bool = False
    serving: dict[str, int] = field(default_factory=dict)
    """``preset/lane`` -> its live session workers there (busy or idle): the nodes that
    drain a queue of the fleet, which each weighs only its share of (scheduling/scaling.py)."""

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "url": self.url, "started_at": self.started_at,
                "heartbeat_at": self.heartbeat_at, "draining": self.draining,
                "devices": self.devices, "cpu": self.cpu, "warm": self.warm,
                "running": self.running, "simulated": self.simulated,
                "serving": self.serving}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> NodeInfo:
        return cls(name=d["name"], url=d.get("url"), started_at=d["started_at"],
                   heartbeat_at=d["heartbeat_at"], draining=bool(d.get("draining")),
                   devices=list(d.get("devices", [])), cpu=dict(d.get("cpu", {})),
                   warm=list(d.get("warm", [])), running=int(d.get("running", 0)),
                   simulated=bool(d.get("simulated")),
                   serving={str(k): int(v) for k, v in dict(d.get("serving", {})).items()})


class Fleet(Protocol):
    """What a node needs to know of, and say to, the other nodes. ``name`` is this node."""

    name: str
    shared: bool
    """True when other nodes may share this fleet (Redis): only then may a node that holds
    running work but is not registered be taken for dead and its work taken over."""

    async def open(self) -> None: ...
    async def close(self) -> None: ...

    # -- the node registry -------------------------------------------------------------------

    async def register(self, info: NodeInfo, ttl_s: float) -> None:
        """Say this node is alive (the first call and every heartbeat): the entry expires
        ``ttl_s`` after the last call unless refreshed."""

    async def deregister(self) -> None:
        """Leave the fleet now (a clean stop), instead of after the TTL."""

    async def nodes(self) -> list[NodeInfo]:
        """Every live node, this one included, by name."""

    # -- calls between nodes ------------------------------------------------------------------

    def serve(self, handler: Handler) -> None:
        """Serve calls made to this node with ``handler`` (from open() until close())."""

    async def call(self, node: str, op: str, payload: dict[str, Any],
                   timeout_s: float) -> dict[str, Any]:
        """Ask ``node`` to do ``op``; its handler's answer. A call to this node runs the
        handler directly. NotFoundError (unknown_node) for a node not in the registry;
        UnavailableError (node_unreachable, 503) when it gave no answer within timeout_s."""

    # -- the lease book -----------------------------------------------------------------------

    async def save_lease(self, lease: dict[str, Any], events: list[dict[str, Any]],
                         keep_s: float | None = None) -> None:
        """Write a lease as it stands (``lease["id"]``, ``lease["node"]``: the node whose
        devices it is on, ``lease["state"]``) with the events it gained since the last save,
        in one step. ``keep_s``: the lease ended, keep it readable this long, then drop it."""

    async def lease(self, lease_id: str) -> dict[str, Any] | None:
        """A lease as last saved, by any node; None when unknown or dropped."""

    async def leases(self, node: str | None = None) -> list[dict[str, Any]]:
        """Live (not ended) leases, of one node or of all, oldest first."""

    async def lease_events(self, lease_id: str, after: int = 0) -> list[dict[str, Any]]:
        """A lease's events after number ``after`` (each ``{"id": n, "event": ..., ...}``)."""

    def follow_lease(self, lease_id: str, after: int, quiet_s: float
                     ) -> AsyncIterator[list[dict[str, Any]]]:
        """A lease's events after ``after`` in batches as they land (saved by any node), an
        empty batch after ``quiet_s`` without one; ends when the lease is unknown."""
