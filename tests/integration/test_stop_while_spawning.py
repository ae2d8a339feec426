"""A worker whose process is being spawned as its node stops is stopped with the node.

``stop_all`` stops the workers in its table; one still in ``create_subprocess_exec`` had no
process to stop yet, so its stop returned at once and the process started after it: alive,
READY, out of the node's table, its output readers pending for ever (a test's event loop then
hung in teardown). A spawn that is gated until the stop has begun makes that order certain.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import pytest

from gpulane.node import Node
from tests.conftest import eventually
from tests.integration.conftest import make_settings, stop_node


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def test_a_worker_spawned_as_its_node_stops_is_stopped_too(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    node = Node(make_settings(tmp_path))
    await node.start()
    real = asyncio.create_subprocess_exec
    entered, go = asyncio.Event(), asyncio.Event()
    spawned: list[asyncio.subprocess.Process] = []

    async def gated(*argv: Any, **kw: Any) -> asyncio.subprocess.Process:
        if not any(str(a).endswith("sleep_worker.py") for a in argv):
            return await real(*argv, **kw)
        entered.set()
        await go.wait()
        proc = await real(*argv, **kw)
        spawned.append(proc)
        return proc
    monkeypatch.setattr(asyncio, "create_subprocess_exec", gated)

    await node.submit(node.build_spec(preset="sleep", input={"ms": 1}))
    await asyncio.wait_for(entered.wait(), 10)
    stopping = asyncio.create_task(stop_node(node))

    async def closing() -> bool:
        return node.supervisor._closing
    await eventually(closing)
    go.set()
    await asyncio.wait_for(stopping, 30)

    assert spawned, "the gated spawn never ran"
    assert all(not _alive(p.pid) for p in spawned), "a worker outlived its node"
    readers = [t for t in asyncio.all_tasks() if t.get_name().endswith(("-stdout", "-stderr"))
               and not t.done()]
    assert readers == []
