"""The Redis store's own connection: one socket, every call pipelined on it, hiredis parsing.

Why not redis-py's pool here: a call through it costs about 85 us on loopback, this one about
30 us (measured with PING on an idle machine): no connection checked out and back per call,
no retry wrapper, one write of a preformatted command. Every store method is one call, so
that difference is most of what a Redis store adds to a task's round trip over SQLite's. The
calls of all coroutines share the socket; Redis answers in order, so a queue of futures pairs
each reply with its call. redis-py still serves what blocks (XREAD BLOCK, SUBSCRIBE).

Failure: a connection that cannot be made within ``CONNECT_TIMEOUT_S``, is refused, drops, or
leaves a call unanswered for ``REPLY_TIMEOUT_S`` fails every call on it with
:class:`RedisDown` (the store turns it into StoreUnavailableError); the next call connects
again, so the store needs no reconnect loop of its own.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import logging
import ssl
from collections.abc import Callable
from typing import Any, cast

import hiredis
from redis.asyncio.connection import parse_url

log = logging.getLogger("gpulane.store")

CONNECT_TIMEOUT_S = 1.0
"""How long a call waits for a TCP connection to Redis before it fails."""

REPLY_TIMEOUT_S = 5.0
"""How long a call waits for its reply (every script is short) before the connection is
dropped as dead."""


PASSING_ERRORS = ("LOADING", "BUSY", "READONLY", "MASTERDOWN", "TRYAGAIN")
"""Error replies of a Redis that cannot serve now but will (503 store_unavailable, not a 500):
reading its data back after a restart, a script running long, a replica (a failover under
way), a replica cut off its primary."""


class RedisDown(Exception):
    """Redis cannot be reached, or stopped answering: the call may or may not have run."""


class RedisReplyError(Exception):
    """Redis refused a command (a script error, a wrong type): a bug, not an outage."""


class _Protocol(asyncio.Protocol):
    def __init__(self) -> None:
        self.reader = hiredis.Reader()
        self.pending: collections.deque[asyncio.Future[Any]] = collections.deque()
        self.transport: asyncio.Transport | None = None
        self.lost: BaseException | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A cast, not an isinstance check: uvloop's transports (uvicorn's loop under
        # ``gpulane serve``) do not subclass asyncio.Transport.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        while (reply := self.reader.gets()) is not False:
            fut = self.pending.popleft()
            if not fut.done():
                fut.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = self.lost or exc or ConnectionResetError("Redis closed the connection")
        self.transport = None
        while self.pending:
            fut = self.pending.popleft()
            if not fut.done():
                fut.set_exception(RedisDown(str(self.lost)))


class _Subscriber(asyncio.Protocol):
    """A connection in subscribe mode: each message's data goes to ``on_message``; ``ready``
    resolves once subscribed, ``lost`` when the connection ends."""

    def __init__(self, on_message: Callable[[bytes], None]) -> None:
        self.reader = hiredis.Reader()
        self.on_message = on_message
        loop = asyncio.get_running_loop()
        self.ready: asyncio.Future[None] = loop.create_future()
        self.lost: asyncio.Future[None] = loop.create_future()

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        while (reply := self.reader.gets()) is not False:
            if isinstance(reply, list) and reply and reply[0] == b"message":
                try:
                    self.on_message(reply[2])
                except Exception:  # a malformed message (a stray client, another version)
                    # must not end the subscription: its wake-ups would be lost meanwhile.
                    log.exception("store: a message on the wake-up channel failed: %.200r",
                                  reply[2])
            elif not self.ready.done():
                if isinstance(reply, hiredis.ReplyError):
                    self.ready.set_exception(RedisReplyError(str(reply)))
                elif isinstance(reply, list) and reply and reply[0] == b"subscribe":
                    self.ready.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.ready.done():
            self.ready.set_exception(RedisDown(f"the connection dropped ({exc!r})"))
        if not self.lost.done():
            self.lost.set_result(None)


def _pack(args: tuple[Any, ...]) -> bytes:
    """One command in RESP: an array of bulk strings (type checks, not isinstance: a
    batch's command has thousands of arguments, and this is 2.5 times faster)."""
    enc = [a if type(a) is bytes else (a.encode() if type(a) is str else str(a).encode())
           for a in args]
    out = [b"*%d\r\n" % len(enc)]
    for b in enc:
        out.append(b"$%d\r\n" % len(b))
        out.append(b)
        out.append(b"\r\n")
    return b"".join(out)


class RespConnection:
    """Calls to one Redis server over one pipelined connection, made on first use."""

    def __init__(self, url: str) -> None:
        opts = parse_url(url)
        self.host: str = opts.get("host", "localhost")
        self.port: int = int(opts.get("port", 6379))
        self.db: int = int(opts.get("db", 0))
        self.username: str | None = opts.get("username")
        self.password: str | None = opts.get("password")
        self.tls = url.startswith("rediss://")
        self._proto: _Protocol | None = None
        self._connecting = asyncio.Lock()
        self._shas: dict[str, bytes] = {}
        self.closed = False
        """Set by ``close``: a call after it fails instead of opening a connection that
        nothing would close (``open`` clears it)."""

    def open(self) -> None:
        """Take calls again after ``close``."""
        self.closed = False

    async def _connected(self) -> _Protocol:
        if self.closed:
            raise RedisDown(f"the connection to {self.host}:{self.port} was closed with its "
                            "store")
        proto = self._proto
        if proto is not None and proto.transport is not None:
            return proto
        async with self._connecting:  # callers arriving meanwhile share one attempt
            proto = self._proto
            if proto is not None and proto.transport is not None:
                return proto
            loop = asyncio.get_running_loop()
            try:
                _, fresh = await asyncio.wait_for(loop.create_connection(
                    _Protocol, self.host, self.port,
                    ssl=ssl.create_default_context() if self.tls else None), CONNECT_TIMEOUT_S)
            except (OSError, TimeoutError) as exc:
                raise RedisDown(f"cannot connect to {self.host}:{self.port} ({exc!r})") from exc
            # Log in and pick the database before any other call can use the connection; a
            # refusal (a wrong password) or a cancel meanwhile closes it, else it leaks.
            try:
                if self.password is not None:
                    auth = ((self.username, self.password) if self.username
                            else (self.password,))
                    await self._reply(fresh, ("AUTH", *auth))
                if self.db:
                    await self._reply(fresh, ("SELECT", self.db))
            except BaseException:
                if fresh.transport is not None:
                    fresh.transport.abort()
                raise
            if self.closed:  # closed while it connected: nothing would close it later
                if fresh.transport is not None:
                    fresh.transport.abort()
                raise RedisDown(f"the connection to {self.host}:{self.port} was closed with "
                                "its store")
            self._proto = fresh
            return fresh

    async def call(self, *args: Any) -> Any:
        """One command's reply; RedisReplyError for an error reply, RedisDown when the
        server cannot be reached or does not answer in time."""
        return await self._reply(await self._connected(), args)

    async def _reply(self, proto: _Protocol, args: tuple[Any, ...]) -> Any:
        if proto.transport is None:
            raise RedisDown(f"the connection to {self.host}:{self.port} dropped")
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        proto.pending.append(fut)
        proto.transport.write(_pack(args))
        # A caller cancelled meanwhile leaves its future in the queue (done), so the order
        # of replies holds; a reply that never comes drops the connection (``_stalled``).
        timer = loop.call_later(REPLY_TIMEOUT_S, self._stalled, proto)
        try:
            reply = await fut
        finally:
            timer.cancel()
        if isinstance(reply, hiredis.ReplyError):
            raise RedisReplyError(str(reply))
        return reply

    async def script(self, source: str, *args: Any) -> Any:
        """EVALSHA of ``source``, loading it first when the server does not have it (a new or
        restarted server)."""
        sha = self._shas.get(source)
        if sha is None:
            sha = self._shas[source] = hashlib.sha1(source.encode()).hexdigest().encode()
        try:
            return await self.call("EVALSHA", sha, 0, *args)
        except RedisReplyError as exc:
            if not str(exc).startswith("NOSCRIPT"):
                raise
        await self.call("SCRIPT", "LOAD", source)
        return await self.call("EVALSHA", sha, 0, *args)

    async def subscribe(self, channel: str, on_message: Callable[[bytes], None]
                        ) -> tuple[asyncio.Transport, asyncio.Future[None]]:
        """A connection of its own subscribed to ``channel``: its transport (close it to
        stop) and a future that resolves when it ends. RedisDown when it cannot be made."""
        loop = asyncio.get_running_loop()
        try:
            transport, sub = await asyncio.wait_for(loop.create_connection(
                lambda: _Subscriber(on_message), self.host, self.port,
                ssl=ssl.create_default_context() if self.tls else None), CONNECT_TIMEOUT_S)
        except (OSError, TimeoutError) as exc:
            raise RedisDown(f"cannot connect to {self.host}:{self.port} ({exc!r})") from exc
        auth = () if self.password is None else (
            ("AUTH", self.username, self.password) if self.username else ("AUTH", self.password))
        transport.write((_pack(auth) if auth else b"") + _pack(("SUBSCRIBE", channel)))
        try:
            await asyncio.wait_for(asyncio.shield(sub.ready), REPLY_TIMEOUT_S)
        except BaseException as exc:
            transport.abort()
            if isinstance(exc, TimeoutError):
                raise RedisDown(f"{self.host}:{self.port} did not subscribe in time") from exc
            raise
        return transport, sub.lost

    def _stalled(self, proto: _Protocol) -> None:
        """A call went unanswered for REPLY_TIMEOUT_S: replies pair with calls by order, so
        once one is lost none after it can be trusted. Drop the connection (failing every
        call on it); the next call connects again."""
        if proto.transport is not None:
            proto.lost = TimeoutError(f"no reply from {self.host}:{self.port} within "
                                      f"{REPLY_TIMEOUT_S} s")
            proto.transport.abort()

    def close(self) -> None:
        self.closed = True
        if self._proto is not None and self._proto.transport is not None:
            self._proto.transport.close()
        self._proto = None
