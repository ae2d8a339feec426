"""Change counters per key, and wake-ups for whoever waits on a key.

The in-process primitive behind every long-poll and event stream: the store's tasks (SSE,
result waits) and scheduling's leases (their SSE) both use it, and it knows nothing of what
the keys name. A waiter reads ``version(key)`` before it reads the state it watches, then
waits for a version past it: a change that lands between the read and the wait is not lost.
"""

from __future__ import annotations

import asyncio
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

    async def park(self, key: str, timeout: float) -> T:
        """The value of the key's next ``wake``; TimeoutError when ``timeout`` passes first."""
        fut: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self.setdefault(key, []).append(fut)
        try:
            async with asyncio.timeout(timeout):
                return await fut
        finally:
            parked = self.get(key)
            if parked and fut in parked:  # timed out or cancelled: not woken, so still here
                parked.remove(fut)
                if not parked:
                    del self[key]


class Notifier:
    """A version per key, bumped by ``notify``, and the waiters for the next bump."""

    def __init__(self) -> None:
        self._versions: dict[str, int] = {}
        self._waiters: Waiters[None] = Waiters()

    def version(self, key: str) -> int:
        return self._versions.get(key, 0)

    def notify(self, key: str) -> None:
        """The thing ``key`` names changed: bump its version and wake its waiters."""
        self._versions[key] = self._versions.get(key, 0) + 1
        if key in self._waiters:
            self._waiters.wake(key, None)

    def waited_on(self, key: str) -> bool:
        return key in self._waiters

    def forget(self, key: str) -> None:
        """Drop the key's version counter (it will change no more) unless someone waits."""
        if not self.waited_on(key):
            self._versions.pop(key, None)

    async def wait(self, key: str, seen_version: int, timeout: float) -> bool:
        """True once the key's version is past ``seen_version``; False when ``timeout``
        passes first."""
        if self._versions.get(key, 0) != seen_version:
            return True
        try:
            await self._waiters.park(key, timeout)
        except TimeoutError:
            return False
        return True
