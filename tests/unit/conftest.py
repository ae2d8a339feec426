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
