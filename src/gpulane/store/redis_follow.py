"""Following a task's events on the Redis store, whichever node appends them.

A follower reads what is in the task's stream already, then blocks in ``XREAD BLOCK`` until the
next entry lands, so a client connected to one node follows a task that another node runs
with no polling. Blocking reads hold their connection for as long as they block: they come
from a pool of their own (``Tails``), apart from the store's pipelined connection, whose calls
must never wait behind them.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Protocol

from redis.asyncio import BlockingConnectionPool, Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from gpulane.errors import StoreUnavailableError
from gpulane.model import FINAL_STATES, Event, Task
from gpulane.store.redis_codec import decode_entries
from gpulane.store.redis_conn import CONNECT_TIMEOUT_S, PASSING_ERRORS
from gpulane.store.redis_scripts import PREFIX

FOLLOW_CONNECTIONS = 256
"""Connections for blocking reads; a follower past them waits for one to come free."""

READ_COUNT = 1000
"""Most events one read hands a follower."""


class Tails:
    """The blocking reads of a store's followers, on a pool of connections of their own."""

    def __init__(self, url: str) -> None:
        self.url = url
        # Blocking reads wait as long as their BLOCK says: no socket timeout of their own.
        self._client = Redis(connection_pool=BlockingConnectionPool.from_url(
            url, max_connections=FOLLOW_CONNECTIONS, timeout=None,
            socket_connect_timeout=CONNECT_TIMEOUT_S, socket_keepalive=True))

    async def read(self, task_id: str, after: int, block_ms: int) -> list[Event]:
        """The task's events after number ``after``, waiting up to ``block_ms`` for one."""
        try:
            got: Any = await self._client.xread({PREFIX + "e:" + task_id: f"{after}-0"},
                                           count=READ_COUNT, block=block_ms)
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            raise StoreUnavailableError(f"Redis at {self.url} failed ({exc})") from exc
        except ResponseError as exc:  # busy with a long script: a 503 as the store's calls
            if str(exc).startswith(PASSING_ERRORS):
                raise StoreUnavailableError(f"Redis at {self.url} failed ({exc})") from exc
            raise
        return decode_entries(task_id, got[0][1]) if got else []

    async def close(self) -> None:
        await self._client.aclose()
        await self._client.connection_pool.disconnect()  # a pool passed in stays open else


class _Reads(Protocol):
    async def get(self, task_id: str) -> Task | None: ...
    async def events(self, task_id: str, after: int = 0, limit: int = 1000) -> list[Event]: ...


async def follow(store: _Reads, tails: Tails, task_id: str, after: int, quiet_s: float
                 ) -> AsyncIterator[list[Event]]:
    """``Store.follow`` on Redis: batches as they land, an empty one after ``quiet_s`` without
    any, the end after the final state event (or at once for an unknown task)."""
    block_ms = max(1, int(quiet_s * 1000))
    events = await store.events(task_id, after, READ_COUNT)
    quiet = False
    while True:
        if events:
            for i, e in enumerate(events):
                if e.type == "state" and e.data.get("state") in FINAL_STATES:
                    yield events[:i + 1]
                    return
            after = events[-1].seq
            yield events
        else:
            task = await store.get(task_id)
            if task is None:
                return
            if task.state.final:  # its final event may have landed after the last read
                events = await store.events(task_id, after, READ_COUNT)
                if not events:
                    return
                continue
            if quiet:
                yield []
        # Whichever node appends next wakes this read.
        events = await tails.read(task_id, after, block_ms)
        quiet = not events
