"""A fault-injecting TCP proxy on loopback, for putting a bad network between SDK and server.

It forwards bytes both ways between each accepted connection and a fresh connection to the
upstream port. Each chunk a client sends (on a keep-alive HTTP/1.1 connection, about one
request) is a fault opportunity:

* with probability ``spike_rate`` the chunk is held ``spike_s`` before it is forwarded;
* with probability ``reset_rate`` the connection is reset (TCP RST), at one of three moments
  picked at random: before the request reaches the server; after it did but before the answer
  reaches the client (the server acted, the client never hears of it: the case idempotency
  keys exist for); or halfway through the answer.

When the upstream refuses (the server is dead) every accepted connection is reset at once, the
way a load balancer in front of a dead host behaves. The proxy runs its own event loop in a
daemon thread, so sync and async tests can use it alike; ``stats`` counts what it did.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import struct
import threading
import time
from dataclasses import dataclass, field

CHUNK = 65536
PHASES = ("before", "after_request", "mid_response")


@dataclass
class ProxyStats:
    connections: int = 0
    requests: int = 0  # client chunks seen
    refused_upstream: int = 0
    spikes: int = 0
    resets: dict[str, int] = field(default_factory=lambda: dict.fromkeys(PHASES, 0))
    # Monotonic time of each request that reached the server's address: a client chunk read,
    # or a connection reset at once because the server refused (its request never read).
    request_at: list[float] = field(default_factory=list)

    @property
    def total_resets(self) -> int:
        return sum(self.resets.values())


class _Conn:
    """One proxied connection: the client side, the upstream side, and a pending fault."""

    def __init__(self, client: asyncio.StreamWriter) -> None:
        self.client = client
        self.upstream: asyncio.StreamWriter | None = None
        self.cut: str | None = None  # "after_request" or "mid_response", armed by a request

    def reset(self) -> None:
        """Abort both sides; the client side with SO_LINGER 0, so it gets an RST."""
        sock = self.client.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.client.transport.abort()
        if self.upstream is not None:
            self.upstream.transport.abort()

    def close(self) -> None:
        for writer in (self.client, self.upstream):
            if writer is not None:
                with contextlib.suppress(Exception):
                    writer.close()


class FaultProxy:
    def __init__(self, upstream_port: int, *, reset_rate: float = 0.0, spike_rate: float = 0.0,
                 spike_s: float = 0.2, seed: int = 0, host: str = "127.0.0.1") -> None:
        self.host = host
        self.upstream_port = upstream_port
        self.reset_rate = reset_rate
        self.spike_rate = spike_rate
        self.spike_s = spike_s
        self.stats = ProxyStats()
        self._rng = random.Random(seed)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fault-proxy",
                                        daemon=True)
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> FaultProxy:
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._handle, self.host, 0), self._loop).result(10)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def stop(self) -> None:
        async def shutdown() -> None:
            if self._server is not None:
                self._server.close()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)

        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(10)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        self._loop.close()

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- in the proxy's loop ----------------------------------------------------------------

    async def _handle(self, creader: asyncio.StreamReader, cwriter: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)  # type: ignore[arg-type]
        self.stats.connections += 1
        conn = _Conn(cwriter)
        try:
            try:
                ureader, uwriter = await asyncio.open_connection(self.host, self.upstream_port)
            except OSError:
                self.stats.refused_upstream += 1
                self.stats.request_at.append(time.monotonic())
                conn.reset()
                return
            conn.upstream = uwriter
            up = asyncio.create_task(self._client_to_server(conn, creader, uwriter))
            down = asyncio.create_task(self._server_to_client(conn, ureader, cwriter))
            try:
                await asyncio.wait({up, down}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for t in (up, down):
                    t.cancel()
                await asyncio.gather(up, down, return_exceptions=True)
        except asyncio.CancelledError:
            conn.reset()
        finally:
            conn.close()
            self._tasks.discard(task)  # type: ignore[arg-type]

    async def _client_to_server(self, conn: _Conn, reader: asyncio.StreamReader,
                                writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(CHUNK):
                self.stats.requests += 1
                self.stats.request_at.append(time.monotonic())
                if self._rng.random() < self.spike_rate:
                    self.stats.spikes += 1
                    await asyncio.sleep(self.spike_s)
                if self._rng.random() < self.reset_rate:
                    phase = self._rng.choice(PHASES)
                    self.stats.resets[phase] += 1
                    if phase == "before":
                        conn.reset()
                        return
                    conn.cut = phase
                writer.write(data)
                await writer.drain()
            with contextlib.suppress(OSError):
                writer.write_eof()
            await asyncio.sleep(3600)  # half-closed: let the answer finish flowing back
        except OSError:
            conn.reset()

    async def _server_to_client(self, conn: _Conn, reader: asyncio.StreamReader,
                                writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(CHUNK):
                if conn.cut == "after_request":
                    conn.reset()
                    return
                if conn.cut == "mid_response":
                    writer.write(data[: max(1, len(data) // 2)])
                    with contextlib.suppress(OSError):
                        await writer.drain()
                    conn.reset()
                    return
                writer.write(data)
                await writer.drain()
        except OSError:
            conn.reset()
