"""The suite's guard against tasks a test leaves behind (tests/conftest.py): it names a
gpulane task that outlives its test, and ignores the test's own and libraries' tasks."""

from __future__ import annotations

import asyncio

from gpulane.store.redis_conn import RespConnection
from tests.conftest import _gpulane_task


async def test_a_gpulane_coroutine_is_told_from_a_tests_own() -> None:
    conn = RespConnection("redis://127.0.0.1:1/0")  # nothing listens: the call fails fast
    ours = asyncio.create_task(conn.call("PING"))
    theirs = asyncio.create_task(asyncio.sleep(0))
    try:
        assert _gpulane_task(ours) and not _gpulane_task(theirs)
    finally:
        for t in (ours, theirs):
            t.cancel()
        await asyncio.gather(ours, theirs, return_exceptions=True)
