"""What of a node its views read: the parts the status view (status.py) and the metrics'
scrape (metrics.py) take, as one Protocol that node.Node satisfies. A Protocol rather than the
Node itself, since scheduling sits below the node layer and must not import it."""

from __future__ import annotations

from typing import Protocol

from gpulane.devices import CpuPool, DeviceSnapshot
from gpulane.presets import PresetRegistry
from gpulane.runtime.supervisor import Supervisor
from gpulane.scheduling.admission import Admission
from gpulane.scheduling.fallbacks import FallbackLog
from gpulane.scheduling.housekeeping import Housekeeper
from gpulane.scheduling.leases import LeaseManager
from gpulane.scheduling.ledger import Ledger
from gpulane.store import Store


class NodeParts(Protocol):
    """A node as its status view and its metrics read it."""

    @property
    def name(self) -> str: ...
    @property
    def started(self) -> bool: ...
    @property
    def started_at(self) -> float: ...
    @property
    def draining(self) -> bool: ...
    @property
    def store(self) -> Store: ...
    @property
    def registry(self) -> PresetRegistry: ...
    @property
    def admission(self) -> Admission: ...
    @property
    def housekeeper(self) -> Housekeeper: ...
    @property
    def ledger(self) -> Ledger: ...
    @property
    def gpus(self) -> list[DeviceSnapshot]: ...
    @property
    def cpu(self) -> CpuPool: ...
    @property
    def fallbacks(self) -> FallbackLog: ...
    @property
    def supervisor(self) -> Supervisor: ...
    @property
    def leases(self) -> LeaseManager: ...
