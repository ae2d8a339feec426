"""The Redis store's pipelined connection: replies pair with their calls under concurrency and
cancellation, a server that stops answering fails the calls and the next call reconnects."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from gpulane.store import redis_conn
from gpulane.store.redis_conn import RedisDown, RedisReplyError, RespConnection
from tests.conftest import settle

GUARD_S = 10.0
"""Failure guard for an answer that should come at once: never the assertion."""


@pytest.fixture
async def conn(redis_url: str) -> AsyncIterator[RespConnection]:
    c = RespConnection(redis_url)
    try:
        yield c
    finally:
        c.close()


async def test_concurrent_calls_each_get_their_own_reply(conn: RespConnection) -> None:
    await asyncio.gather(*(conn.call("SET", f"k{i}", f"v{i}") for i in range(300)))
    got = await asyncio.gather(*(conn.call("GET", f"k{i}") for i in range(300)))
    assert got == [f"v{i}".encode() for i in range(300)]


async def test_a_cancelled_call_leaves_the_replies_in_order(conn: RespConnection) -> None:
    await conn.call("PING")  # connected: the next call is written at once
    call = asyncio.create_task(conn.call("ECHO", "first"))
    await asyncio.sleep(0)  # written, its reply not read yet
    call.cancel()
    assert await conn.call("ECHO", "second") == b"second"
    with pytest.raises(asyncio.CancelledError):
        await call


async def test_an_error_reply_is_a_reply_error_and_the_connection_goes_on(
        conn: RespConnection) -> None:
    with pytest.raises(RedisReplyError):
        await conn.call("NO-SUCH-COMMAND")
    assert await conn.call("ECHO", "still") == b"still"


async def test_a_script_is_loaded_again_when_the_server_lost_it(conn: RespConnection) -> None:
    assert await conn.script("return ARGV[1]", "x") == b"x"
    await conn.call("SCRIPT", "FLUSH")
    assert await conn.script("return ARGV[1]", "y") == b"y"


async def test_a_server_that_stops_answering_fails_the_call_and_the_next_reconnects(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(redis_conn, "REPLY_TIMEOUT_S", 0.05)
    answering = asyncio.Event()
    accepted = 0

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal accepted
        accepted += 1
        while await reader.read(1024):
            if answering.is_set():
                writer.write(b"+PONG\r\n")
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    conn = RespConnection(f"redis://127.0.0.1:{port}/0")
    try:
        with pytest.raises(RedisDown, match="no reply"):
            await asyncio.wait_for(conn.call("PING"), GUARD_S)
        answering.set()
        assert await asyncio.wait_for(conn.call("PING"), GUARD_S) == b"PONG"
        assert accepted == 2  # the silent connection was dropped, a new one made
    finally:
        conn.close()
        server.close()
        await settle()


async def test_nothing_listening_is_redis_down() -> None:
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    conn = RespConnection(f"redis://127.0.0.1:{port}/0")
    with pytest.raises(RedisDown, match="cannot connect"):
        await asyncio.wait_for(conn.call("PING"), GUARD_S)
