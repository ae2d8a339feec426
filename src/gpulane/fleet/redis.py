"""The fleet of many nodes on one Redis: the node registry, calls between nodes, the lease
book.

Data layout (``gl:`` is the prefix):

- ``gl:node:{name}``: the node's NodeInfo as JSON, with a PX TTL its heartbeat renews (set
  again at every beat, so a Redis that lost its data has every live node back within one
  beat); ``gl:registry``: the set of names (not the store's ``gl:nodes``: the nodes that
  hold running tasks). ``nodes()`` reads the set, MGETs the keys, and drops
  the names whose key expired (a script that removes a name only while its key is absent,
  so a node re-registering at that instant is not dropped).
- ``gl:db{N}:call:{node}``: the channel a node's calls arrive on (N: the fleet's database,
  since channels ignore it); ``gl:reply:{id}``: one answer
  (see ``redis_calls.py``).
- ``gl:lease:{id}``: the lease as JSON; ``gl:lease:{id}:ev``: its events, a stream whose
  entry ids are the event numbers (``n-0``), capped near ``LEASE_EVENTS_MAX``;
  ``gl:leases`` and ``gl:leases:{node}``: sorted sets of the live leases by first save time
  (oldest first). ``save_lease`` is one script (lease, new events, live sets: all or
  nothing; events already in the stream are skipped, so a retried save adds none); an ended
  lease (``keep_s``) gets PEXPIRE on both keys and leaves the live sets. An ended lease is
  never brought back (the fence against a node taken for dead while alive: its save of
  ``granted`` over the ``expired`` another node wrote is refused, ``fenced``).

Two connection pools to the store's URL: ``client`` for short commands (a command times out
after ``COMMAND_TIMEOUT_S``; each holds a connection only for its round trip) and ``blocking``
for BLPOP, XREAD BLOCK and the subscriber (no socket timeout; each blocking call has its own
guard). A blocking read holds its connection while it waits, so they are bounded
(``blocking_slot``: ``BLOCKING_MAX``, then 503 ``fleet_busy`` with Retry-After). Redis
unreachable: every method raises StoreUnavailableError within about ``CONNECT_TIMEOUT_S``,
never hangs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from gpulane.errors import StoreUnavailableError, UnavailableError
from gpulane.fleet.base import Handler, NodeInfo
from gpulane.fleet.local import fenced
from gpulane.fleet.redis_calls import BLOCK_GUARD_S, Calls

log = logging.getLogger("gpulane.fleet")

T = TypeVar("T")

CONNECT_TIMEOUT_S = 1.0
"""How long a connection attempt to Redis may take before the call fails as unavailable."""

COMMAND_TIMEOUT_S = 5.0
"""How long a short command may wait for its answer."""

BLOCKING_MAX = 256
"""Blocking reads (calls to other nodes awaiting their answer, lease event streams read from
the book) one node keeps in flight at most, each on a Redis connection of its own: one more
waits up to ``BLOCKING_WAIT_S`` for a slot, then is 503 ``fleet_busy`` (Redis's own limit,
maxclients 10,000 by default, is shared by every node and would fail them all)."""

BLOCKING_WAIT_S = 1.0
"""How long a blocking read waits for a slot before it is refused (``fleet_busy``)."""

LEASE_EVENTS_MAX = 1000
"""Events kept per lease (about: the stream is trimmed approximately)."""

PREFIX = "gl:"
"""The prefix of every key and channel of the fleet (the store's keys share it)."""

_PRUNE_NODES = """
for i, name in ipairs(ARGV) do
  if redis.call('EXISTS', KEYS[i + 1]) == 0 then redis.call('SREM', KEYS[1], name) end
end
return 0
"""
"""Drop from the set of names the nodes whose key is absent (KEYS: set, then one key per
name in ARGV)."""

_SAVE_LEASE = """
local cur = redis.call('GET', KEYS[1])
if cur then
  local ok, was = pcall(cjson.decode, cur)
  local ended = {released = true, expired = true, revoked = true, timed_out = true}
  if ok and type(was) == 'table' and ended[was.state]
      and (tonumber(ARGV[3]) < 0 or (was.ended_by and was.ended_by ~= cjson.null)) then
    return -1
  end
end
local last = 0
local top = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', 1)
if top[1] then last = tonumber(string.match(top[1][1], '^(%d+)')) end
for i = 6, #ARGV, 2 do
  local n = tonumber(ARGV[i])
  if n > last then
    redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[5], ARGV[i] .. '-0', 'e', ARGV[i + 1])
    last = n
  end
end
local keep = tonumber(ARGV[3])
if keep >= 0 then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', math.max(1, keep))
  redis.call('PEXPIRE', KEYS[2], math.max(1, keep))
  redis.call('ZREM', KEYS[3], ARGV[1])
  redis.call('ZREM', KEYS[4], ARGV[1])
else
  redis.call('SET', KEYS[1], ARGV[2])
  redis.call('PERSIST', KEYS[2])
  redis.call('ZADD', KEYS[3], 'NX', ARGV[4], ARGV[1])
  redis.call('ZADD', KEYS[4], 'NX', ARGV[4], ARGV[1])
end
return last
"""
"""Save a lease and its new events in one step (KEYS: lease, events, live, live of its node;
ARGV: id, JSON, keep_ms or -1, first-save score, events cap, then number, JSON per event).
-1 and nothing written when the book has the lease ended and this save would bring it back
(not ended), or it was ended in the book by another node (``ended_by``): see ``fenced``."""


def _parsed(raw: str | bytes, what: str, make: Callable[[Any], T]) -> T | None:
    """One entry of a listing (a registration, a lease), or None (logged) when it is not one
    this code wrote: an entry another version or a stray client left must not fail every
    listing, every node's GET /v1/nodes and its takeover round with it."""
    try:
        return make(json.loads(raw))
    except (ValueError, KeyError, TypeError) as exc:
        log.warning("fleet: skipped a malformed %s entry (%s: %s): %.200r", what,
                    type(exc).__name__, exc, raw)
        return None


class RedisFleet:
    """Many nodes on one Redis (see the module docstring)."""

    shared = True
    """Other nodes share this fleet: one holding work without a registration is dead."""

    def __init__(self, url: str, name: str, *, prefix: str = PREFIX) -> None:
        self.url = url
        self.name = name
        self.prefix = prefix
        # One retry at once: a pooled socket may be stale after a Redis restart.
        opts: dict[str, Any] = {"decode_responses": True,
                                "socket_connect_timeout": CONNECT_TIMEOUT_S,
                                "retry": Retry(NoBackoff(), 1)}
        self.client: aioredis.Redis = aioredis.from_url(
            url, socket_timeout=COMMAND_TIMEOUT_S, **opts)
        self.blocking: aioredis.Redis = aioredis.from_url(url, socket_timeout=None, **opts)
        # Channels are the server's, not the database's: a fleet on /1 of the same server
        # must not hear the calls meant for a namesake node of the fleet on /0.
        db = int(self.client.connection_pool.connection_kwargs.get("db", 0) or 0)
        self.channel_prefix = f"{prefix}db{db}:"
        """The start of this fleet's channel names: its key prefix and its database."""
        self.registry_key = f"{prefix}registry"
        """The set of registered names (the store's ``gl:nodes`` is another thing: the nodes
        holding running tasks)."""
        self.calls = Calls(self)
        self._slots = asyncio.Semaphore(BLOCKING_MAX)
        self._open = False
        self._prune = self.client.register_script(_PRUNE_NODES)
        self._save = self.client.register_script(_SAVE_LEASE)

    def node_key(self, node: str) -> str:
        return f"{self.prefix}node:{node}"

    def _lease_key(self, lease_id: str) -> str:
        return f"{self.prefix}lease:{lease_id}"

    def _live_key(self, node: str | None = None) -> str:
        return f"{self.prefix}leases" if node is None else f"{self.prefix}leases:{node}"

    @contextlib.asynccontextmanager
    async def blocking_slot(self, what: str) -> AsyncIterator[None]:
        """Hold one of the ``BLOCKING_MAX`` slots for a blocking read, or raise fleet_busy."""
        try:
            async with asyncio.timeout(BLOCKING_WAIT_S):
                await self._slots.acquire()
        except TimeoutError:
            raise UnavailableError(
                "fleet_busy", f"node {self.name} has {BLOCKING_MAX} blocking reads of the "
                f"fleet in flight (calls to other nodes, lease event streams), the most it "
                f"keeps: {what} was not started; retry later, or spread the callers over "
                "more nodes", headers={"Retry-After": "1"}) from None
        try:
            yield
        finally:
            self._slots.release()

    @contextlib.asynccontextmanager
    async def reaching(self, what: str) -> AsyncIterator[None]:
        """Run Redis commands; a lost or refused connection raises StoreUnavailableError."""
        try:
            yield
        except (RedisConnectionError, RedisTimeoutError, TimeoutError, OSError) as exc:
            raise StoreUnavailableError(f"fleet {what} failed ({type(exc).__name__}: "
                                        f"{exc})") from exc

    async def open(self) -> None:
        async with self.reaching("open"):
            await self.client.ping()
        self._open = True
        self.calls.start()
        await self.calls.wait_subscribed()

    async def close(self) -> None:
        self._open = False
        await self.calls.stop()
        await self.client.aclose()
        await self.blocking.aclose()

    # -- the node registry ---------------------------------------------------------------------

    async def register(self, info: NodeInfo, ttl_s: float) -> None:
        async with self.reaching("register"), self.client.pipeline(transaction=True) as p:
            p.set(self.node_key(info.name), json.dumps(info.to_json()),
                  px=max(1, int(ttl_s * 1000)))
            p.sadd(self.registry_key, info.name)
            await p.execute()

    async def deregister(self) -> None:
        async with self.reaching("deregister"), self.client.pipeline(transaction=True) as p:
            p.delete(self.node_key(self.name))
            p.srem(self.registry_key, self.name)
            await p.execute()

    async def nodes(self) -> list[NodeInfo]:
        names_key = self.registry_key
        async with self.reaching("nodes"):
            members: Any = await self.client.smembers(names_key)
            names: list[str] = sorted(members)
            if not names:
                return []
            raw = await self.client.mget([self.node_key(n) for n in names])
            gone = [n for n, r in zip(names, raw, strict=True) if r is None]
            if gone:
                await self._prune(keys=[names_key, *(self.node_key(n) for n in gone)],
                                  args=gone)
        found = (_parsed(r, "node", NodeInfo.from_json) for r in raw if r is not None)
        return [n for n in found if n is not None]

    # -- calls ---------------------------------------------------------------------------------

    def serve(self, handler: Handler) -> None:
        self.calls.handler = handler
        if self._open:
            self.calls.start()

    async def call(self, node: str, op: str, payload: dict[str, Any],
                   timeout_s: float) -> dict[str, Any]:
        return await self.calls.call(node, op, payload, timeout_s)

    # -- the lease book ------------------------------------------------------------------------

    async def save_lease(self, lease: dict[str, Any], events: list[dict[str, Any]],
                         keep_s: float | None = None) -> None:
        lease_id = str(lease["id"])
        node = str(lease.get("node") or self.name)
        args: list[Any] = [lease_id, json.dumps(lease),
                           -1 if keep_s is None else int(keep_s * 1000), time.time(),
                           LEASE_EVENTS_MAX]
        for e in events:
            args += [int(e["id"]), json.dumps(e)]
        key = self._lease_key(lease_id)
        async with self.reaching("save_lease"):
            last = await self._save(keys=[key, f"{key}:ev", self._live_key(),
                                          self._live_key(node)], args=args)
        if last == -1:
            raise fenced(lease_id)

    async def lease(self, lease_id: str) -> dict[str, Any] | None:
        async with self.reaching("lease"):
            raw = await self.client.get(self._lease_key(lease_id))
        return _parsed(raw, "lease", dict) if raw is not None else None

    async def leases(self, node: str | None = None) -> list[dict[str, Any]]:
        async with self.reaching("leases"):
            ids: Any = await self.client.zrange(self._live_key(node), 0, -1)
            if not ids:
                return []
            raw = await self.client.mget([self._lease_key(i) for i in ids])
        found = (_parsed(r, "lease", dict) for r in raw if r is not None)
        return [r for r in found if r is not None]

    async def lease_events(self, lease_id: str, after: int = 0) -> list[dict[str, Any]]:
        async with self.reaching("lease_events"):
            entries: Any = await self.client.xrange(f"{self._lease_key(lease_id)}:ev",
                                               min=f"({after}-0", max="+")
        return [json.loads(fields["e"]) for _, fields in entries]

    async def follow_lease(self, lease_id: str, after: int, quiet_s: float
                           ) -> AsyncIterator[list[dict[str, Any]]]:
        key = self._lease_key(lease_id)
        block_ms = max(1, int(quiet_s * 1000))  # XREAD's BLOCK 0 would wait for ever
        while True:
            async with self.reaching("follow_lease"), self.blocking_slot("a lease stream"):
                if not await self.client.exists(key):
                    return
                got: Any = await asyncio.wait_for(
                    self.blocking.xread({f"{key}:ev": f"{after}-0"}, block=block_ms),
                    quiet_s + BLOCK_GUARD_S)
            batch = [json.loads(fields["e"]) for _, entries in got or [] for _, fields
                     in entries]
            if batch:
                after = int(batch[-1]["id"])
            yield batch

    def view(self) -> dict[str, Any]:
        """The calls' counters, for the node's status view."""
        return {"backend": "redis", "calls": self.calls.view()}
