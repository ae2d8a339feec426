"""How many scheduler passes a task costs: a freed worker wakes none while the queues are
empty (scheduling/quiet.py), and work queued meanwhile is placed all the same."""

from __future__ import annotations

import asyncio

from gpulane.model import TaskState
from gpulane.node import Node

ROUND_TRIPS = 60


async def _round_trip(node: Node, ms: int = 0) -> None:
    task, _ = await node.submit(node.build_spec(preset="sleep", input={"ms": ms}))
    done = await node.wait(task.id, 30)
    assert done.state is TaskState.SUCCEEDED, done


async def test_sequential_round_trips_cost_about_one_pass_each(node: Node) -> None:
    for _ in range(5):  # the worker started and warm
        await _round_trip(node)
    before = node.scheduler.passes
    for _ in range(ROUND_TRIPS):
        await _round_trip(node)
    # The submit's pass places the task; its end (and its next batch opening) wake none.
    # The safety tick adds one a second; before, each round trip took two to three passes.
    assert node.scheduler.passes - before < ROUND_TRIPS * 1.5


async def test_work_queued_behind_a_busy_worker_is_placed_when_it_frees(node: Node) -> None:
    await _round_trip(node)
    # More than two workers' batches at once: some wait in the queue for a worker to free.
    specs = [node.build_spec(preset="sleep", input={"ms": 20}) for _ in range(300)]
    tasks = [t for t, _ in await node.submit_many(specs)]
    done = await asyncio.gather(*(node.wait(t.id, 60) for t in tasks))
    assert {t.state for t in done} == {TaskState.SUCCEEDED}
    await _round_trip(node)  # and the queues drained, a single task still runs at once
