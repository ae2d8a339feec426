"""A stopping node puts what it runs back in the queue before it closes its store.

A worker's exit is handled (its attempts requeued, unspent) by the task that read its output,
after the process is seen to exit. ``Supervisor.stop_all`` used to return once the processes
had exited, so the node closed its store while the requeue was on its way: the task stayed
running until the claim TTL (seen under load in test_fleet_nodes' drain to exit). A store
whose requeue answers slowly makes that order certain here.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from gpulane.model import TaskState
from gpulane.node import Node
from gpulane.store.factory import open_store
from tests.conftest import eventually
from tests.integration.conftest import make_settings, stop_node


async def test_a_stop_waits_for_the_requeue_of_what_it_ran(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    node = Node(make_settings(tmp_path))
    await node.start()
    task, _ = await node.submit(node.build_spec(preset="sleep", input={"ms": 60_000}))

    async def running() -> bool:
        got = await node.get(task.id)
        return got is not None and got.state is TaskState.RUNNING
    await eventually(running)

    requeue = node.store.requeue

    async def slow_requeue(*args: Any, **kw: Any) -> Any:
        await asyncio.sleep(0.3)  # a store that answers late, as a loaded Redis does
        return await requeue(*args, **kw)
    monkeypatch.setattr(node.store, "requeue", slow_requeue)
    await stop_node(node)

    store = open_store(make_settings(tmp_path).store_url)
    await store.open()
    try:
        back = await store.get(task.id)
    finally:
        await store.close()
    assert back is not None and back.state is TaskState.QUEUED and back.attempts == 0, back
