"""The AsyncClient's lean asyncio HTTP/1.1 pool against a tiny asyncio HTTP server."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import httpx
import pytest

from gpulane.client import AsyncClient
from gpulane.client import _core as core
from gpulane.client._http11_async import AsyncHttp11Pool
from gpulane.errors import APIError, TransportError
from tests.conftest import eventually, free_port

TIMEOUT = httpx.Timeout(connect=2.0, read=2.0, write=2.0, pool=2.0)
BIG = bytes(range(256)) * 20_000  # 5 MB


@dataclass
class Seen:
    method: str
    target: str
    headers: dict[str, str]
    body: bytes
    conn: int  # which connection (the server numbers them)
    nth: int  # the request's place on its connection, from 1


@dataclass
class Server:
    url: str
    seen: list[Seen] = field(default_factory=list)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    connections: int = 0


Answer = Callable[[Seen, asyncio.StreamWriter], Awaitable[bool]]


def _json(status: int, payload: object, *extra: str) -> bytes:
    body = json.dumps(payload).encode()
    head = [f"HTTP/1.1 {status} X", "content-type: application/json",
            f"content-length: {len(body)}", *extra]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def _chunked(body: bytes, size: int) -> bytes:
    out = [b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"]
    for i in range(0, len(body), size):
        part = body[i:i + size]
        out.append(f"{len(part):x};ext=1\r\n".encode() + part + b"\r\n")
    out.append(b"0\r\nx-trailer: yes\r\n\r\n")
    return b"".join(out)


async def _answer(server: Server, seen: Seen, writer: asyncio.StreamWriter) -> bool:
    """Writes the answer that ``seen.target`` asks for; False to close the connection."""
    path = seen.target.split("?")[0]
    if path == "/hold":
        await server.release.wait()
    if path == "/silent":
        await asyncio.sleep(30)
    if path == "/drop-if-reused" and seen.nth > 1:
        return False  # closed under the request, before any byte of the answer
    if path == "/garbage":
        writer.write(b"HELLO WORLD\r\n\r\n")
    elif path == "/chunked":
        writer.write(_chunked(b'{"chunked": true, "pad": "' + b"x" * 5000 + b'"}', 700))
    elif path == "/big":
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % len(BIG) + BIG)
    elif path == "/big-chunked":
        writer.write(_chunked(BIG, 65_536))
    elif path == "/until-close":
        writer.write(b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\n" + BIG)
        return False
    elif path == "/continue":
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n" + _json(200, {"after": "continue"}))
    elif path == "/close":
        writer.write(_json(200, {"ok": True}, "connection: close"))
        return False
    elif path == "/then-close":
        writer.write(_json(200, {"ok": True}))
        return False  # keep-alive announced, closed anyway (an idle timeout)
    elif path == "/busy":
        writer.write(_json(503, {"error": {"code": "busy", "message": "later"}},
                           "retry-after: 7"))
    else:
        writer.write(_json(200, {"method": seen.method, "target": seen.target,
                                 "body": seen.body.decode()}))
    return True


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    srv = Server("")

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        srv.connections += 1
        conn, nth = srv.connections, 0
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, target, _ = lines[0].split(" ")
                headers = {k.lower(): v.strip() for k, _, v in
                           (line.partition(":") for line in lines[1:] if line)}
                body = await reader.readexactly(int(headers.get("content-length", 0)))
                nth += 1
                seen = Seen(method, target, headers, body, conn, nth)
                srv.seen.append(seen)
                keep = await _answer(srv, seen, writer)
                await writer.drain()
                if not keep:
                    break
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass  # the client went, or the test ended with the connection open
        finally:
            writer.close()

    listener = await asyncio.start_server(handle, "127.0.0.1", 0)
    srv.url = f"http://127.0.0.1:{listener.sockets[0].getsockname()[1]}"
    try:
        yield srv
    finally:
        srv.release.set()
        listener.close()


def _pool(server: Server, timeout: httpx.Timeout = TIMEOUT, max_connections: int | None = 100,
          keepalive_expiry: float | None = 4.0) -> AsyncHttp11Pool:
    return AsyncHttp11Pool(server.url, {"Authorization": "Bearer t"}, timeout,
                           max_connections=max_connections, keepalive_expiry=keepalive_expiry)


async def test_calls_reuse_one_keep_alive_connection_and_send_the_body(server: Server) -> None:
    pool = _pool(server)
    r1 = await pool.request("POST", "/v1/tasks", {"wait": 1.5, "flag": True}, b'{"a":1}',
                            {"Idempotency-Key": "k"}, 2.0, True)
    r2 = await pool.request("GET", "/v1/tasks/x", None, None, None, 2.0, True)
    assert r1.status_code == 200 and json.loads(r1.content) == {
        "method": "POST", "target": "/v1/tasks?wait=1.5&flag=true", "body": '{"a":1}'}
    assert r2.status_code == 200 and r2.headers["content-type"] == "application/json"
    first, second = server.seen
    assert first.conn == second.conn == 1 and server.connections == 1
    assert first.headers["authorization"] == "Bearer t"
    assert first.headers["content-type"] == "application/json"
    assert first.headers["idempotency-key"] == "k" and "idempotency-key" not in second.headers
    await pool.aclose()


async def test_chunked_big_until_close_and_informational_answers_are_read_whole(
        server: Server) -> None:
    pool = _pool(server)
    chunked = await pool.request("GET", "/chunked", None, None, None, 2.0, True)
    assert json.loads(chunked.content) == {"chunked": True, "pad": "x" * 5000}
    assert (await pool.request("GET", "/big", None, None, None, 5.0, True)).content == BIG
    assert (await pool.request("GET", "/big-chunked", None, None, None, 5.0, True)
            ).content == BIG
    cont = await pool.request("GET", "/continue", None, None, None, 2.0, True)
    assert cont.status_code == 200 and json.loads(cont.content) == {"after": "continue"}
    assert server.connections == 1  # every one of those kept the connection
    closing = await pool.request("GET", "/until-close", None, None, None, 5.0, True)
    assert closing.content == BIG
    await pool.request("GET", "/after", None, None, None, 2.0, True)
    assert server.connections == 2
    await pool.aclose()


async def test_a_big_request_body_is_sent_whole(server: Server) -> None:
    pool = _pool(server)
    body = json.dumps({"x": "y" * 3_000_000}).encode()
    reply = await pool.request("POST", "/echo", None, body, None, 5.0, True)
    assert json.loads(reply.content)["body"] == body.decode()
    await pool.aclose()


async def test_a_connection_the_server_closed_is_not_reused(server: Server) -> None:
    pool = _pool(server)
    await pool.request("GET", "/close", None, None, None, 2.0, True)  # connection: close
    await pool.request("GET", "/then-close", None, None, None, 2.0, True)  # closed silently

    async def seen_closed() -> bool:
        return all(conn.closed for conn in pool._idle)

    await eventually(seen_closed)
    await pool.request("GET", "/a", None, None, None, 2.0, True)
    await pool.request("GET", "/b", None, None, None, 2.0, True)
    assert [s.conn for s in server.seen] == [1, 2, 3, 3]
    await pool.aclose()


async def test_a_reused_connection_closed_under_a_request_retries_only_a_safe_one(
        server: Server) -> None:
    pool = _pool(server)
    await pool.request("GET", "/drop-if-reused", None, None, None, 2.0, True)
    again = await pool.request("GET", "/drop-if-reused", None, None, None, 2.0, True)
    assert again.status_code == 200
    assert [(s.conn, s.nth) for s in server.seen] == [(1, 1), (1, 2), (2, 1)]
    with pytest.raises(httpx.RemoteProtocolError):
        await pool.request("POST", "/drop-if-reused", None, b"{}", None, 2.0, False)
    assert [(s.conn, s.nth) for s in server.seen][-1] == (2, 2)  # sent once, not repeated
    await pool.aclose()


async def test_an_idle_connection_past_its_expiry_is_replaced(server: Server) -> None:
    pool = _pool(server, keepalive_expiry=4.0)
    await pool.request("GET", "/a", None, None, None, 2.0, True)
    pool._idle[0].idle_since -= 5.0  # idle for longer than the expiry
    await pool.request("GET", "/b", None, None, None, 2.0, True)
    assert [s.conn for s in server.seen] == [1, 2]
    await pool.aclose()


async def test_failures_are_raised_as_httpx_errors(server: Server) -> None:
    pool = AsyncHttp11Pool(f"http://127.0.0.1:{free_port()}", {}, TIMEOUT)
    with pytest.raises(httpx.ConnectError):
        await pool.request("GET", "/", None, None, None, 1.0, True)
    pool = _pool(server)
    with pytest.raises(httpx.ReadTimeout):
        await pool.request("GET", "/silent", None, None, None, 0.05, True)
    with pytest.raises(httpx.RemoteProtocolError, match="status line"):
        await pool.request("GET", "/garbage", None, None, None, 2.0, True)
    assert pool._open == 0 and not pool._idle  # both broken connections were dropped
    assert (await pool.request("GET", "/ok", None, None, None, 2.0, True)).status_code == 200
    with pytest.raises(ValueError, match="invalid header"):
        await pool.request("GET", "/x", None, None, {"x-a": "1\r\nx-b: 2"}, 2.0, True)
    await pool.aclose()


async def test_max_connections_is_honoured_and_a_dry_pool_times_out(server: Server) -> None:
    pool = _pool(server, max_connections=1)
    held = asyncio.create_task(pool.request("GET", "/hold", None, None, None, 5.0, True))
    waiting = asyncio.create_task(pool.request("GET", "/next", None, None, None, 5.0, True))

    async def holding() -> bool:
        return len(server.seen) == 1 and len(pool._waiters) == 1

    await eventually(holding)
    server.release.set()
    assert (await held).status_code == 200 and (await waiting).status_code == 200
    assert server.connections == 1

    server.release.clear()
    dry = _pool(server, max_connections=1,
                timeout=httpx.Timeout(connect=2.0, read=5.0, write=2.0, pool=0.05))
    held = asyncio.create_task(dry.request("GET", "/hold", None, None, None, 5.0, True))

    async def held_again() -> bool:
        return len(server.seen) == 3

    await eventually(held_again)
    with pytest.raises(httpx.PoolTimeout):
        await dry.request("GET", "/next", None, None, None, 5.0, True)
    server.release.set()
    await held
    await asyncio.gather(pool.aclose(), dry.aclose())


async def test_a_cancelled_call_gives_its_connection_slot_back(server: Server) -> None:
    pool = _pool(server, max_connections=1)
    call = asyncio.create_task(pool.request("GET", "/silent", None, None, None, 30.0, True))

    async def sent() -> bool:
        return len(server.seen) == 1

    await eventually(sent)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    assert pool._open == 0
    assert (await pool.request("GET", "/ok", None, None, None, 2.0, True)).status_code == 200
    await pool.aclose()


async def test_the_async_client_maps_pool_answers_and_failures_like_httpx(
        server: Server) -> None:
    async with AsyncClient(server.url, retry=None, breaker=None, budget=None) as c:
        assert c._fast is not None
        assert (await c.get("abc"))["target"] == "/v1/tasks/abc"
        with pytest.raises(APIError) as err:
            await c._call(core.simple_get("/busy"))
        assert err.value.status == 503 and err.value.retry_after == 7
    async with AsyncClient(f"http://127.0.0.1:{free_port()}", retry=None, breaker=None,
                           budget=None) as c:
        with pytest.raises(TransportError) as terr:
            await c.get("abc")
    assert terr.value.transient and isinstance(terr.value.__cause__, httpx.ConnectError)


async def test_the_async_client_keeps_httpx_for_http2_and_a_transport_of_its_own() -> None:
    async with AsyncClient("http://gl.test", http2=True) as c:
        assert c._fast is None
    transport = httpx.MockTransport(lambda r: httpx.Response(200, json={"id": "t"}))
    async with AsyncClient("http://gl.test", transport=transport) as c:
        assert c._fast is None and (await c.get("t"))["id"] == "t"
