"""Backends for the Store conformance suite.

Every test in this folder takes the ``store`` fixture and so runs once per backend (the
pattern of huey's storage test mixin and dramatiq's parametrised broker fixture). To add a
backend:

1. add its name to ``BACKENDS`` (and to ``DURABLE_BACKENDS`` if a store built later on the same
   data sees what an earlier one wrote);
2. teach ``_make_backend`` to build it.

The ``redis`` entry is wired already: it switches itself on once ``gpulane.store.redis``
exists and builds stores with ``open_store("redis://...")`` against a throwaway
``redis-server`` started by the ``redis_url`` fixture below. Without ``redis-server`` on PATH
the redis tests are skipped locally and fail when the environment variable ``CI`` is set, so
that a CI image missing it cannot pass silently.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from gpulane.store import Store, open_store
from gpulane.store.sqlite import SqliteStore

BACKENDS = ["sqlite-memory", "sqlite-file"]
DURABLE_BACKENDS = ["sqlite-file"]
if importlib.util.find_spec("gpulane.store.redis") is not None:  # the future fleet backend
    BACKENDS.append("redis")
    DURABLE_BACKENDS.append("redis")


@dataclass(frozen=True)
class Backend:
    """One store implementation under test."""

    name: str
    make: Callable[[], Store]
    """A new, unopened store over this backend's data (the same file or server each call)."""


def _make_backend(name: str, request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    if name == "sqlite-memory":
        return Backend(name, lambda: SqliteStore(":memory:"))
    if name == "sqlite-file":
        path = tmp_path / "data" / "gpulane.db"  # a folder that does not exist yet
        return Backend(name, lambda: SqliteStore(path))
    if name == "redis":
        url: str = request.getfixturevalue("redis_url")
        return Backend(name, lambda: open_store(url))
    raise AssertionError(f"unknown backend {name!r}")


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    return _make_backend(request.param, request, tmp_path)


@pytest.fixture(params=DURABLE_BACKENDS)
def durable_backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    return _make_backend(request.param, request, tmp_path)


@pytest.fixture
async def store(backend: Backend) -> AsyncIterator[Store]:
    s = backend.make()
    await s.open()
    try:
        yield s
    finally:
        await s.close()


# -- redis-server, for the redis backend ----------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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
    port = _free_port()
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
