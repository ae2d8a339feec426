"""Which fleet a node joins, chosen by its store's URL: nodes on one Redis form a fleet."""

from __future__ import annotations

from gpulane.fleet.base import Fleet
from gpulane.fleet.local import LocalFleet
from gpulane.fleet.redis import RedisFleet

REDIS_SCHEMES = ("redis://", "rediss://")
"""Store URLs whose nodes share a Redis, and so one fleet."""


def open_fleet(store_url: str, node: str) -> Fleet:
    """The fleet for a node named ``node`` on the store at ``store_url`` (unopened): a
    RedisFleet on the same Redis for a ``redis://`` store, else a LocalFleet of this node."""
    if store_url.startswith(REDIS_SCHEMES):
        return RedisFleet(store_url, node)
    return LocalFleet(node)
