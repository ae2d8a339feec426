"""What a node shows of its devices and presets: the bodies of ``GET /v1/gpus`` and
``GET /v1/presets``, built from the ledger, the device readings and the supervisor."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from gpulane.devices import DeviceSnapshot
from gpulane.fleet import NodeInfo
from gpulane.presets import PresetRegistry
from gpulane.runtime.circuit import PresetCircuit
from gpulane.scheduling.ledger import Ledger

ENV_HIDDEN = "(hidden)"
"""What the presets view shows for the value of each of a preset's ``env`` variables."""


def presets_view(registry: PresetRegistry,
                 circuits: dict[tuple[str, str], PresetCircuit]) -> list[dict[str, Any]]:
    """Every preset with the state of its start circuits, one per lane it may run in
    (closed when it never tripped), and under ``circuit`` the one most in trouble. Its
    ``env`` shows names only: a worker's credentials live there, and any key may read it."""
    out = []
    for p in registry.values():
        lanes = {d.value: (circuits.get((p.name, d.value)) or PresetCircuit()).to_json()
                 for d in p.devices}
        worst = max(lanes.values(), key=lambda c: (c["state"] != "closed",
                                                   c["start_failures"]))
        out.append({**p.to_json(), "env": dict.fromkeys(p.env, ENV_HIDDEN),
                    "circuit": worst, "circuits": lanes})
    return out


def devices_view(gpus: Sequence[DeviceSnapshot], ledger: Ledger) -> list[dict[str, Any]]:
    """Each GPU's reading with what the ledger declared and can still place on it."""
    devices = []
    for snap in gpus:
        acct = ledger.gpus.get(snap.index)
        d = snap.to_json()
        if acct is not None:
            d["declared_vram_mb"] = acct.declared_mb
            d["schedulable_free_vram_mb"] = acct.free_mb
            d["holders"] = [{"holder": h.holder, "vram_mb": h.vram_mb}
                            for h in acct.holdings.values()]
        devices.append(d)
    return devices


def fleet_nodes_view(nodes: Sequence[NodeInfo]) -> list[dict[str, Any]]:
    """The ``nodes`` of the fleet-wide ``GET /v1/gpus``: each live node's devices, CPU pool,
    what it has warm and what it runs, by name."""
    return [{"name": n.name, "url": n.url, "draining": n.draining, "simulated": n.simulated,
             "devices": n.devices, "cpu": n.cpu, "warm": n.warm, "running": n.running}
            for n in sorted(nodes, key=lambda n: n.name)]
