"""Immediate tasks preempt: room on one GPU cleared of lower-priority workers for a new worker.

An ``immediate`` task (priority >= Priority.IMMEDIATE) at the head of its GPU queue whose
preset has no worker that will take it and no room for a new one asks lower-priority,
preemptible workers to step aside, as an immediate lease does (scheduling/leases.py), with
the same plans (lease_plans.py): room on ONE device, the cheapest set of victims (lowest sum
of their ledger priorities, which follow the work each serves). A victim is drained
gracefully (Supervisor.preempt): it takes no new work, finishes its current batch within
``grace_s`` or is killed, and the tasks it held but never ran go back to the queue without
spending an attempt.

While the victims drain, the device is kept for the preset: task placement of other presets
keeps off it (``reserved_devices``), and whatever room is free there is held in the ledger for
it (``hold_freed_room``, called synchronously on every capacity change, before waiting leases
are granted): part of the room, as one victim of several exits, under the clearing's own
holder (``Clearing.partial``), so a lease cannot take it meanwhile and leave the rest too
small; the whole room under the new worker's id, which the next pass takes (``take``). One
clearing per preset at a time: the same head never preempts again while its victims drain.
A clearing whose room never came (a victim outlived its grace, the head was cancelled) is
given up after the grace plus ``CLEARING_SLACK_S``, and what it held goes back.

Leases are never victims here (an outside service's lease is not a task worker), nor are
devices being cleared for an urgent lease. Presets of ``gpus: N`` (whole devices) do not
preempt: they wait, as before.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from gpulane.presets import Preset
from gpulane.runtime.launchers import DeviceAssignment
from gpulane.runtime.supervisor import Supervisor
from gpulane.scheduling.lease_plans import cheapest, plan_device
from gpulane.scheduling.ledger import GpuAccount, Ledger

log = logging.getLogger("gpulane.preemption")

CLEARING_SLACK_S = 10.0
"""A clearing is given up this long after its victims' grace ended: a killed victim's exit is
handled within seconds, so room that has not come by then will not come."""


@dataclass(slots=True)
class Clearing:
    """A device being cleared for one preset's new worker."""

    preset: Preset
    device: int
    priority: int
    victims: set[str]
    until: float  # time.monotonic(): given up after this
    held: str | None = None  # the new worker's id, once its room is held in the ledger
    started: float = field(default_factory=time.monotonic)

    @property
    def partial(self) -> str:
        """The ledger holder of the part of the room freed so far (before all of it is)."""
        return f"clearing-{self.preset.name}"


def _noop() -> None:
    return None


class TaskPreemption:
    """Clears room for immediate tasks that cannot be placed (see module doc)."""

    def __init__(self, ledger: Ledger, supervisor: Supervisor, *, grace_s: float) -> None:
        self.ledger = ledger
        self.supervisor = supervisor
        self.grace_s = grace_s
        self.clearings: dict[str, Clearing] = {}  # preset name -> its clearing
        self.preemptions = 0  # clearings started (each preempting one or more workers)
        self.on_release: Callable[[], None] = _noop
        """Told when held room goes back unused (the node wakes whoever waits for room)."""

    def reserved_devices(self, preset: str | None = None) -> set[int]:
        """Devices being cleared for a preset other than ``preset``: keep off them."""
        return {c.device for name, c in self.clearings.items() if name != preset}

    def clearing(self, preset: str) -> bool:
        """Whether a device is being cleared for ``preset`` now."""
        return preset in self.clearings

    def preempt_for(self, preset: Preset, priority: int, lease_reserved: set[int]) -> bool:
        """Preempt the cheapest set of lower-priority preemptible workers on one device so
        that a new worker of ``preset`` fits there; False when nothing was preempted (one
        clearing for it already, room already coming, or no device could be cleared)."""
        if preset.name in self.clearings or preset.gpus > 1:
            return False
        skip = lease_reserved | self.reserved_devices()
        plans = {}
        for d, acct in self.ledger.gpus.items():
            if d in skip or acct.lost or acct.total_vram_mb < preset.vram_mb:
                continue  # (a lost GPU's workers are stopped already: no room comes there)
            shadow, stopping_mb = self._shadow(acct)
            if acct.free_mb + stopping_mb >= preset.vram_mb and not acct.held_whole:
                return False  # workers stopping here make room already: the next pass fits
            plan = plan_device(shadow, vram_mb=preset.vram_mb, gpus=0, priority=priority)
            if plan:  # (an empty plan: room without preempting, which placement takes)
                plans[d] = plan
        picked = cheapest(plans, 1)
        if picked is None:
            return False
        (device,), victims = picked
        self.clearings[preset.name] = Clearing(
            preset, device, priority, {h.holder for h in victims},
            time.monotonic() + self.grace_s + CLEARING_SLACK_S)
        self.preemptions += 1
        for h in victims:
            log.info("worker %s (priority %d) preempted on gpu:%d for an immediate task of "
                     "%s (priority %d, grace %.1fs)", h.holder, h.priority, device,
                     preset.name, priority, self.grace_s)
            self.supervisor.preempt(h.holder, self.grace_s)
        self.hold_freed_room()  # idle victims may have made room already
        return True

    def _shadow(self, acct: GpuAccount) -> tuple[GpuAccount, int]:
        """The device as a task's preemption sees it: only live task workers may be victims
        (a lease or a worker already stopping is marked not preemptible), and the MB that
        stopping workers will give back."""
        holdings, stopping_mb = {}, 0
        for name, h in acct.holdings.items():
            worker = self.supervisor.worker(name) if h.kind == "worker" else None
            if worker is not None and not worker.alive:
                stopping_mb += h.vram_mb
            victim = h.preemptible and worker is not None and worker.alive
            holdings[name] = dataclasses.replace(h, preemptible=victim)
        return dataclasses.replace(acct, holdings=holdings), stopping_mb

    def hold_freed_room(self) -> None:
        """Hold in the ledger, under the new worker's id, the room of each clearing that has
        become free: before leases or other presets can take it."""
        for c in self.clearings.values():
            if c.held is not None:
                continue
            acct = self.ledger.gpus.get(c.device)
            if acct is None or acct.held_whole or acct.lost:
                continue
            self.ledger.release(c.partial)  # what it held so far counts as free below
            if acct.free_mb < c.preset.vram_mb:
                if acct.free_mb > 0:  # no worker: never a victim, never preempted
                    self.ledger.acquire(c.partial, c.device, acct.free_mb, kind="clearing",
                                        priority=c.priority, preemptible=False)
                continue
            device = DeviceAssignment("gpu", c.device, acct.uuid, acct.simulated)
            wid = self.supervisor.next_worker_id(c.preset, device)
            if self.ledger.acquire(wid, c.device, c.preset.vram_mb, priority=c.priority,
                                   preemptible=c.preset.preemptible):
                c.held = wid

    def take(self, preset: str) -> tuple[DeviceAssignment, str] | None:
        """The room held for ``preset``'s new worker (the clearing ends), or None."""
        c = self.clearings.get(preset)
        if c is None or c.held is None:
            return None
        del self.clearings[preset]
        acct = self.ledger.gpus[c.device]
        log.info("gpu:%d cleared for %s in %.1fs", c.device, preset,
                 time.monotonic() - c.started)
        return DeviceAssignment("gpu", c.device, acct.uuid, acct.simulated), c.held

    def done(self, preset: str) -> None:
        """``preset`` found room elsewhere: its clearing ends, and room it held goes back."""
        c = self.clearings.pop(preset, None)
        if c is None:
            return
        held = [h for h in (c.held, c.partial) if h is not None
                and h in self.ledger.gpus[c.device].holdings]
        for holder in held:
            self.ledger.release(holder)
        if held:
            self.on_release()

    def expire(self, now: float | None = None) -> None:
        """Give up clearings whose room has not come in time (see CLEARING_SLACK_S)."""
        now = time.monotonic() if now is None else now
        for name in [n for n, c in self.clearings.items() if now >= c.until]:
            log.warning("gave up clearing gpu:%d for %s: its room did not come in time",
                        self.clearings[name].device, name)
            self.done(name)
