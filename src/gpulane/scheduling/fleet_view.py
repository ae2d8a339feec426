"""What this node knows of the other live nodes: a cache of the fleet's registry.

Refreshed by the node on its device poll (``refresh``), read on the hot paths without a store
round trip: the router asks for the other nodes' GPU totals (a GPU task goes to another node's
GPU before it falls back to a CPU) and the scheduler asks whether another node has a preset
warm (``warm_elsewhere``: that node gets the first claim for a short window). A node alone, or
one on the SQLite store, sees an empty fleet here: both answers then cost nothing.

``describe_node`` is what this node writes to the registry at each heartbeat; ``nodes_view``
is ``GET /v1/nodes``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from gpulane.devices import DeviceSnapshot
from gpulane.fleet import Fleet, NodeInfo
from gpulane.runtime.supervisor import Supervisor
from gpulane.scheduling.ledger import Ledger


class FleetView:
    """The other live nodes as last read from the fleet's registry."""

    def __init__(self, fleet: Fleet | None, name: str) -> None:
        self.fleet = fleet
        self.name = name
        self.others: list[NodeInfo] = []
        self.read_at = 0.0
        """time.time() of the last successful read (0: never)."""

    async def refresh(self) -> list[NodeInfo]:
        """Read the registry; every live node, this one included. Raises what the fleet
        raises (an unreachable store): the cache then keeps its last reading."""
        if self.fleet is None:
            return []
        nodes = await self.fleet.nodes()
        self.others = [n for n in nodes if n.name != self.name]
        self.read_at = time.time()
        return nodes

    def gpu_totals(self) -> list[list[int]]:
        """Each other node's GPU VRAM totals (MB), for the router; draining nodes and lost
        GPUs (health "lost" in the node's entry) left out, so work is not sent to wait there."""
        totals = [[int(d.get("total_vram_mb", 0)) for d in n.devices
                   if d.get("health", "ok") != "lost"]
                  for n in self.others if not n.draining]
        return [t for t in totals if t]

    def others_take_work(self) -> bool:
        """Whether another live node takes work (is not draining): then a draining node may
        still queue submits, since the queue is the fleet's and another node will run them."""
        return any(not n.draining for n in self.others)

    def serving_elsewhere(self, preset: str, lane: str) -> int:
        """Live session workers of ``preset`` on ``lane`` that other live nodes (not
        draining) registered: they drain the same fleet-wide queue as this node's."""
        key = f"{preset}/{lane}"
        return sum(n.serving.get(key, 0) for n in self.others if not n.draining)

    def warm_elsewhere(self, preset: str, lane: str) -> bool:
        """Whether another live node (not draining) has an idle worker of ``preset`` on
        ``lane``."""
        key = f"{preset}/{lane}"
        return any(key in n.warm for n in self.others if not n.draining)


def describe_node(name: str, url: str | None, started_at: float, *, draining: bool,
                  gpus: Sequence[DeviceSnapshot], ledger: Ledger, cpu: dict[str, Any],
                  supervisor: Supervisor, simulated: bool) -> NodeInfo:
    """This node as the fleet's registry holds it (written at each heartbeat): its GPUs with
    the VRAM its ledger can still place, its CPU pool, the ``preset/lane`` of each idle
    session worker (warm: that work should come here first) and how many tasks it runs."""
    devices = []
    for snap in gpus:
        d = snap.to_json()
        acct = ledger.gpus.get(snap.index)
        if acct is not None:
            d["schedulable_free_vram_mb"] = acct.free_mb
        devices.append(d)
    warm = sorted({f"{w.preset_name}/{w.device.kind}" for w in supervisor.workers.values()
                   if w.session and w.alive and w.idle})
    serving: dict[str, int] = {}
    for w in supervisor.workers.values():
        if w.session and w.alive:
            key = f"{w.preset_name}/{w.device.kind}"
            serving[key] = serving.get(key, 0) + 1
    return NodeInfo(name=name, url=url, started_at=started_at, heartbeat_at=time.time(),
                    draining=draining, devices=devices,
                    cpu={**cpu, "in_use": ledger.cpu_used}, warm=warm,
                    running=len(supervisor.held_runs()), simulated=simulated,
                    serving=serving)


def nodes_view(nodes: Sequence[NodeInfo], now: float | None = None) -> list[dict[str, Any]]:
    """Every live node for ``GET /v1/nodes``: its registry entry and its heartbeat's age."""
    now = time.time() if now is None else now
    return [{**n.to_json(), "heartbeat_age_s": round(max(0.0, now - n.heartbeat_at), 3)}
            for n in sorted(nodes, key=lambda n: n.name)]
