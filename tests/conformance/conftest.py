"""Backends for the Store conformance suite.

Every test in this folder takes the ``store`` fixture and so runs once per backend (the
pattern of huey's storage test mixin and dramatiq's parametrised broker fixture). To add a
backend:

1. add its name to ``BACKENDS`` (and to ``DURABLE_BACKENDS`` if a store built later on the same
   data sees what an earlier one wrote);
2. teach ``_make_backend`` to build it.

The ``redis`` entry is wired already: it switches itself on once ``gpulane.store.redis``
exists and builds stores with ``open_store("redis://...")`` against a throwaway
``redis-server`` started by the ``redis_url`` fixture (tests/conftest.py, shared with the
fleet's tests). Without ``redis-server`` on PATH
the redis tests are skipped locally and fail when the environment variable ``CI`` is set, so
that a CI image missing it cannot pass silently.
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pytest
from redis.asyncio import Redis

from gpulane.store import Store, open_store
from gpulane.store.redis import RedisStore
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


S = TypeVar("S", bound=Store)


@contextlib.asynccontextmanager
async def opened(s: S) -> AsyncIterator[S]:
    """``s`` opened, and closed after."""
    await s.open()
    try:
        yield s
    finally:
        await s.close()


@pytest.fixture
async def store(backend: Backend) -> AsyncIterator[Store]:
    async with opened(backend.make()) as s:
        yield s


@pytest.fixture
async def raw(redis_url: str) -> AsyncIterator[Redis]:
    """A plain client on the redis fixture's server, to look at the store's keys."""
    client = Redis.from_url(redis_url)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
async def redis_store(redis_url: str) -> AsyncIterator[RedisStore]:
    """One Redis store on the redis fixture's server, for the tests of what only it has."""
    async with opened(RedisStore(redis_url)) as s:
        yield s


@pytest.fixture
async def two(redis_url: str) -> AsyncIterator[tuple[Store, Store]]:
    """Two stores on one server, as two nodes of a fleet have."""
    async with opened(open_store(redis_url)) as a, opened(open_store(redis_url)) as b:
        yield a, b
