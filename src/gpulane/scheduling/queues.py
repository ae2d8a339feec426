"""The queues a node's scheduler looks at, worked out once per registry instead of per pass.

A queue is (preset, lane). Every pass used to list them from the registry, and every pass
now also asks which of them this node can ever serve (``served``: for scheduling/quiet.py);
both change only when the presets are reloaded (a new registry) or the GPUs change.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

from gpulane.presets import Preset, PresetRegistry
from gpulane.scheduling.ledger import Ledger
from gpulane.scheduling.quiet import Lane
from gpulane.scheduling.router import CPU_LANE, GPU_LANE

Queue = tuple[str, str, Preset]
"""A queue with its preset: (preset name, lane, preset)."""
T = TypeVar("T")


class PerRegistry(Generic[T]):
    """``derive(registry)`` of the registry ``registry()`` returns now, worked out again only
    when that is another one (a reload makes a new registry) or its size changed."""

    def __init__(self, registry: Callable[[], PresetRegistry],
                 derive: Callable[[PresetRegistry], T]) -> None:
        self._registry = registry
        self._derive = derive
        self._of: tuple[PresetRegistry, int, T] | None = None

    def __call__(self) -> T:
        registry = self._registry()
        of = self._of
        if of is None or of[0] is not registry or of[1] != len(registry):
            of = self._of = (registry, len(registry), self._derive(registry))
        return of[2]


def _queues_of(registry: PresetRegistry) -> list[Queue]:
    """Every queue of the registry's presets (GPU first, then CPU, per preset)."""
    out = []
    for p in registry.values():
        if p.allows_gpu:
            out.append((p.name, GPU_LANE, p))
        if p.allows_cpu:
            out.append((p.name, CPU_LANE, p))
    return out


class Queues:
    """The registry's queues, and those of them this node may serve."""

    def __init__(self, registry: Callable[[], PresetRegistry], ledger: Ledger) -> None:
        self.ledger = ledger
        self.all = PerRegistry(registry, _queues_of)
        """Every queue of the registry's presets (GPU first, then CPU, per preset)."""
        self._served: tuple[object, int, frozenset[Lane]] = (None, -1, frozenset())

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
