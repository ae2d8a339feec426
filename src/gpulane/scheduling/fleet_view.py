"""What this node knows of the other live nodes: a cache of the fleet's registry.

Refreshed by the node on its device poll (``refresh``), read on the hot paths without a store
round trip: the router asks for the other nodes' GPU totals (a GPU task goes to another node's
GPU before it falls back to a CPU) and the scheduler asks whether another node has a preset
warm (``warm_elsewhere``: that node gets the first claim for a short window). A node alone, or
one on the SQLite store, sees an empty fleet here: both answers then cost nothing.
"""

from __future__ import annotations

import time

from gpulane.fleet import Fleet, NodeInfo


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
        """Each other node's GPU VRAM totals (MB), for the router; draining nodes left out."""
        return [[int(d.get("total_vram_mb", 0)) for d in n.devices]
                for n in self.others if not n.draining and n.devices]

    def warm_elsewhere(self, preset: str, lane: str) -> bool:
        """Whether another live node (not draining) has an idle worker of ``preset`` on
        ``lane``."""
        key = f"{preset}/{lane}"
        return any(key in n.warm for n in self.others if not n.draining)
