"""A store that raises while the scheduler claims gives back what the scheduler took for the
claim: a session batch's CPU slot, a one-off's GPU room or CPU slot. Before, each such fault
kept its slot or VRAM taken in the ledger for good, and two of them wedged a 2-slot CPU lane."""

from __future__ import annotations

from typing import Any

import pytest

from gpulane.model import TaskSpec, TaskState
from gpulane.node import Node
from gpulane.store import Store, wait_final

WAIT_S = 30.0


class StoreFault(RuntimeError):
    """What the faulty store raises: a full disk, a lost connection."""


class FailingClaims:
    """The node's store, except that ``claim`` raises while ``failing``."""

    def __init__(self, inner: Store) -> None:
        self._inner = inner
        self.failing = True
        self.raised = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def claim(self, *args: Any, **kwargs: Any) -> Any:
        if self.failing:
            self.raised += 1
            raise StoreFault("claim: disk I/O error")
        return await self._inner.claim(*args, **kwargs)


@pytest.mark.parametrize("preset, lane", [("behave-cpu", "cpu"), ("behave-oneoff", "gpu"),
                                          ("behave-oneoff", "cpu")])
async def test_a_failed_claim_gives_its_room_back(node: Node, preset: str, lane: str) -> None:
    await node.scheduler.stop()  # passes are run by hand below
    (task, _), = await node.store.submit_many([TaskSpec(preset, {"action": "ok"}, lane=lane)])
    faulty = FailingClaims(node.store)
    node.scheduler.store = faulty  # type: ignore[assignment]

    for _ in range(3):  # more faults than the node has CPU slots
        with pytest.raises(StoreFault):
            await node.scheduler.run_pass()
    assert faulty.raised == 3
    assert node.ledger.cpu_used == 0
    assert not node.ledger.holders(), "a one-off's GPU room was kept for a claim that failed"

    faulty.failing = False
    assert await node.scheduler.run_pass() == 1
    done = await wait_final(node.store, task.id, WAIT_S)
    assert done is not None and done.state is TaskState.SUCCEEDED, done


async def test_a_one_off_that_cannot_start_gives_its_room_and_task_back(
        node: Node, monkeypatch: pytest.MonkeyPatch) -> None:
    await node.scheduler.stop()
    (task, _), = await node.store.submit_many([TaskSpec("behave-oneoff", {"action": "ok"})])
    real = node.supervisor.run_oneoff

    def disk_full(*args: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(node.supervisor, "run_oneoff", disk_full)
    with pytest.raises(OSError):
        await node.scheduler.run_pass()
    assert not node.ledger.holders()
    back = await node.store.get(task.id)
    assert back is not None and back.state is TaskState.QUEUED and back.attempts == 0, back

    monkeypatch.setattr(node.supervisor, "run_oneoff", real)
    assert await node.scheduler.run_pass() == 1
    done = await wait_final(node.store, task.id, WAIT_S)
    assert done is not None and done.state is TaskState.SUCCEEDED, done
