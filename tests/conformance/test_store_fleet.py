"""What every Store backend must do for a fleet: tell which nodes hold running attempts, and
take back at once every attempt of a node that died (backends: see conftest.py)."""

from __future__ import annotations

import pytest
from tests.conformance.test_store import claim_one, states, submit

from gpulane.errors import StaleTokenError
from gpulane.model import TaskState
from gpulane.store import Store


async def test_running_nodes_are_those_holding_a_running_attempt(store: Store) -> None:
    assert await store.running_nodes() == set()
    a = await submit(store, input=1)
    b = await submit(store, input=2)
    c = await submit(store, input=3)
    await claim_one(store, node="n1")
    await claim_one(store, node="n2")
    await claim_one(store, node="n2")
    assert await store.running_nodes() == {"n1", "n2"}
    await store.finish(b.id, 1, TaskState.SUCCEEDED)
    assert await store.running_nodes() == {"n1", "n2"}  # n2 still runs c
    await store.requeue(c.id, 1, None)
    assert await store.running_nodes() == {"n1"}
    await store.recover("n1")
    assert await store.running_nodes() == set()
    assert (await store.get(a.id)).state is TaskState.QUEUED  # type: ignore[union-attr]


async def test_reap_node_takes_back_every_attempt_of_that_node_and_spends_them(
        store: Store) -> None:
    retried = await submit(store, "p", input=1)
    last = await submit(store, "q", input=2)
    theirs = await submit(store, "p", input=3)
    await claim_one(store, "p", node="dead")
    await claim_one(store, "q", node="dead")
    await claim_one(store, "p", node="alive")

    taken = {t.id: t for t in await store.reap_node("dead", max_attempts={"p": 3, "q": 1})}
    assert set(taken) == {retried.id, last.id}
    back, failed = taken[retried.id], taken[last.id]
    assert back.state is TaskState.QUEUED and back.attempts == 1 and back.placement is None
    assert back.error is not None and back.error["code"] == "node_lost"
    assert back.error["kind"] == "worker_died" and "dead" in back.error["message"]
    assert failed.state is TaskState.FAILED and failed.error["code"] == "node_lost"  # type: ignore[index]
    assert failed.finished_at is not None
    assert await store.get(retried.id) == back
    assert await states(store, retried.id) == ["queued", "running", "queued"]
    assert await states(store, last.id) == ["queued", "running", "failed"]
    assert (await store.get(theirs.id)).state is TaskState.RUNNING  # type: ignore[union-attr]
    assert await store.running_nodes() == {"alive"}
    assert (await store.queue_stats())["p"].queued == 1

    with pytest.raises(StaleTokenError):  # the dead node's late outcome is fenced off
        await store.finish(retried.id, 1, TaskState.SUCCEEDED, output="late")
    assert await store.reap_node("dead") == []
    assert await store.reap_node("never-seen") == []
    again = await claim_one(store, "p", node="alive")
    assert again.id == retried.id and again.token == 2 and again.attempts == 2
