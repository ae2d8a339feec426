"""Wake-ups across nodes: one subscriber per Redis store on the scripts' channel.

The store's scripts publish the tasks that ended and the queues that got work
(redis_scripts.py). Messages from this store itself are skipped (its writes notify locally,
with the task in hand); from any other store they wake this process: result waiters of an
ended task re-read it, and the store hears which queues got work (it wakes the node's
scheduler, and stops treating those queues as empty). Every store hears every message (its
own too), so a message costs a few microseconds here: a connection of its own read with
hiredis (redis_conn.py), not redis-py's PubSub. When the server goes away the subscriber
connects again with backoff, then reports work in unknown queues once, since work queued
while it was away was announced to nobody (the store forgets which queues it knew empty), and
every result waiter re-reads its task (one that ended meanwhile was announced to nobody).
The channel is the server's, not the database's: stores on other databases of one server
hear each other's messages, which wake nothing of theirs but a scheduler's look at its queues.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from gpulane.store.base import TaskNotifier
from gpulane.store.redis_conn import RedisDown, RedisReplyError, RespConnection
from gpulane.store.redis_scripts import CHANNEL

log = logging.getLogger("gpulane.store")

BACKOFF_FIRST_S = 0.05
"""The subscriber's first wait before it reconnects; it doubles up to ``BACKOFF_MAX_S``."""

BACKOFF_MAX_S = 2.0
"""The longest wait between two reconnects (the API's Retry-After is 2 s too)."""


class Wakeups:
    """The subscriber: ``start`` subscribes (RedisDown when Redis cannot be reached), then a
    task keeps it subscribed until ``stop``."""

    def __init__(self, conn: RespConnection, instance: str, notifier: TaskNotifier,
                 on_work: Callable[[list[tuple[str, str]] | None], None]) -> None:
        self._conn = conn
        self._instance = instance.encode()
        self._notifier = notifier
        self._on_work = on_work
        """Called with the (preset, lane) queues another store gave work, or None after a
        reconnect (any queue may have got work meanwhile)."""
        self._transport: asyncio.Transport | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        lost = await self._subscribe()
        self._task = asyncio.create_task(self._run(lost), name="gpulane-redis-wakeups")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._transport is not None:
            self._transport.abort()
            self._transport = None

    async def _subscribe(self) -> asyncio.Future[None]:
        self._transport, lost = await self._conn.subscribe(CHANNEL, self._handle)
        return lost

    async def _run(self, lost: asyncio.Future[None]) -> None:
        while True:
            await lost
            backoff = BACKOFF_FIRST_S
            log.warning("store: lost the wake-up channel; subscribing again")
            while True:
                await asyncio.sleep(backoff)
                try:
                    lost = await self._subscribe()
                except (RedisDown, RedisReplyError) as exc:  # down, or still LOADING its data
                    log.debug("store: not subscribed yet (%s)", exc)
                    backoff = min(backoff * 2, BACKOFF_MAX_S)
                    continue
                break
            log.info("store: subscribed again to %s", CHANNEL)
            self._on_work(None)
            # Tasks that ended elsewhere meanwhile were announced to nobody: every result
            # waiter re-reads its task, or it would sleep to its timeout.
            self._notifier.wake_all()

    def _handle(self, data: bytes) -> None:
        kind, _, rest = data.partition(b"\t")
        instance, _, ids = rest.partition(b"\t")
        if instance == self._instance:
            return
        if kind == b"w":
            queues = []
            for name in ids.decode().split("\n"):
                lane, _, preset = name.partition(":")
                queues.append((preset, lane))
            self._on_work(queues)
        elif kind == b"f":
            for raw in ids.split():
                task_id = raw.decode()
                # Ended elsewhere: waiters re-read (no task in hand), then the entry goes, as
                # a local final notify drops it.
                self._notifier.notify(task_id)
                self._notifier.forget(task_id)
