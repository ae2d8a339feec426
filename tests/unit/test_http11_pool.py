"""The sync client's lean HTTP/1.1 pool against a real local HTTP server."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from gpulane.client import Client
from gpulane.client import _core as core
from gpulane.client._http11 import Http11Pool
from gpulane.errors import APIError, TransportError
from tests.conftest import free_port

TIMEOUT = httpx.Timeout(connect=2.0, read=2.0, write=2.0, pool=2.0)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    seen: list[tuple[str, str, dict[str, str], bytes, int]] = []

    def log_message(self, *args: object) -> None:
        pass

    def _answer(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(length) if length else b""
        Handler.seen.append((self.command, self.path,
                             {k.lower(): v for k, v in self.headers.items()}, body,
                             self.connection.getpeername()[1]))
        if self.path.startswith("/slow"):
            time.sleep(0.5)
        if self.path.startswith("/busy"):
            payload = b'{"error":{"code":"busy","message":"later"}}'
            self.send_response(503)
            self.send_header("retry-after", "7")
        elif self.path.startswith("/close"):
            payload = b'{"ok":true}'
            self.send_response(200)
            self.send_header("connection", "close")
        else:
            payload = json.dumps({"path": self.path, "echo": body.decode()}).encode()
            self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    do_GET = do_POST = _answer


@pytest.fixture
def server() -> Iterator[str]:
    Handler.seen = []
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.daemon_threads = True
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


def test_calls_reuse_one_keep_alive_connection_and_send_the_body(server: str) -> None:
    pool = Http11Pool(server, {"authorization": "Bearer t"}, TIMEOUT)
    r1 = pool.request("POST", "/v1/tasks", {"wait": 1.5, "flag": True}, b'{"a":1}', None, 2.0)
    r2 = pool.request("GET", "/v1/tasks/x", None, None, {"idempotency-key": "k"}, 2.0)
    assert r1.status_code == 200 and json.loads(r1.content) == {
        "path": "/v1/tasks?wait=1.5&flag=true", "echo": '{"a":1}'}
    assert r2.status_code == 200 and r2.headers["content-type"] == "application/json"
    (m1, _, h1, _, port1), (m2, _, h2, _, port2) = Handler.seen
    assert (m1, m2) == ("POST", "GET") and port1 == port2  # one connection
    assert h1["authorization"] == "Bearer t" and h1["content-type"] == "application/json"
    assert h2["idempotency-key"] == "k"
    pool.close()


def test_a_connection_the_server_closed_is_not_reused(server: str) -> None:
    pool = Http11Pool(server, {}, TIMEOUT)
    pool.request("GET", "/close", None, None, None, 2.0)  # answered with connection: close
    pool.request("GET", "/a", None, None, None, 2.0)
    pool.request("GET", "/b", None, None, None, 2.0)
    ports = [s[4] for s in Handler.seen]
    assert ports[0] != ports[1] and ports[1] == ports[2]
    pool.close()


def test_an_idle_connection_past_its_expiry_is_replaced(server: str) -> None:
    pool = Http11Pool(server, {}, TIMEOUT, keepalive_expiry=0.05)
    pool.request("GET", "/a", None, None, None, 2.0)
    time.sleep(0.1)
    pool.request("GET", "/b", None, None, None, 2.0)
    assert Handler.seen[0][4] != Handler.seen[1][4]
    pool.close()


def test_failures_are_raised_as_httpx_errors() -> None:
    port = free_port()
    pool = Http11Pool(f"http://127.0.0.1:{port}", {}, TIMEOUT)
    with pytest.raises(httpx.ConnectError):
        pool.request("GET", "/", None, None, None, 1.0)
    # A server that accepts and never answers: the read timeout.
    listener = socket.create_server(("127.0.0.1", 0))
    try:
        pool = Http11Pool(f"http://127.0.0.1:{listener.getsockname()[1]}", {}, TIMEOUT)
        with pytest.raises(httpx.ReadTimeout):
            pool.request("GET", "/", None, None, None, 0.1)
    finally:
        listener.close()


def test_the_client_maps_pool_answers_and_failures_like_httpx(server: str) -> None:
    with Client(server, retry=None, breaker=None, budget=None) as c:
        assert c._fast is not None
        assert c.get("abc")["path"] == "/v1/tasks/abc"
        with pytest.raises(APIError) as err:
            c._call(core.simple_get("/busy"))
        assert err.value.status == 503 and err.value.retry_after == 7
    with Client(f"http://127.0.0.1:{free_port()}", retry=None, breaker=None,
                budget=None) as c, pytest.raises(TransportError) as terr:
        c.get("abc")
    assert terr.value.transient and isinstance(terr.value.__cause__, httpx.ConnectError)
