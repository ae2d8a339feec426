"""Fixtures the unit tests share."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gpulane.store.sqlite import SqliteStore


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    """An open SQLite store on a file (its upkeep threads and second connections need one);
    a test module may define its own ``store`` instead."""
    s = SqliteStore(tmp_path / "gpulane.db")
    await s.open()
    yield s
    await s.close()


class Clock:
    """A clock that stands still until a test moves ``now``: pass it where the code under test
    takes a ``clock`` (a callable that returns seconds)."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now
