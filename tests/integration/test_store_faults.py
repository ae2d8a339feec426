"""Store faults never wedge the runtime (issue 11, item 7): the store raises at each call site
the runtime uses (streamed events, a batch's outcomes, requeues, a cancel's finish), once or
from then on, while a few dozen tasks run on two workers with a crashing input and cancels
mixed in. Whatever it does, every run is forgotten: the workers end idle (or gone), the CPU
slots are all back in the ledger and no worker holds a run. What the store lost is left to
the claim-TTL reaper (tasks stay ``running`` with nobody holding them)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import pytest

from gpulane.model import TaskState
from gpulane.node import Node
from gpulane.runtime.worker_process import WorkerState
from gpulane.store import Store

PRESET = "batchy-pair"
"""Two CPU workers, fixed batches of 4, max_attempts 2 (tests/integration/presets)."""
TASKS = 32
"""Short tasks in the load; one of them kills its worker."""
CRASH_AT = 13
LONG_TASKS = 3
"""Tasks that run long enough to be cancelled while they run."""
STORE_CALLS = ("append_events", "finish_many", "requeue", "finish")
"""Every store method the runtime calls (runtime/outcomes.py, Supervisor.cancel)."""
WAIT_S = 60.0
POLL_S = 0.02


class StoreFault(RuntimeError):
    """What the faulty store raises: a full disk, a lost connection."""


class FaultyStore:
    """The node's store, except that ``method`` raises on its ``nth`` call (``always``: on
    that call and every later one)."""

    def __init__(self, inner: Store, method: str, nth: int, *, always: bool) -> None:
        self._inner = inner
        self._method = method
        self._nth = nth
        self._always = always
        self.calls = 0
        self.raised = 0

    def __getattr__(self, name: str) -> Any:
        real = getattr(self._inner, name)
        if name != self._method:
            return real

        async def faulty(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            if self.calls == self._nth or (self._always and self.calls > self._nth):
                self.raised += 1
                raise StoreFault(f"{name} call {self.calls}: disk I/O error")
            return await real(*args, **kwargs)

        return faulty


async def _until(check: Callable[[], Awaitable[bool]], what: str) -> None:
    deadline = asyncio.get_running_loop().time() + WAIT_S
    while not await check():
        assert asyncio.get_running_loop().time() < deadline, f"never saw {what}"
        await asyncio.sleep(POLL_S)


async def _bulk(api: httpx.AsyncClient, inputs: list[dict[str, Any]]) -> list[str]:
    r = await api.post("/v1/tasks/bulk", json={"tasks": [
        {"preset": PRESET, "input": inp} for inp in inputs]})
    assert r.status_code == 202, r.text
    return [t["id"] for t in r.json()["tasks"]]


@pytest.mark.parametrize("always", [False, True], ids=["once", "from-then-on"])
@pytest.mark.parametrize("method", STORE_CALLS)
async def test_a_store_that_raises_never_keeps_a_run_held(
        api: httpx.AsyncClient, node: Node, method: str, always: bool,
        caplog: pytest.LogCaptureFixture) -> None:
    sup = node.supervisor
    faulty = FaultyStore(node.store, method, 2, always=always)
    sup.store = sup.pipeline.outcomes.store = faulty

    await node.scheduler.stop()  # one backlog, so both workers start with full batches
    long_ids = await _bulk(api, [{"ms": 400}] * LONG_TASKS)
    ids = await _bulk(api, [{"ms": 10, "progress": i % 2 == 0, "crash": i == CRASH_AT}
                            for i in range(TASKS)])
    node.scheduler.start()

    # Cancel the long tasks while a worker runs them: a cancel's store write is a call site.
    for tid in long_ids:
        async def running(tid: str = tid) -> bool:
            held = {t for t, _ in sup.held_runs()}
            return tid in held or (await node.get(tid)).state.final
        await _until(running, f"task {tid} running")
        try:
            await sup.cancel(tid)
        except StoreFault:
            pass  # not cancelled after all: it runs on, and must still be let go of

    async def settled() -> bool:
        if sup.held_runs() or node.ledger.cpu_used:
            return False
        if any(w.runs or w.state is WorkerState.BUSY for w in sup.workers.values()):
            return False
        states = [(await node.get(tid)).state for tid in long_ids + ids]
        return TaskState.QUEUED not in states
    await _until(settled, "every run let go of, every worker idle, every CPU slot back")

    assert faulty.raised >= 1, f"the load never called {method} {faulty._nth} times"
    if not always and method != "finish":  # a cancel's fault goes to its caller instead
        # One fault, one log line, naming the task(s) whose write was lost.
        [record] = [r for r in caplog.records if r.levelno >= logging.ERROR
                    and r.name == "gpulane.supervisor"]
        assert any(tid in record.getMessage() for tid in long_ids + ids), record.getMessage()
    assert all(w.state in (WorkerState.READY, WorkerState.EXITED)
               for w in sup.workers.values())
    # What the store took is right: no task that it recorded as ended ended wrongly.
    for tid in ids:
        task = await node.get(tid)
        if task.state is TaskState.SUCCEEDED:
            assert task.output is not None and task.id != ids[CRASH_AT]
