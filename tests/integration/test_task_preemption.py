"""Priorities that mean it for tasks (issue 13, item 4), on simulated GPUs with sleep workers.

An immediate task that nothing can place preempts a lower-priority worker gracefully: the
victim finishes its batch, what it held but never ran goes back unspent, the immediate task
runs on the freed GPU, and the same head never preempts twice while its victims drain. A
worker's ledger priority follows the tasks it serves, so an immediate lease preempts a worker
serving background work and not one serving immediate work.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from gpulane.model import Priority
from gpulane.node import Node
from gpulane.scheduling.priorities import IDLE_PRIORITY
from tests.conftest import eventually
from tests.integration.conftest import node_with_api, submit, wait_done

GPU_MB = 24576
"""Each simulated GPU of the test node (2x24GiB)."""
WORKER_MB = 1024
"""The behave preset's vram_mb."""
BIG_MB = 20000
"""The big preset's vram_mb: it fits on a GPU only where the behave worker is not."""


@pytest.fixture
async def pair(tmp_path: Path) -> AsyncIterator[tuple[Node, httpx.AsyncClient]]:
    async with node_with_api(tmp_path, task_preempt_grace_s=10) as both:
        yield both


async def _lease(api: httpx.AsyncClient, **body: Any) -> httpx.Response:
    return await api.post("/v1/leases", json={"holder": "filler", **body})


async def _running_on(api: httpx.AsyncClient, task_id: str) -> int:
    async def running() -> dict[str, Any] | None:
        task: dict[str, Any] = (await api.get(f"/v1/tasks/{task_id}")).json()
        return task if task["state"] == "running" else None
    task = await eventually(running, timeout=30)  # a worker's start on a loaded host
    return int(task["placement"]["device"][4:])


def _holding_priority(node: Node, worker_id: str) -> int | None:
    found = [h.priority for h in node.ledger.holders() if h.holder == worker_id]
    return found[0] if found else None


async def test_an_immediate_task_preempts_a_background_worker(
        pair: tuple[Node, httpx.AsyncClient]) -> None:
    node, api = pair
    slow = [(await submit(api, "behave", {"action": "slow", "s": 2.0},
                          priority="background"))["id"] for _ in range(4)]
    gpu = await _running_on(api, slow[0])
    # The other GPU is full, and this one has room for the big worker only without behave's.
    other = (await _lease(api, device=1 - gpu, vram_mb=GPU_MB, preemptible=False)).json()
    filler = (await _lease(api, device=gpu, vram_mb=GPU_MB - WORKER_MB - BIG_MB + 1,
                           preemptible=False)).json()
    victim = next(iter(node.supervisor.workers.values()))

    async def next_batch_held() -> list[str]:  # its second batch runs, its third is held
        return list(victim.next)
    held = await eventually(next_batch_held, timeout=30)
    assert _holding_priority(node, victim.id) == Priority.BACKGROUND

    urgent = (await submit(api, "big", {"action": "ok"}, priority="immediate"))["id"]
    again = (await submit(api, "big", {"action": "ok"}, priority="immediate"))["id"]

    async def preempted() -> bool:
        return victim.preempted
    await eventually(preempted)

    done = await wait_done(api, urgent)
    assert done["state"] == "succeeded" and done["placement"]["device"] == f"gpu:{gpu}"
    assert (await wait_done(api, again))["state"] == "succeeded"
    assert node.scheduler.preemption.preemptions == 1  # the same head never preempts twice

    for lz in (other, filler):
        await api.delete(f"/v1/leases/{lz['id']}", params={"token": lz["token"]})
    for tid in slow:  # the running batch finished; what was held went back without a cost
        task = await wait_done(api, tid)
        assert task["state"] == "succeeded" and task["attempts"] == 1, task
    assert set(held) <= set(slow)


async def test_a_worker_holds_the_priority_of_what_it_serves(
        pair: tuple[Node, httpx.AsyncClient]) -> None:
    node, api = pair
    tid = (await submit(api, "behave", {"action": "slow", "s": 0.5},
                        priority="immediate"))["id"]
    await _running_on(api, tid)
    worker = next(iter(node.supervisor.workers.values()))
    assert _holding_priority(node, worker.id) == Priority.IMMEDIATE
    await wait_done(api, tid)

    async def dropped() -> bool:
        return _holding_priority(node, worker.id) == IDLE_PRIORITY
    await eventually(dropped)  # an idle worker of urgent work is not protected for good
    tid = (await submit(api, "behave", {"action": "slow", "s": 0.5}, priority=70))["id"]
    await _running_on(api, tid)
    assert _holding_priority(node, worker.id) == 70
    await wait_done(api, tid)


async def test_an_immediate_lease_spares_immediate_work_and_preempts_background(
        pair: tuple[Node, httpx.AsyncClient]) -> None:
    _node, api = pair
    tid = (await submit(api, "behave", {"action": "slow", "s": 1.5},
                        priority="immediate"))["id"]
    gpu = await _running_on(api, tid)
    other = (await _lease(api, device=1 - gpu, vram_mb=GPU_MB, preemptible=False)).json()
    r = await _lease(api, device=gpu, vram_mb=GPU_MB - WORKER_MB + 1, priority="immediate",
                     wait_s=0.3)
    assert r.status_code == 408, r.text  # the worker serves immediate work: it stays
    assert (await wait_done(api, tid))["attempts"] == 1

    tid = (await submit(api, "behave", {"action": "slow", "s": 1.0},
                        priority="background"))["id"]
    assert await _running_on(api, tid) == gpu
    r = await _lease(api, device=gpu, vram_mb=GPU_MB - WORKER_MB + 1, priority="immediate",
                     wait_s=10, grace_s=5)
    assert r.status_code == 201, r.text  # background work: preempted, its batch finished
    task = await wait_done(api, tid)
    assert task["state"] == "succeeded" and task["attempts"] == 1
    for lz in (other, r.json()):
        await api.delete(f"/v1/leases/{lz['id']}", params={"token": lz["token"]})


async def test_an_immediate_one_off_preempts_too(pair: tuple[Node, httpx.AsyncClient]) -> None:
    node, api = pair
    tid = (await submit(api, "behave", {"action": "slow", "s": 1.0},
                        priority="background"))["id"]
    gpu = await _running_on(api, tid)
    one_off_mb = 14000  # big-oneoff's vram_mb
    other = (await _lease(api, device=1 - gpu, vram_mb=GPU_MB, preemptible=False)).json()
    filler = (await _lease(api, device=gpu, vram_mb=GPU_MB - WORKER_MB - one_off_mb + 1,
                           preemptible=False)).json()
    urgent = (await submit(api, "big-oneoff", {"action": "ok"}, priority="immediate"))["id"]
    done = await wait_done(api, urgent)
    assert done["state"] == "succeeded" and done["placement"]["device"] == f"gpu:{gpu}"
    assert (await wait_done(api, tid))["attempts"] == 1  # its batch ran to the end
    assert node.scheduler.preemption.preemptions == 1
    for lz in (other, filler):
        await api.delete(f"/v1/leases/{lz['id']}", params={"token": lz["token"]})
