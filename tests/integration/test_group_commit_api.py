"""Group commit through the API: single POST /v1/tasks calls made side by side (many
connections, many threads) share store writes, and every acknowledged task is stored."""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest

from gpulane.errors import StoreUnavailableError
from gpulane.model import Task, TaskSpec
from gpulane.node import Node
from tests.integration.conftest import node_with_api, serve_live


def _writes(node: Node) -> int:
    store: Any = getattr(node.store, "durable", node.store)  # under the online lane's tier
    writes: int = store.submit_groups.writes
    return writes


async def test_concurrent_submits_share_writes_and_all_are_stored(tmp_path: Path) -> None:
    async with node_with_api(tmp_path, paused=True) as (node, api):
        before = _writes(node)
        answers = await asyncio.gather(*(
            api.post("/v1/tasks", json={"preset": "sleep", "input": {"n": i % 20}},
                     headers={"Idempotency-Key": f"k-{i % 20}"})
            for i in range(40)))
        assert {r.status_code for r in answers} == {202}
        assert _writes(node) - before < 40
        ids = [r.json()["id"] for r in answers]
        assert ids[:20] == ids[20:]  # the same key within a group: the same task
        stored = await node.store.get_many(ids[:20])
        assert [t.input for t in stored if t is not None] == [{"n": i} for i in range(20)]


async def test_submits_from_many_threads_are_all_acknowledged_and_stored(
        tmp_path: Path) -> None:
    async with node_with_api(tmp_path, paused=True) as (node, _), serve_live(node) as url:
        def one_thread(t: int) -> list[str]:
            with httpx.Client(base_url=url) as c:
                return [c.post("/v1/tasks", json={"preset": "sleep", "input": {"t": t, "i": i}}
                               ).raise_for_status().json()["id"] for i in range(10)]

        before = _writes(node)
        loop = asyncio.get_running_loop()
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            got = await asyncio.gather(*(loop.run_in_executor(pool, one_thread, t)
                                         for t in range(16)))
        ids = [i for per in got for i in per]
        assert len(set(ids)) == 160
        stored = await node.store.get_many(ids)
        assert all(t is not None for t in stored)
        # 16 threads at once: some submits land in the same turn (45 writes in a run here).
        assert _writes(node) - before < 160


async def test_a_failed_group_write_answers_every_submit_of_it_with_the_stores_error(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async with node_with_api(tmp_path, paused=True) as (node, api):
        store: Any = getattr(node.store, "durable", node.store)
        sizes: list[int] = []

        async def down(specs: Sequence[TaskSpec]) -> list[tuple[Task, bool]]:
            sizes.append(len(specs))
            raise StoreUnavailableError("Redis at redis://db:6379/0 failed (reset)")

        monkeypatch.setattr(store, "_submit_now", down)
        answers = await asyncio.gather(*(
            api.post("/v1/tasks", json={"preset": "sleep", "input": {"n": i}})
            for i in range(12)))
        assert {r.status_code for r in answers} == {503}
        assert all("reset" in r.json()["error"]["message"] for r in answers)
        assert sum(sizes) == 12 and len(sizes) < 12  # grouped, and every one refused
        monkeypatch.undo()
        assert (await store.list_tasks())[0] == []
