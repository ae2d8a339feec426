"""A lean blocking HTTP/1.1 keep-alive pool for the sync client's short calls.

httpx spends about a millisecond of CPU per call on building and merging its request and
response models and driving h11; a submit-and-wait round trip to a local node takes about as
long in all. This pool sends the same bytes through ``http.client`` at a fraction of that
cost. It is used only for plain calls (no event streams, no HTTP/2, no custom transport);
everything else still goes through httpx. Failures are raised as the matching httpx
exceptions, so the resilience layer classifies them exactly as it does httpx's own.
"""

from __future__ import annotations

import http.client
import select
import socket
import ssl
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlencode, urlsplit

import httpx


@dataclass(slots=True)
class Reply:
    """The part of an answer the client reads: what httpx.Response would give it."""

    status_code: int
    reason_phrase: str
    headers: dict[str, str]  # lower-case names
    content: bytes


class _Conn:
    __slots__ = ("conn", "idle_since")

    def __init__(self, conn: http.client.HTTPConnection) -> None:
        self.conn = conn
        self.idle_since = time.monotonic()


class Http11Pool:
    """Keep-alive connections to one origin; thread-safe (each call takes its own)."""

    def __init__(self, base_url: str, headers: Mapping[str, str], timeout: httpx.Timeout,
                 max_idle: int = 32, keepalive_expiry: float | None = 4.0) -> None:
        parts = urlsplit(base_url)
        self._https = parts.scheme == "https"
        self._host = parts.hostname or "127.0.0.1"
        self._port = parts.port or (443 if self._https else 80)
        self._prefix = parts.path.rstrip("/")
        self._headers = {**dict(headers), "host": parts.netloc,
                         "accept-encoding": "identity"}
        self._timeout = timeout
        self._max_idle = max_idle
        self._expiry = keepalive_expiry
        self._idle: list[_Conn] = []
        self._lock = threading.Lock()
        self._ssl = ssl.create_default_context() if self._https else None

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for c in idle:
            c.conn.close()

    def request(self, method: str, path: str, params: Mapping[str, object] | None,
                body: bytes | None, headers: Mapping[str, str] | None,
                read_timeout: float | None) -> Reply:
        target = self._prefix + path
        if params:
            target += "?" + urlencode({k: _param(v) for k, v in params.items()})
        all_headers = self._headers if not headers else {**self._headers, **headers}
        if body is not None:
            all_headers = {**all_headers, "content-type": "application/json",
                           "content-length": str(len(body))}
        conn = self._take()
        try:
            sock = conn.conn.sock
            if sock is not None:
                sock.settimeout(self._timeout.write)
            conn.conn.request(method, target, body=body, headers=all_headers)
            if conn.conn.sock is not None:
                conn.conn.sock.settimeout(read_timeout)
            response = conn.conn.getresponse()
            content = response.read()
        except (OSError, http.client.HTTPException) as exc:
            conn.conn.close()
            raise _as_httpx(exc, connected=True) from exc
        except BaseException:
            conn.conn.close()
            raise
        reply = Reply(response.status, response.reason,
                      {k.lower(): v for k, v in response.getheaders()}, content)
        if response.will_close:
            conn.conn.close()
        else:
            self._give_back(conn)
        return reply

    def _take(self) -> _Conn:
        now = time.monotonic()
        while True:
            with self._lock:
                conn = self._idle.pop() if self._idle else None
            if conn is None:
                return self._connect()
            if self._usable(conn, now):
                return conn
            conn.conn.close()

    def _usable(self, conn: _Conn, now: float) -> bool:
        """An idle connection the server may have closed is not reused: a POST sent on it
        could fail after the server had read it, and could not be retried safely."""
        if self._expiry is not None and now - conn.idle_since > self._expiry:
            return False
        sock = conn.conn.sock
        if sock is None:
            return False
        try:
            readable, _, _ = select.select([sock], [], [], 0)
        except (OSError, ValueError):
            return False
        return not readable  # an idle connection has nothing to read unless it was closed

    def _connect(self) -> _Conn:
        conn: http.client.HTTPConnection
        if self._https:
            conn = http.client.HTTPSConnection(self._host, self._port,
                                               timeout=self._timeout.connect,
                                               context=self._ssl)
        else:
            conn = http.client.HTTPConnection(self._host, self._port,
                                              timeout=self._timeout.connect)
        try:
            conn.connect()
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            raise _as_httpx(exc, connected=False) from exc
        if conn.sock is not None:
            conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return _Conn(conn)

    def _give_back(self, conn: _Conn) -> None:
        conn.idle_since = time.monotonic()
        with self._lock:
            if len(self._idle) < self._max_idle:
                self._idle.append(conn)
                return
        conn.conn.close()


def _param(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _as_httpx(exc: OSError | http.client.HTTPException, *,
              connected: bool) -> httpx.TransportError:
    """The httpx exception that stands for ``exc``, so failures classify as httpx's do."""
    text = str(exc) or type(exc).__name__
    if not connected:
        if isinstance(exc, TimeoutError | socket.timeout):
            return httpx.ConnectTimeout(text)
        return httpx.ConnectError(text)
    if isinstance(exc, TimeoutError | socket.timeout):
        return httpx.ReadTimeout(text)
    if isinstance(exc, http.client.RemoteDisconnected | http.client.HTTPException):
        return httpx.RemoteProtocolError(text)
    if isinstance(exc, BrokenPipeError):
        return httpx.WriteError(text)
    return httpx.ReadError(text)
