"""Wake-ups across nodes: one subscriber per Redis store on the scripts' channel.

The store's scripts publish the tasks that ended and that work was queued (redis_scripts.py).
Messages from this store itself are skipped (its writes notify locally, with the task in
hand); from any other store they wake this process: result waiters of an ended task re-read
it, and ``on_work`` wakes the node's scheduler. The subscriber reconnects with backoff and
resubscribes when the server goes away, and then calls ``on_work`` once, since work queued
while it was away was announced to nobody.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.exceptions import RedisError

from gpulane.store.base import TaskNotifier
from gpulane.store.redis_scripts import CHANNEL

log = logging.getLogger("gpulane.store")

BACKOFF_FIRST_S = 0.05
"""The subscriber's first wait before it reconnects; it doubles up to ``BACKOFF_MAX_S``."""

BACKOFF_MAX_S = 2.0
"""The longest wait between two reconnects (the API's Retry-After is 2 s too)."""


class Wakeups:
    """The subscriber: ``start`` subscribes (raising when Redis cannot be reached), then a
    task listens until ``stop``."""

    def __init__(self, client: Redis, instance: str, notifier: TaskNotifier,
                 on_work: Callable[[], Callable[[], None]]) -> None:
        self._client = client
        self._instance = instance.encode()
        self._notifier = notifier
        self._on_work = on_work  # read at each message: the node sets store.on_work later
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        pubsub = await self._subscribe()
        self._task = asyncio.create_task(self._run(pubsub), name="gpulane-redis-wakeups")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _subscribe(self) -> PubSub:
        pubsub = self._client.pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.subscribe(CHANNEL)
        except BaseException:
            await pubsub.aclose()  # type: ignore[no-untyped-call]
            raise
        return pubsub

    async def _run(self, pubsub: PubSub | None) -> None:
        backoff = BACKOFF_FIRST_S
        while True:
            try:
                if pubsub is None:
                    pubsub = await self._subscribe()
                    backoff = BACKOFF_FIRST_S
                    log.info("store: subscribed again to %s after losing Redis", CHANNEL)
                    self._on_work()()
                async for msg in pubsub.listen():
                    if msg["type"] == "message":
                        self._handle(msg["data"])
            except (RedisError, OSError) as exc:
                log.warning("store: lost the wake-up channel (%s); retrying in %.2f s",
                            exc, backoff)
            finally:
                if pubsub is not None:
                    with contextlib.suppress(RedisError, OSError):
                        await pubsub.aclose()  # type: ignore[no-untyped-call]
                    pubsub = None
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, BACKOFF_MAX_S)

    def _handle(self, data: bytes) -> None:
        kind, _, rest = data.partition(b"\t")
        instance, _, ids = rest.partition(b"\t")
        if instance == self._instance:
            return
        if kind == b"w":
            self._on_work()()
        elif kind == b"f":
            for raw in ids.split():
                task_id = raw.decode()
                # Ended elsewhere: waiters re-read (no task in hand), then the entry goes, as
                # a local final notify drops it.
                self._notifier.notify(task_id)
                self._notifier.forget(task_id)
