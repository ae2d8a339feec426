"""How ``gpulane serve`` runs its node: the store and the node's name in the fleet checked
before anything starts, and uvicorn with a SIGTERM that drains the node and exits 0.

Imported only by ``gpulane serve`` (uvicorn and redis-py are slow to import for the client
commands).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
import signal
import socket
import time
from types import FrameType
from urllib.parse import urlsplit

import uvicorn
from redis.asyncio import Redis
from redis.exceptions import RedisError

from gpulane.fleet import NodeInfo
from gpulane.fleet.redis import RedisFleet
from gpulane.node import Node

log = logging.getLogger("gpulane.serve")

REDIS_SCHEMES = ("redis://", "rediss://")
"""Store URLs of a Redis (a fleet's store; TCP only, as the redis store speaks)."""
REDIS_CHECK_TIMEOUT_S = 3.0
"""How long ``gpulane serve`` waits for Redis to answer before it gives up at start."""
NAME_POLL_S = 0.25
"""How often a start whose node name is registered reads that registration again."""
NAME_WAIT_MIN_S = 10.0
"""Least time a start waits for a registration of its name to lapse (or to be renewed)."""
NODE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
"""A node name in a fleet: a host name's letters (it names Redis keys, channels, logs)."""


def store_refusal(url: str) -> str | None:
    """Why the node cannot start on the store at ``url`` (one line, with the fix), or None:
    a malformed ``redis://`` URL, or a Redis that does not answer a PING."""
    if not url.startswith(REDIS_SCHEMES):
        return None
    parts = urlsplit(url)
    try:
        port = parts.port or 6379
    except ValueError as exc:
        return (f"--store {url!r} is not a Redis URL ({exc}): use redis://HOST:PORT/DB, "
                "e.g. redis://127.0.0.1:6379/0")
    db = parts.path.strip("/")
    if db and not db.isdigit():
        return (f"--store {url!r}: the database {db!r} must be a number: use "
                "redis://HOST:PORT/DB, e.g. redis://127.0.0.1:6379/0")
    where = f"{parts.hostname or 'localhost'}:{port}"
    try:
        asyncio.run(_ping(url))
    except (RedisError, OSError, TimeoutError) as exc:
        return (f"--store {url!r}: Redis at {where} does not answer ({exc or type(exc).__name__})"
                ": start it, or point --store at a running one")
    return None


async def _ping(url: str) -> None:
    client = Redis.from_url(url, socket_connect_timeout=REDIS_CHECK_TIMEOUT_S,
                            socket_timeout=REDIS_CHECK_TIMEOUT_S)
    try:
        async with asyncio.timeout(REDIS_CHECK_TIMEOUT_S):
            await client.ping()
    finally:
        await client.aclose()


def name_refusal(url: str, name: str, ttl_s: float) -> str | None:
    """Why this node cannot join the fleet at ``url`` as ``name`` (one line), or None: a name
    that is not a host name's letters, or one a live node holds. Two live nodes of one name
    would overwrite each other's registration, and the one that stops first would leave the
    other unregistered, its work taken over as a dead node's. A registration left by a
    killed run of this node lapses within its TTL: the start waits for that."""
    if not url.startswith(REDIS_SCHEMES):
        return None
    if not NODE_NAME.fullmatch(name):
        return (f"--node-name {name!r} is not a node name: use 1 to 63 letters, digits, '.', "
                "'_' or '-', starting with a letter or digit (e.g. gpu-host-1)")
    return asyncio.run(_name_taken(url, name, max(NAME_WAIT_MIN_S, 2 * ttl_s)))


async def _name_taken(url: str, name: str, wait_s: float) -> str | None:
    fleet = RedisFleet(url, name)
    try:
        first = await _registered(fleet, name)
        if first is None:
            return None
        log.info("node name %s is registered (heartbeat %.1f s ago): waiting up to %g s for "
                 "it to lapse (a killed run) or be renewed (a live node)", name,
                 time.time() - first.heartbeat_at, wait_s)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            await asyncio.sleep(NAME_POLL_S)
            now = await _registered(fleet, name)
            if now is None:
                return None
            if (now.started_at, now.heartbeat_at) != (first.started_at, first.heartbeat_at):
                return (f"--node-name {name!r} is taken by a live node of the fleet (url "
                        f"{now.url}, heartbeat renewed): give this node another --node-name, "
                        "or stop that one first (gpulane drain NAME --exit)")
        return (f"--node-name {name!r} is still registered after {wait_s:g} s without a new "
                f"heartbeat (url {first.url}; a killed node with a longer node_ttl_s?): start "
                "again once it has lapsed, or give this node another --node-name")
    finally:
        await fleet.close()


async def _registered(fleet: RedisFleet, name: str) -> NodeInfo | None:
    return next((n for n in await fleet.nodes() if n.name == name), None)


class DrainingServer(uvicorn.Server):
    """uvicorn whose first SIGTERM drains the node and then exits cleanly (exit code 0).

    uvicorn's own handling stops at once and then raises the signal again once it has shut
    down, so the process would die of its SIGTERM; here the first one asks the node to drain
    to exit (node.drain(exit=True)), and the drain's end sets ``should_exit``. A second
    SIGTERM, or SIGINT, is uvicorn's usual stop."""

    def __init__(self, config: uvicorn.Config, node: Node) -> None:
        super().__init__(config)
        self.node = node
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_asked = False
        node.drains.on_exit = self._exit

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if (sig == signal.SIGTERM and not self._drain_asked and self._loop is not None
                and self.node.started):
            self._drain_asked = True
            log.info("SIGTERM: draining, then exiting (send it again to stop at once)")
            self._loop.call_soon_threadsafe(functools.partial(self.node.drain, exit=True))
            return
        super().handle_exit(sig, frame)

    def _exit(self) -> None:
        self.should_exit = True
