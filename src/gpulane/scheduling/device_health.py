"""What the node does when one of its GPUs is lost, or comes back (DeviceSnapshot.health).

The device poll hands each fresh reading to the ledger (which places nothing on a lost GPU:
Ledger.observe) and then to ``DeviceHealth.observe``. A GPU that turns "lost": its workers
stop at once, since a lost GPU cannot finish a batch, and every task they held goes back to a
queue unspent (Supervisor.device_lost: an ``auto`` task of a preset that falls back on
``error`` to the CPU's, with fallback_reason device_lost; any other to the GPU lane, where
another GPU takes it); the leases held on it end (revoked, reason ``device_lost``), since
their holders lost it too. A GPU that reads "ok" again takes work at the next pass.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from gpulane.devices import DeviceSnapshot
from gpulane.model import FallbackReason
from gpulane.runtime.supervisor import Supervisor
from gpulane.scheduling.leases import LeaseManager, LeaseState
from gpulane.scheduling.ledger import Ledger

log = logging.getLogger("gpulane.devices")

LOST = "lost"
"""DeviceSnapshot.health of a GPU the driver no longer reaches."""


class DeviceHealth:
    """Follows each GPU's health from one reading to the next and acts on its changes."""

    def __init__(self, ledger: Ledger, supervisor: Supervisor, leases: LeaseManager,
                 on_change: Callable[[], None]) -> None:
        self.supervisor = supervisor
        self.leases = leases
        self.on_change = on_change
        self.lost: set[int] = {index for index, acct in ledger.gpus.items() if acct.lost}
        """GPU indexes lost at the last reading."""

    def observe(self, snapshots: Sequence[DeviceSnapshot]) -> tuple[list[int], list[int]]:
        """Take in a reading the ledger has already seen: stop what runs on the GPUs that
        were lost since the last one. Returns (GPUs lost now, GPUs back), by index."""
        lost_now = {s.index for s in snapshots if s.health == LOST}
        lost, back = sorted(lost_now - self.lost), sorted(self.lost - lost_now)
        self.lost = lost_now
        for index in lost:
            stopped = self.supervisor.device_lost(index)
            ended = self._end_leases(index)
            log.error("GPU %d is lost: nothing is placed on it until it reads ok again; "
                      "%d worker(s) stopped, their tasks requeued; %d lease(s) ended",
                      index, len(stopped), ended)
        for index in back:
            log.warning("GPU %d reads ok again: it takes work again", index)
        if lost or back:
            self.on_change()
        return lost, back

    def _end_leases(self, index: int) -> int:
        """End the leases held on a lost GPU; how many."""
        held = [lease for lease in self.leases.active()
                if lease.state.holds and index in lease.devices]
        for lease in held:
            self.leases.end(lease, LeaseState.REVOKED, FallbackReason.DEVICE_LOST)
        return len(held)
