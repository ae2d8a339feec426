"""Fixtures shared by every test folder."""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
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


LEFT_TASK_GRACE_S = 2.0
"""How long the guard below waits for the gpulane tasks a test left behind to end once
cancelled."""


def _gpulane_task(task: asyncio.Task[object]) -> bool:
    """Whether a task runs gpulane's code (not a test's own, not a library's)."""
    coro = task.get_coro()
    code = getattr(coro, "cr_code", None) or getattr(coro, "ag_code", None)
    return code is not None and f"{os.sep}gpulane{os.sep}" in code.co_filename


@pytest.fixture(autouse=True)
async def _no_gpulane_task_left(request: pytest.FixtureRequest) -> AsyncIterator[None]:
    """Fail a test that leaves a gpulane task on its loop (a store, node, worker reader or
    subscriber it did not close). The loop's teardown cancels what is left, and a task that
    waits on a process or a socket in its cleanup then hangs the whole run (it did, twice):
    here the tasks are named, with their stacks, before the teardown can hang."""
    yield
    await settle()
    me = asyncio.current_task()
    left = [t for t in asyncio.all_tasks() if t is not me and not t.done() and _gpulane_task(t)]
    if not left:
        return
    out = io.StringIO()
    for t in left:
        t.print_stack(limit=8, file=out)
        t.cancel()
    _, stuck = await asyncio.wait(left, timeout=LEFT_TASK_GRACE_S)
    report = (f"{len(left)} gpulane task(s) left running after the test "
              f"({len(stuck)} of them ignore cancel: the loop's teardown would hang on them):\n"
              f"{out.getvalue()}")
    terminal = request.config.pluginmanager.get_plugin("terminalreporter")
    if terminal is not None:  # on the terminal now, past capture: the teardown may hang next
        terminal.write_line(report)
    pytest.fail(report)


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


class RedisProcess:
    """A redis-server of a test's own on a free loopback port, killed (``kill``: -9 unless
    told otherwise) and started again on the same port at will. With ``folder`` it keeps an
    append-only file there, fsynced on every write (a restart finds what it acknowledged);
    without, it keeps nothing. Missing redis-server: the test is skipped locally and fails
    when the environment variable ``CI`` is set, so that a CI image without it cannot pass."""

    def __init__(self, folder: Path | None = None) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            msg = "redis-server is not installed: the redis store and fleet cannot be tested"
            if os.environ.get("CI"):
                pytest.fail(msg + " (CI is set, so this is an error)")
            pytest.skip(msg)
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        persistence = ["--appendonly", "no"] if folder is None else [
            "--appendonly", "yes", "--appendfsync", "always", "--dir", str(folder)]
        self.argv = [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                     "--protected-mode", "no", *persistence]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, ready_timeout_s: float = 10.0) -> None:
        """Start it and wait until it answers PING (after loading its append-only file)."""
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + ready_timeout_s
        while not self.answers():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                pytest.fail(f"redis-server did not answer PING on port {self.port}")
            time.sleep(0.01)  # polling with a deadline

    def answers(self) -> bool:
        try:
            return _redis_command(self.port, "PING") == b"+PONG"
        except OSError:
            return False

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, sig)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def own_redis() -> Iterator[RedisProcess]:
    """A redis-server of this test's own on a free port, to kill -9 and start again."""
    server = RedisProcess()
    server.start()
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[int]:
    """A throwaway redis-server on a free port, without persistence; yields the port."""
    server = RedisProcess()
    server.start()
    try:
        yield server.port
    finally:
        server.kill(signal.SIGTERM)


@pytest.fixture
def redis_url(redis_server: int) -> str:
    """The server's URL, emptied before each test."""
    assert _redis_command(redis_server, "FLUSHALL") == b"+OK"
    return f"redis://127.0.0.1:{redis_server}/0"
