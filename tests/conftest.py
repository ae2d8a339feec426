"""Fixtures shared by every test folder."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import TypeVar

import pytest

T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def eventually(check: Callable[[], Awaitable[T]], timeout: float = 10.0,
                     interval: float = 0.02) -> T:
    """Poll an async check until it returns something truthy, or fail at the deadline."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while time.monotonic() < deadline:
        last = await check()
        if last:
            return last
        await asyncio.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s; last value: {last!r}")


class LoopClock:
    """The running event loop's clock, moved forward by hand: a fake clock for asyncio.

    ``advance(s)`` makes every timer due within the next ``s`` seconds (``asyncio.sleep``,
    ``asyncio.timeout``, ``call_later``) fire at once. Otherwise time runs as usual, so I/O and
    the generous failure guards of ``asyncio.wait_for`` keep working. A test can then say what
    happens before and after a deadline without waiting for it or timing anything.
    """

    def __init__(self, real: Callable[[], float]) -> None:
        self._real = real
        self.offset = 0.0
        """Seconds the clock has been moved ahead of the loop's own."""

    def time(self) -> float:
        return self._real() + self.offset

    async def advance(self, seconds: float) -> None:
        """Move the clock ``seconds`` ahead, then let what fell due run."""
        self.offset += seconds
        await settle()


SETTLE_TURNS = 10
"""Loop turns that let ready work run to its end: a woken timer cancels a task, the task
unwinds, its waiters resume (about three turns), with room to spare."""


async def settle(turns: int = SETTLE_TURNS) -> None:
    """Let the event loop run what is ready now, spending no clock time."""
    for _ in range(turns):
        await asyncio.sleep(0)


@pytest.fixture
async def loop_clock(monkeypatch: pytest.MonkeyPatch) -> LoopClock:
    """The running loop's clock, for the test to advance (see :class:`LoopClock`)."""
    loop = asyncio.get_running_loop()
    clock = LoopClock(loop.time)
    monkeypatch.setattr(loop, "time", clock.time)
    return clock


# -- redis-server, for the redis backend ----------------------------------------------------


def _redis_command(port: int, *args: str) -> bytes:
    """Send one command in RESP and return the first reply line (no client library needed)."""
    payload = f"*{len(args)}\r\n".encode()
    for a in args:
        payload += f"${len(a.encode())}\r\n{a}\r\n".encode()
    with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
        s.sendall(payload)
        return s.recv(1024).split(b"\r\n", 1)[0]


@pytest.fixture(scope="session")
def redis_server() -> Iterator[int]:
    """A throwaway redis-server on a free port, without persistence; yields the port."""
    exe = shutil.which("redis-server")
    if exe is None:
        msg = "redis-server is not installed: the redis store backend cannot be tested"
        if os.environ.get("CI"):
            pytest.fail(msg + " (CI is set, so this is an error)")
        pytest.skip(msg)
    port = free_port()
    proc = subprocess.Popen(
        [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--protected-mode", "no"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                if _redis_command(port, "PING") == b"+PONG":
                    break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"redis-server did not answer PING on port {port}")
            time.sleep(0.01)  # polling with a deadline
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def redis_url(redis_server: int) -> str:
    """The server's URL, emptied before each test."""
    assert _redis_command(redis_server, "FLUSHALL") == b"+OK"
    return f"redis://127.0.0.1:{redis_server}/0"
