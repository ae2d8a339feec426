"""A lean asyncio HTTP/1.1 keep-alive pool for the AsyncClient's short calls.

The asyncio twin of :mod:`gpulane.client._http11`: httpx spends several times the CPU of a
whole local round trip on its request and response models, anyio and h11. This pool writes
the request head itself and parses the answer in an :class:`asyncio.Protocol` (no
StreamReader, no task per connection, one timer per call), with the same rules as the sync
pool: plain calls only (event streams, uploads, HTTP/2 and a custom transport stay on httpx),
failures raised as the matching httpx exceptions so the resilience layer classifies them as
httpx's own, ``max_connections`` honoured (a caller waits up to the pool timeout, then
``httpx.PoolTimeout``), idle connections dropped after ``keepalive_expiry``.

A connection the server closed while it sat idle is seen (``eof_received``) and not reused.
One that closes under a request before any byte of the answer came back was most likely
closed for idleness just as the request left: the request is sent again once, on a fresh
connection, only when it is safe to repeat (the caller says so).
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections import deque
from collections.abc import Mapping
from urllib.parse import quote, urlencode, urlsplit

import httpx

from gpulane.client._http11 import Reply, _param

MAX_HEAD = 64 * 1024
"""Longest answer head (status line and headers) read before the answer is refused."""
MAX_LINE = 4096
"""Longest chunk-size or trailer line of a chunked answer."""

# Parser states of one connection.
_IDLE, _HEAD, _LENGTH, _CHUNK_SIZE, _CHUNK_DATA, _TRAILER, _UNTIL_CLOSE = range(7)
_PATH_SAFE = "/:@!$&'()*+,;=-._~%"


class _BadAnswer(Exception):
    """The server's bytes are not an HTTP/1.1 answer."""


class _Conn(asyncio.Protocol):
    """One connection: writes a request, parses its answer into a future."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.answered = 0  # answers read: a reused connection may have been closed for idleness
        self.idle_since = 0.0
        self.got_bytes = False  # any byte of the current answer
        self._buf = bytearray()
        self._waiter: asyncio.Future[Reply] | None = None
        self._drained: asyncio.Future[None] | None = None
        self._paused = False
        self._state = _IDLE
        self._no_body = False
        self._status = 0
        self._reason = ""
        self._headers: dict[str, str] = {}
        self._keep_alive = True
        self._left = 0
        self._parts: list[bytes] = []

    # --- asyncio.Protocol ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if self._waiter is None or self._waiter.done():
            self.close()  # bytes nobody asked for: the connection cannot be trusted again
            return
        self.got_bytes = True
        self._buf += data
        try:
            self._parse()
        except _BadAnswer as exc:
            self._fail(httpx.RemoteProtocolError(str(exc)))

    def eof_received(self) -> bool:
        self.closed = True
        if self._state == _UNTIL_CLOSE:
            self._finish(bytes(self._buf))
        elif self._state != _IDLE:
            self._fail(httpx.RemoteProtocolError(
                "the server closed the connection mid-answer" if self.got_bytes
                else "the server disconnected without sending an answer"))
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._state == _UNTIL_CLOSE and exc is None:
            self._finish(bytes(self._buf))
        elif self._state != _IDLE:
            self._fail(httpx.ReadError(str(exc)) if exc is not None else
                       httpx.RemoteProtocolError("the server disconnected without an answer"))
        drained, self._drained = self._drained, None
        if drained is not None and not drained.done():
            drained.set_exception(httpx.WriteError(str(exc) or "connection lost"))

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        drained, self._drained = self._drained, None
        if drained is not None and not drained.done():
            drained.set_result(None)

    # --- one exchange ---------------------------------------------------------------------

    def send(self, data: bytes, head_only: bool) -> asyncio.Future[Reply]:
        """Write one request; the future gets its answer (or the httpx error)."""
        assert self.transport is not None and self._state == _IDLE
        self._waiter = waiter = self.loop.create_future()
        self._state, self._no_body, self.got_bytes = _HEAD, head_only, False
        self.transport.write(data)
        return waiter

    @property
    def writing_paused(self) -> bool:
        """The transport's write buffer is over its high-water mark (a big request body)."""
        return self._paused

    async def drained(self) -> None:
        """Returns once the transport's write buffer is below its high-water mark."""
        if self._paused and not self.closed:
            self._drained = self.loop.create_future()
            await self._drained

    def time_out(self) -> None:
        self._fail(httpx.ReadTimeout("timed out waiting for the answer"))

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    def _fail(self, exc: Exception) -> None:
        self._state = _IDLE
        waiter, self._waiter = self._waiter, None
        self.abort()
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)

    def _finish(self, body: bytes) -> None:
        self._state = _IDLE
        self.answered += 1
        self._buf.clear()
        waiter, self._waiter = self._waiter, None
        if not self._keep_alive:
            self.close()
        if waiter is not None and not waiter.done():
            waiter.set_result(Reply(self._status, self._reason, self._headers, body))

    # --- the answer's parser --------------------------------------------------------------

    def _parse(self) -> None:
        buf = self._buf
        while self._state == _HEAD:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > MAX_HEAD:
                    raise _BadAnswer(f"the answer's head is over {MAX_HEAD} bytes")
                return
            head = bytes(buf[:end])
            del buf[:end + 4]
            self._read_head(head)
        if self._state == _LENGTH:
            if len(buf) >= self._left:
                if len(buf) > self._left:
                    self._keep_alive = False  # more than it announced: do not reuse
                self._finish(bytes(buf[:self._left]))
        elif self._state in (_CHUNK_SIZE, _CHUNK_DATA, _TRAILER):
            self._read_chunks()

    def _read_head(self, head: bytes) -> None:
        lines = head.split(b"\r\n")
        version, _, rest = lines[0].partition(b" ")
        code, _, reason = rest.partition(b" ")
        if version not in (b"HTTP/1.1", b"HTTP/1.0") or len(code) != 3 or not code.isdigit():
            raise _BadAnswer(f"not an HTTP/1.1 status line: {lines[0][:100]!r}")
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if not sep or not name or name != name.strip():
                raise _BadAnswer(f"not a header line: {line[:100]!r}")
            key, text = name.decode("latin-1").lower(), value.strip().decode("latin-1")
            headers[key] = f"{headers[key]}, {text}" if key in headers else text
        status = int(code)
        if status < 200:
            if status == 101:
                raise _BadAnswer("the server switched protocols")
            return  # an informational answer (100 Continue): the real one follows
        self._status, self._reason, self._headers = status, reason.decode("latin-1"), headers
        connection = headers.get("connection", "").lower()
        self._keep_alive = ("close" not in connection if version == b"HTTP/1.1"
                            else "keep-alive" in connection)
        encoding = headers.get("transfer-encoding")
        length = headers.get("content-length")
        if self._no_body or status in (204, 304):
            self._state, self._left = _LENGTH, 0
        elif encoding is not None:
            if encoding.lower() != "chunked":
                raise _BadAnswer(f"unsupported transfer-encoding {encoding!r}")
            self._state, self._parts = _CHUNK_SIZE, []
        elif length is not None:
            if not length.isdigit():
                raise _BadAnswer(f"not a content-length: {length[:100]!r}")
            self._state, self._left = _LENGTH, int(length)
        else:
            self._state, self._keep_alive = _UNTIL_CLOSE, False

    def _read_chunks(self) -> None:
        buf, pos = self._buf, 0
        try:
            while True:
                if self._state == _CHUNK_DATA:
                    end = pos + self._left
                    if len(buf) < end + 2:
                        return
                    if buf[end:end + 2] != b"\r\n":
                        raise _BadAnswer("a chunk does not end with CRLF")
                    self._parts.append(bytes(buf[pos:end]))
                    pos, self._state = end + 2, _CHUNK_SIZE
                    continue
                eol = buf.find(b"\r\n", pos)
                if eol < 0:
                    if len(buf) - pos > MAX_LINE:
                        raise _BadAnswer("a chunk-size or trailer line is too long")
                    return
                line, pos = bytes(buf[pos:eol]), eol + 2
                if self._state == _TRAILER:
                    if not line:
                        if pos < len(buf):
                            self._keep_alive = False  # bytes after the answer: do not reuse
                        del buf[:pos]
                        pos = 0
                        self._finish(b"".join(self._parts))
                        return
                    continue
                size = line.split(b";", 1)[0].strip()
                try:
                    self._left = int(size, 16)
                except ValueError:
                    raise _BadAnswer(f"not a chunk size: {size[:100]!r}") from None
                if self._left < 0 or size[:1] in (b"-", b"+"):
                    raise _BadAnswer(f"not a chunk size: {size[:100]!r}")
                self._state = _TRAILER if self._left == 0 else _CHUNK_DATA
        finally:
            if pos:
                del buf[:pos]


class AsyncHttp11Pool:
    """Keep-alive connections to one origin, on the event loop of the calls that use it."""

    def __init__(self, base_url: str, headers: Mapping[str, str], timeout: httpx.Timeout,
                 max_connections: int | None = 100, max_idle: int = 32,
                 keepalive_expiry: float | None = 4.0) -> None:
        parts = urlsplit(base_url)
        self._https = parts.scheme == "https"
        self._host = parts.hostname or "127.0.0.1"
        self._port = parts.port or (443 if self._https else 80)
        self._prefix = parts.path.rstrip("/")
        fixed = {**{k.lower(): v for k, v in headers.items()}, "host": parts.netloc,
                 "accept-encoding": "identity"}
        self._fixed_names = frozenset(fixed)
        self._fixed = "".join(f"{k}: {_checked(v)}\r\n" for k, v in fixed.items())
        self._headers = fixed
        self._timeout = timeout
        self._max = max_connections
        self._max_idle = max_idle
        self._expiry = keepalive_expiry
        self._ssl = ssl.create_default_context() if self._https else None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._idle: list[_Conn] = []
        self._open = 0  # connections open, in use or being opened (what max_connections caps)
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._closed = False

    async def aclose(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, []
        for conn in idle:
            self._open -= 1
            conn.close()

    async def request(self, method: str, path: str, params: Mapping[str, object] | None,
                      body: bytes | None, headers: Mapping[str, str] | None,
                      read_timeout: float | None, repeatable: bool) -> Reply:
        """One exchange. ``repeatable``: the request is safe to send twice (sent again once
        when a reused connection turns out to have been closed under it)."""
        data = self._encode(method, path, params, body, headers)
        head_only = method == "HEAD"
        conn = await self._take()
        try:
            return await self._exchange(conn, data, head_only, read_timeout)
        except (httpx.RemoteProtocolError, httpx.ReadError):
            if not (repeatable and conn.answered and not conn.got_bytes):
                raise
        conn = await self._take(fresh=True)
        return await self._exchange(conn, data, head_only, read_timeout)

    def _encode(self, method: str, path: str, params: Mapping[str, object] | None,
                body: bytes | None, headers: Mapping[str, str] | None) -> bytes:
        target = quote(self._prefix + path, safe=_PATH_SAFE)
        if params:
            target += "?" + urlencode({k: _param(v) for k, v in params.items()})
        lines = [f"{method} {target} HTTP/1.1\r\n"]
        if headers and not self._fixed_names.isdisjoint(k.lower() for k in headers):
            merged = {**self._headers, **{k.lower(): v for k, v in headers.items()}}
            lines.extend(f"{k}: {_checked(v)}\r\n" for k, v in merged.items())
        else:
            lines.append(self._fixed)
            if headers:
                lines.extend(f"{_checked(k)}: {_checked(v)}\r\n" for k, v in headers.items())
        if body is not None:
            lines.append(f"content-type: application/json\r\ncontent-length: {len(body)}\r\n")
        lines.append("\r\n")
        data = "".join(lines).encode("latin-1")
        return data if body is None else data + body

    async def _exchange(self, conn: _Conn, data: bytes, head_only: bool,
                        read_timeout: float | None) -> Reply:
        try:
            waiter = conn.send(data, head_only)
            if conn.writing_paused:
                try:
                    async with asyncio.timeout(self._timeout.write):
                        await conn.drained()
                except TimeoutError:
                    raise httpx.WriteTimeout("timed out writing the request") from None
            timer = (None if read_timeout is None
                     else conn.loop.call_later(read_timeout, conn.time_out))
            try:
                reply = await waiter
            finally:
                if timer is not None:
                    timer.cancel()
        except BaseException:
            self._drop(conn, abort=True)  # cancelled or failed mid-exchange: state unknown
            raise
        self._give_back(conn)
        return reply

    async def _take(self, fresh: bool = False) -> _Conn:
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            self._rebind(loop)
        if self._closed:
            raise RuntimeError("the client has been closed")
        deadline: float | None = None
        while True:
            now = time.monotonic()
            while self._idle and not fresh:
                conn = self._idle.pop()
                if not conn.closed and (self._expiry is None
                                        or now - conn.idle_since <= self._expiry):
                    return conn
                self._drop(conn)
            if self._max is None or self._open < self._max:
                return await self._connect(loop)
            if fresh and self._idle:
                self._drop(self._idle.pop(0))  # make room: the oldest idle one goes
                continue
            if deadline is None and self._timeout.pool is not None:
                deadline = now + self._timeout.pool
            await self._wait_for_room(loop, None if deadline is None else deadline - now)

    async def _wait_for_room(self, loop: asyncio.AbstractEventLoop,
                             timeout: float | None) -> None:
        room = loop.create_future()
        self._waiters.append(room)
        try:
            async with asyncio.timeout(timeout):
                await room
        except BaseException as exc:
            if room.done():
                self._wake()  # woken, then cancelled or timed out: pass the room on
            else:
                self._waiters.remove(room)
            if isinstance(exc, TimeoutError):
                raise httpx.PoolTimeout(
                    f"no connection free within {timeout} s ({self._max} in use)") from None
            raise

    async def _connect(self, loop: asyncio.AbstractEventLoop) -> _Conn:
        self._open += 1
        try:
            async with asyncio.timeout(self._timeout.connect):
                _, conn = await loop.create_connection(
                    lambda: _Conn(loop), self._host, self._port, ssl=self._ssl,
                    server_hostname=self._host if self._ssl is not None else None)
        except BaseException as exc:
            self._open -= 1
            self._wake()
            if isinstance(exc, TimeoutError):
                raise httpx.ConnectTimeout(f"connecting to {self._host}:{self._port} timed out"
                                           ) from exc
            if isinstance(exc, OSError):
                raise httpx.ConnectError(str(exc) or type(exc).__name__) from exc
            raise
        return conn

    def _give_back(self, conn: _Conn) -> None:
        if conn.closed or self._closed or len(self._idle) >= self._max_idle:
            self._drop(conn)
            return
        conn.idle_since = time.monotonic()
        self._idle.append(conn)
        self._wake()

    def _drop(self, conn: _Conn, abort: bool = False) -> None:
        if abort:
            conn.abort()
        else:
            conn.close()
        self._open -= 1
        self._wake()

    def _wake(self) -> None:
        while self._waiters:
            room = self._waiters.popleft()
            if not room.done():
                room.set_result(None)
                return

    def _rebind(self, loop: asyncio.AbstractEventLoop) -> None:
        """The client is used from another event loop: the old loop's connections are its own
        (and that loop is most likely closed); start afresh on this one."""
        for conn in self._idle:
            try:
                conn.abort()
            except RuntimeError:
                pass  # its loop is closed: the socket goes with it
        self._loop, self._idle, self._open, self._waiters = loop, [], 0, deque()


def _checked(text: str) -> str:
    """A header name or value that cannot break the request head (as http.client refuses)."""
    if "\r" in text or "\n" in text:
        raise ValueError(f"invalid header name or value {text!r}")
    return text
