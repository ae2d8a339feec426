"""A node through a Redis outage: every route answers 503 store_unavailable with Retry-After
(not a 500), /readyz says not ready, the work it runs is finished and stored once Redis is
back, and it takes work again without a restart.

Redis here is a server of this test's own (the shared one must stay up), with an append-only
file synced on every write, so that what was acknowledged before the kill is there after."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

from gpulane.api.app import create_app
from gpulane.errors import StoreUnavailableError
from gpulane.model import Task, TaskState
from gpulane.node import Node
from tests.conftest import RedisProcess, eventually
from tests.integration.conftest import make_settings, stop_node


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisProcess]:
    """Append-only, fsynced on every write: a restart finds every acknowledged task."""
    r = RedisProcess(tmp_path)
    r.start()
    try:
        yield r
    finally:
        r.kill()


@pytest.fixture
async def outage_node(tmp_path: Path, redis: RedisProcess) -> AsyncIterator[Node]:
    node = Node(make_settings(tmp_path / "n", store=redis.url, node_name="outage",
                              worker_stop_grace_s=0.2))
    await node.start()
    try:
        yield node
    finally:
        await stop_node(node)


def _client(node: Node) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(
        app=create_app(node, manage_node=False)), base_url="http://t")


async def _unavailable(r: httpx.Response) -> None:
    assert r.status_code == 503, (r.request.url, r.text)
    assert r.json()["error"]["code"] == "store_unavailable", r.text
    assert r.headers["retry-after"] == "2"


async def test_every_route_answers_503_while_redis_is_down(outage_node: Node,
                                                           redis: RedisProcess) -> None:
    async with _client(outage_node) as api:
        r = await api.post("/v1/tasks", json={"preset": "sleep", "input": {"ms": 1}})
        task_id = r.json()["id"]
        await eventually(lambda: _final(outage_node, task_id))
        redis.kill()
        for method, path, body in [
            ("POST", "/v1/tasks", {"preset": "sleep", "input": {"ms": 1}}),
            ("POST", "/v1/tasks/bulk", {"tasks": [{"preset": "sleep", "input": {}}]}),
            ("POST", f"/v1/tasks/{task_id}/retry", None),
            ("GET", f"/v1/tasks/{task_id}", None),
            ("GET", f"/v1/tasks/{task_id}/result?wait=1", None),
            ("GET", f"/v1/tasks/{task_id}/events", None),
            ("GET", "/v1/tasks", None),
            ("POST", f"/v1/tasks/{task_id}/cancel", None),
            ("GET", "/v1/status", None),
            ("GET", "/v1/nodes", None),
            ("GET", "/v1/gpus", None),
            ("GET", "/v1/leases", None),
            ("GET", "/readyz", None),
        ]:
            await _unavailable(await api.request(method, path, json=body))
        assert (await api.get("/healthz")).status_code == 200


async def test_running_work_is_finished_and_stored_once_redis_is_back(
        outage_node: Node, redis: RedisProcess) -> None:
    task, _ = await outage_node.submit(outage_node.build_spec(preset="sleep",
                                                              input={"ms": 400}))
    await eventually(lambda: _state(outage_node, task.id, TaskState.RUNNING))
    redis.kill()
    outcomes = outage_node.supervisor.pipeline.outcomes
    await eventually(lambda: _true(outcomes.pending > 0))  # finished while Redis was down
    redis.start()
    done = await eventually(lambda: _final(outage_node, task.id), timeout=30)
    assert done.state is TaskState.SUCCEEDED and done.attempts == 1
    # And it takes work again, without a restart.
    again, _ = await outage_node.submit(outage_node.build_spec(preset="sleep",
                                                               input={"ms": 1}))
    assert (await outage_node.wait(again.id, 20)).state is TaskState.SUCCEEDED


async def _final(node: Node, task_id: str) -> Task | None:
    try:
        task = await node.get(task_id)
    except StoreUnavailableError:  # still reconnecting
        return None
    return task if task.state.final else None


async def _state(node: Node, task_id: str, state: TaskState) -> bool:
    return (await node.get(task_id)).state is state


async def _true(value: bool) -> bool:
    return value
