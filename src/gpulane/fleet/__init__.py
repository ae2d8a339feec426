"""What nodes sharing one store know of each other: the registry, calls, the lease book."""

from gpulane.fleet.base import Fleet, Handler, NodeInfo
from gpulane.fleet.factory import open_fleet
from gpulane.fleet.local import LocalFleet
from gpulane.fleet.redis import RedisFleet

__all__ = ["Fleet", "Handler", "LocalFleet", "NodeInfo", "RedisFleet", "open_fleet"]
