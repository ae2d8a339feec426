"""Acquires forwarded to this node by another one, so that one its caller abandoned is called
off instead of granted to nobody until its ttl_s.

The calling node names each forwarded acquire with a ``ref``; when its caller leaves (the
HTTP client went away, or no answer came within wait_s and the slack) it sends
``lease.abandon`` with that ref. Here an abandon cancels the acquire still waiting (its lease
ends ``timed_out``, as a local acquire whose caller left), or ends the lease it was granted
(``released``: the token never reached anyone). A ref is remembered ``REF_KEEP_S`` (an
abandon that comes before its acquire, or after its grant, is still matched), at most
``REFS_MAX`` of them.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any

REF_KEEP_S = 60.0
"""How long a forwarded acquire's ref is remembered (longer than a call's answer is kept)."""
REFS_MAX = 10_000
"""Refs remembered at most (the oldest go first)."""


ABANDONED = "abandoned"
"""What a ref whose abandon came is remembered as."""


class Abandoned(Exception):
    """The acquire's caller left before it was served here."""


class Forwards:
    """The forwarded acquires of this node by ref: waiting (their task), granted (the lease
    id and token) or abandoned."""

    def __init__(self, release: Callable[[str, int], None]) -> None:
        self.release = release
        """Ends a granted lease whose caller left: (lease id, token)."""
        self._refs: OrderedDict[str, tuple[float, Any]] = OrderedDict()

    async def serve(self, ref: str, acquire: Callable[[], Awaitable[dict[str, Any]]]
                    ) -> dict[str, Any]:
        """Run ``acquire()`` for ``ref``; Abandoned if its abandon came first."""
        self._forget()
        if self._refs.get(ref, (0.0, None))[1] == ABANDONED:
            raise Abandoned(ref)
        self._remember(ref, asyncio.current_task())
        try:
            answer = await acquire()
        except BaseException:
            if self._refs.get(ref, (0.0, None))[1] != ABANDONED:
                self._refs.pop(ref, None)
            raise
        self._remember(ref, (str(answer["id"]), int(answer["token"])))
        return answer

    def abandon(self, ref: str) -> str:
        """Call off the acquire ``ref``: what it was (waiting, granted, unknown)."""
        self._forget()
        found = self._refs.get(ref, (0.0, None))[1]
        self._remember(ref, ABANDONED)
        if isinstance(found, asyncio.Task):
            found.cancel()
            return "waiting"
        if isinstance(found, tuple):
            self.release(*found)
            return "granted"
        return "unknown"

    def _remember(self, ref: str, what: Any) -> None:
        self._refs[ref] = (time.monotonic(), what)
        self._refs.move_to_end(ref)
        while len(self._refs) > REFS_MAX:
            self._refs.popitem(last=False)

    def _forget(self) -> None:
        cutoff = time.monotonic() - REF_KEEP_S
        while self._refs and next(iter(self._refs.values()))[0] < cutoff:
            self._refs.popitem(last=False)
