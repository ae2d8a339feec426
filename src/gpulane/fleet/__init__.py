"""What nodes sharing one store know of each other: the registry, calls, the lease book."""

from gpulane.fleet.base import Fleet, Handler, NodeInfo
from gpulane.fleet.local import LocalFleet

__all__ = ["Fleet", "Handler", "LocalFleet", "NodeInfo"]
