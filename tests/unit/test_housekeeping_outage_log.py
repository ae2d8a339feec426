"""Through a Redis outage the housekeeper says each failed round in one line (no traceback:
one per heartbeat for the whole outage said nothing more); any other failure keeps its
traceback."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from gpulane.errors import StoreUnavailableError
from gpulane.fleet import LocalFleet, NodeInfo
from gpulane.scheduling.housekeeping import Housekeeper
from gpulane.store.sqlite import SqliteStore


class Failing(LocalFleet):
    """A fleet whose registration fails with ``error``."""

    def __init__(self, error: Exception) -> None:
        super().__init__("a")
        self.error = error

    async def register(self, info: NodeInfo, ttl_s: float) -> None:
        raise self.error


@pytest.mark.parametrize(("error", "traced"), [
    (StoreUnavailableError("Redis at redis://x:6379/0 failed"), False),
    (RuntimeError("a bug"), True)])
async def test_an_outage_is_one_line(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                     error: Exception, traced: bool) -> None:
    store = SqliteStore(tmp_path / "gpulane.db")
    keeper = Housekeeper(store, "a", held=list, max_attempts=dict, retain_s=60, claim_ttl_s=30,
                         fleet=Failing(error),
                         node_info=lambda: NodeInfo("a", None, 0.0, 0.0))
    with caplog.at_level(logging.WARNING, logger="gpulane.housekeeping"):
        assert await keeper.announce() is False
    (record,) = [r for r in caplog.records if "node registration failed" in r.message]
    assert str(error) in record.getMessage()
    assert bool(record.exc_info) is traced
