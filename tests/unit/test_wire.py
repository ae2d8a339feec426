"""api/wire.py: a response's head and body go out in one write, and nothing is held past the
turn of the event loop it was written in (HEAD answers, quiet event streams, 100 Continue)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from gpulane.api.wire import HeldHeadTransport, OneWriteHttpTools
from tests.conftest import free_port

HEAD = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n"


class FakeTransport:
    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.writes.append(bytes(data))

    def writelines(self, data: list[bytes]) -> None:
        self.writes.append(b"".join(data))

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def get_write_buffer_size(self) -> int:
        return 0


async def test_a_head_goes_out_with_its_body_in_one_write() -> None:
    fake = FakeTransport()
    held = HeldHeadTransport(fake, asyncio.get_running_loop())  # type: ignore[arg-type]
    held.write(HEAD)
    assert fake.writes == []
    held.write(b"{}")
    assert fake.writes == [HEAD + b"{}"]
    await asyncio.sleep(0)  # the turn's end finds nothing held
    assert fake.writes == [HEAD + b"{}"]
    held.write(b"more")  # a later body chunk passes straight through
    assert fake.writes[-1] == b"more"
    assert held.get_write_buffer_size() == 0  # the rest of the transport's API, as it is


async def test_a_head_without_a_body_in_its_turn_is_written_at_the_turns_end() -> None:
    fake = FakeTransport()
    held = HeldHeadTransport(fake, asyncio.get_running_loop())  # type: ignore[arg-type]
    held.write(HEAD)
    await asyncio.sleep(0)
    assert fake.writes == [HEAD]
    held.write(HEAD)  # held again; a close writes it first
    held.close()
    assert fake.writes == [HEAD, HEAD] and fake.closed


async def _events(request: Request) -> StreamingResponse:
    async def stream() -> AsyncIterator[bytes]:
        await request.app.state.go.wait()
        yield b"data: 1\n\n"
    return StreamingResponse(stream(), media_type="text/event-stream")


async def _echo(request: Request) -> JSONResponse:
    return JSONResponse({"got": len(await request.body())})


@contextlib.asynccontextmanager
async def _served() -> AsyncIterator[tuple[Starlette, int]]:
    app = Starlette(routes=[Route("/echo", _echo, methods=["GET", "POST", "HEAD"]),
                            Route("/events", _events)])
    app.state.go = asyncio.Event()
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, lifespan="off",
                                           http=OneWriteHttpTools, log_level="warning"))
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.01)
    try:
        yield app, port
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 5)


async def _read_answer(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))
    return head, await reader.readexactly(length)


async def test_a_real_server_answers_keep_alive_head_continue_and_streams() -> None:
    async with _served() as (app, port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        # Two answers on one connection, each whole.
        for _ in range(2):
            writer.write(b"GET /echo HTTP/1.1\r\nhost: t\r\n\r\n")
            head, body = await asyncio.wait_for(_read_answer(reader), 5)
            assert head.startswith(b"HTTP/1.1 200") and body == b'{"got":0}'
        # HEAD: a head and no body, not held back.
        writer.write(b"HEAD /echo HTTP/1.1\r\nhost: t\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200")
        # Expect: 100-continue: the interim answer comes before the body is sent.
        writer.write(b"POST /echo HTTP/1.1\r\nhost: t\r\ncontent-length: 3\r\n"
                     b"expect: 100-continue\r\n\r\n")
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert interim.startswith(b"HTTP/1.1 100")
        writer.write(b"abc")
        head, body = await asyncio.wait_for(_read_answer(reader), 5)
        assert body == b'{"got":3}'
        writer.close()
        # An event stream's head arrives while the stream is still quiet.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /events HTTP/1.1\r\nhost: t\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert b"text/event-stream" in head
        app.state.go.set()
        assert b"data: 1" in await asyncio.wait_for(reader.readuntil(b"data: 1\n\n"), 5)
        writer.close()
