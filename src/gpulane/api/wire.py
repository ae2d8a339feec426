"""How a response goes on the wire: its head and its body in one write.

uvicorn's HTTP/1.1 protocol (httptools) writes a response's status line and headers as soon
as the app starts the response, and its body as a second write: two ``send()`` calls, two TCP
segments on the way to the client, and the client woken for each. Profiled on a node under
round trips, the first write alone was the largest single cost of a small JSON answer (the
kernel delivers it to the client in the sender's time). :class:`OneWriteHttpTools` is that
protocol with its transport wrapped: a head is held back until the body's first write, which
goes out with it in one call. A head whose body never comes in the same turn of the event loop
(a HEAD answer, an event stream still waiting for its first event, a ``100 Continue``) is
written at the end of that turn, so nothing waits on it; a close writes what is held first.
Order is kept: what is held is always written before anything after it.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

_HEAD_END = b"\r\n\r\n"
"""How a response's head (status line and headers) ends."""


class HeldHeadTransport:
    """A connection's transport that holds a response's head until its body's first write
    (or the end of the loop's turn). Everything else passes through."""

    __slots__ = ("_head", "_loop", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._head: bytes | None = None

    def write(self, data: bytes | bytearray | memoryview) -> None:
        head = self._head
        if head is not None:
            self._head = None
            self._transport.writelines((head, data))  # one send (uvloop: one writev, no copy)
        elif isinstance(data, bytes) and data.startswith(b"HTTP/") and data.endswith(_HEAD_END):
            self._head = data
            self._loop.call_soon(self.flush)
        else:
            self._transport.write(data)

    def flush(self) -> None:
        """Write the held head, if any (its body did not come in the same turn)."""
        head = self._head
        if head is not None:
            self._head = None
            if not self._transport.is_closing():
                self._transport.write(head)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def is_closing(self) -> bool:  # asked on every response: no __getattr__ detour
        return self._transport.is_closing()

    def __getattr__(self, name: str) -> Any:  # the rest of the Transport API, as it is
        return getattr(self._transport, name)


class OneWriteHttpTools(HttpToolsProtocol):
    """uvicorn's httptools protocol writing each response's head and body in one call."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        held: Any = HeldHeadTransport(transport, self.loop)  # type: ignore[arg-type]
        super().connection_made(held)  # a Transport by duck typing
