"""Change counters per key, and wake-ups for whoever waits on a key.

The in-process primitive behind every long-poll and event stream: the store's tasks (SSE,
result waits) and scheduling's leases (their SSE) both use it, and it knows nothing of what
the keys name. A waiter reads ``version(key)`` before it reads the state it watches, then
waits for a version other than the one it read: a change that lands between the read and the
wait is not lost.

Only live keys are kept: a key that will change no more (a finished task, a dropped lease) is
``forget``-ed. Versions come from one counter for all keys, and a forgotten key reads as that
counter's value at the latest forget, so a key's version never repeats: a waiter that read it
before the forget sees a different one after, re-reads, and finds the final state.
"""

from __future__ import annotations

import asyncio
from collections.abc import Collection
from typing import Generic, TypeVar

T = TypeVar("T")


class Waiters(dict[str, list[asyncio.Future[T]]], Generic[T]):
    """Futures parked per key; the key's next ``wake`` resolves all of them with one value.

    A dict (key -> its futures), so that ``key in waiters``, the notifier's check on every
    change, costs no Python call when nobody waits.
    """

    __slots__ = ()

    def wake(self, key: str, value: T) -> None:
        parked = self.pop(key, None)
        if parked:
            for fut in parked:
                if not fut.done():
                    fut.set_result(value)

    async def park(self, keys: Collection[str], timeout: float) -> T:
        """The value of the next ``wake`` of any of ``keys`` (one future parked under each);
        TimeoutError when ``timeout`` passes first. The entries go with the wait."""
        fut: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        for key in keys:
            self.setdefault(key, []).append(fut)
        try:
            async with asyncio.timeout(timeout):
                return await fut
        finally:
            for key in keys:
                parked = self.get(key)
                if parked and fut in parked:  # not the key that woke it (that one popped)
                    parked.remove(fut)
                    if not parked:
                        del self[key]


class Notifier:
    """A version per key, bumped by ``notify``, and the waiters for the next bump."""

    def __init__(self) -> None:
        self._versions: dict[str, int] = {}
        self._waiters: Waiters[None] = Waiters()
        self._clock = 0
        """The last version handed out, to any key: versions only grow."""
        self._forgotten_at = 0
        """What a key without an entry reads: the clock at the latest forget."""

    def version(self, key: str) -> int:
        return self._versions.get(key, self._forgotten_at)

    def notify(self, key: str) -> None:
        """The thing ``key`` names changed: give it a new version and wake its waiters."""
        self._clock += 1
        self._versions[key] = self._clock
        if key in self._waiters:
            self._waiters.wake(key, None)

    def waited_on(self, key: str) -> bool:
        return key in self._waiters

    def forget(self, key: str) -> None:
        """Drop the key's entry: it will change no more. Safe with waiters about: a parked
        one is woken by a later notify as before, and one that read the version but has not
        parked yet finds it changed (every key without an entry now reads a new value)."""
        if self._versions.pop(key, None) is not None:
            self._clock += 1
            self._forgotten_at = self._clock

    def __len__(self) -> int:
        """Keys with a version or a waiter: what this notifier holds in memory."""
        return len(self._versions.keys() | self._waiters.keys())

    async def wait(self, key: str, seen_version: int, timeout: float) -> bool:
        """True once the key's version differs from ``seen_version``; False when ``timeout``
        passes first."""
        if self.version(key) != seen_version:
            return True
        try:
            await self._waiters.park((key,), timeout)
        except TimeoutError:
            return False
        return True
