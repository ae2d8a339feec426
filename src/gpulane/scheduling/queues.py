"""The queues a node's scheduler looks at, worked out once per registry instead of per pass.

A queue is (preset, lane). Every pass used to list them from the registry, and every pass
now also asks which of them this node can ever serve (``served``: for scheduling/quiet.py);
both change only when the presets are reloaded (a new registry) or the GPUs change.
"""

from __future__ import annotations

from collections.abc import Callable

from gpulane.presets import Preset, PresetRegistry
from gpulane.scheduling.ledger import Ledger
from gpulane.scheduling.quiet import Lane
from gpulane.scheduling.router import CPU_LANE, GPU_LANE

Queue = tuple[str, str, Preset]
"""A queue with its preset: (preset name, lane, preset)."""


class Queues:
    """The registry's queues, and those of them this node may serve."""

    def __init__(self, registry: Callable[[], PresetRegistry], ledger: Ledger) -> None:
        self.registry = registry
        self.ledger = ledger
        self._all: tuple[object, int, list[Queue]] = (None, 0, [])
        self._served: tuple[object, int, frozenset[Lane]] = (None, -1, frozenset())

    def all(self) -> list[Queue]:
        """Every queue of the registry's presets (GPU first, then CPU, per preset)."""
        registry = self.registry()
        of, size, out = self._all
        if of is registry and size == len(registry):
            return out
        out = []
        for p in registry.values():
            if p.allows_gpu:
                out.append((p.name, GPU_LANE, p))
            if p.allows_cpu:
                out.append((p.name, CPU_LANE, p))
        self._all = (registry, len(registry), out)
        return out

    def served(self) -> frozenset[Lane]:
        """The queues this node may serve: GPU work without GPUs, or needing more GPUs than
        the node has, is other nodes'."""
        queues, gpus = self.all(), len(self.ledger.gpus)
        of, n, found = self._served
        if of is not queues or n != gpus:
            found = frozenset((name, lane) for name, lane, p in queues
                              if lane != GPU_LANE or (gpus and self.max_workers(p, lane)))
            self._served = (queues, gpus, found)
        return found

    def max_workers(self, preset: Preset, lane: str) -> int:
        """How many session workers of ``preset`` this node may run on ``lane``."""
        if lane == CPU_LANE:
            return preset.replicas
        if preset.gpus > 1:  # each worker holds gpus whole devices: replicas cannot share
            return len(self.ledger.gpus) // preset.gpus
        return preset.replicas * max(len(self.ledger.gpus), 1)
