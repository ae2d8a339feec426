"""The claim-TTL reaper against live runs, on a node with the shortest TTL (1 s) and its own
housekeeping loops on the real clock: a run that lasts several TTLs is heartbeat and never
reaped; a run whose outcome the store lost is let go of, reaped once its TTL passes and run
again, its lost attempt spent."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from gpulane.model import TaskState
from gpulane.node import Node
from gpulane.store import Store, wait_final
from tests.integration.conftest import make_settings, stop_node

CLAIM_TTL_S = 1.0
WAIT_S = 30.0


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[Node]:
    n = Node(make_settings(tmp_path, claim_ttl_s=CLAIM_TTL_S))
    await n.start()
    try:
        yield n
    finally:
        await stop_node(n)


class LosesFirstFinish:
    """The node's store, except that the runtime's first ``finish_many`` raises."""

    def __init__(self, inner: Store) -> None:
        self._inner = inner
        self.raised = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def finish_many(self, *args: Any, **kwargs: Any) -> Any:
        if not self.raised:
            self.raised += 1
            raise RuntimeError("finish_many: disk I/O error")
        return await self._inner.finish_many(*args, **kwargs)


async def test_a_run_lasting_several_claim_ttls_is_never_reaped(node: Node) -> None:
    spec = node.build_spec(preset="behave", input={"action": "slow", "s": 3 * CLAIM_TTL_S})
    task, _ = await node.submit(spec)
    done = await wait_final(node.store, task.id, WAIT_S)
    assert done is not None and done.state is TaskState.SUCCEEDED, done
    assert (done.attempts, done.token) == (1, 1)
    reaper = node.housekeeper.view()["reaper"]
    assert reaper["reaped_total"] == 0 and reaper["heartbeats_total"] >= 1, reaper


async def test_an_outcome_the_store_lost_is_reaped_and_run_again(node: Node) -> None:
    faulty = LosesFirstFinish(node.store)
    node.supervisor.pipeline.outcomes.store = faulty  # type: ignore[assignment]
    task, _ = await node.submit(node.build_spec(preset="behave", input={"action": "ok"}))
    done = await wait_final(node.store, task.id, WAIT_S)
    assert faulty.raised == 1
    assert done is not None and done.state is TaskState.SUCCEEDED, done
    # The lost attempt was spent (it ran); the second one's outcome is the one recorded.
    assert (done.attempts, done.token) == (2, 2)
    assert node.housekeeper.view()["reaper"]["reaped_total"] == 1
    assert not node.supervisor.held_runs()


async def test_a_run_reaped_behind_its_nodes_back_is_called_off(node: Node) -> None:
    """As after a stall longer than the claim TTL: the running attempt is reaped while its
    worker still works on it. The next heartbeat finds it held in vain and calls it off; the
    task's new attempt is the one whose outcome is recorded."""
    task, _ = await node.submit(node.build_spec(
        preset="behave", input={"action": "slow", "s": 2.5 * CLAIM_TTL_S}))
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT_S
    while (task.id, 1) not in node.supervisor.held_runs():
        assert loop.time() < deadline
        await asyncio.sleep(0.01)
    assert [t.id for t in await node.store.reap(time.time() + 1)] == [task.id]
    while node.housekeeper.view()["reaper"]["lost_total"] < 1:
        assert loop.time() < deadline
        await asyncio.sleep(0.01)
    assert (task.id, 1) not in node.supervisor.held_runs()  # no longer heartbeat
    done = await wait_final(node.store, task.id, WAIT_S)
    assert done is not None and done.state is TaskState.SUCCEEDED, done
    assert done.token == 2  # the attempt claimed after the reap owns the outcome
