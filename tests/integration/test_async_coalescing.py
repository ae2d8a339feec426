"""AsyncClient's coalescing against a live node: concurrent run()/submit() share bulk requests,
enqueue() hands back futures, and every caller keeps its own answer, error and timeout."""

from __future__ import annotations

import asyncio

import pytest

from gpulane.client import AsyncClient
from gpulane.client import _core as core
from gpulane.errors import APIError, TaskFailedError


def record(c: AsyncClient) -> list[str]:
    """The requests ``c`` sends from now on, as ``METHOD path``."""
    sent: list[str] = []
    send_once = c._send_once

    async def spy(request: core.Request) -> object:
        sent.append(f"{request.method} {request.path}")
        return await send_once(request)

    c._send_once = spy  # type: ignore[method-assign,assignment]
    return sent


async def test_concurrent_runs_share_bulk_requests_and_a_lone_one_goes_alone(
        live_url: str) -> None:
    async with AsyncClient(live_url) as c:
        sent = record(c)
        alone = await c.run("sleep", {"ms": 0})
        assert alone["state"] == "succeeded" and sent == ["POST /v1/tasks"]
        sent.clear()
        tasks = await asyncio.gather(*(c.run("sleep", {"ms": 0}) for _ in range(64)))
        assert all(t["state"] == "succeeded" and t["output"] == {"slept_ms": 0} for t in tasks)
        assert len({t["id"] for t in tasks}) == 64
        assert sent[0] == "POST /v1/tasks/bulk" and len(sent) < 64
        assert set(sent) <= {"POST /v1/tasks/bulk", "POST /v1/tasks/results"}


async def test_each_caller_keeps_its_own_answer_error_and_timeout(live_url: str) -> None:
    async with AsyncClient(live_url) as c:
        sent = record(c)
        calls = [c.run("sleep", {"ms": 0}),
                 c.run("no-such-preset", {}),  # refuses the whole bulk: resent item by item
                 c.run("behave", {"action": "fail"}),
                 c.run("behave-cpu", {"action": "slow", "s": 30}, timeout=0.3),
                 c.run("behave", {"action": "slow", "s": 0.8}),  # outlasts the bulk's hold
                 c.submit("sleep", {"ms": 0})]
        ok, unknown, failed, late, slow, submitted = await asyncio.gather(
            *calls, return_exceptions=True)
        assert isinstance(ok, dict) and ok["state"] == "succeeded"
        assert isinstance(unknown, APIError) and unknown.status in (404, 422)
        assert "no-such-preset" in str(unknown)
        assert isinstance(failed, TaskFailedError)
        assert isinstance(late, dict) and late["state"] in ("queued", "running")
        assert isinstance(slow, dict) and slow["state"] == "succeeded"
        assert isinstance(submitted, dict) and submitted["state"] in (
            "queued", "running", "succeeded")
        assert "POST /v1/tasks/bulk" in sent and "POST /v1/tasks/results" in sent
        await c.cancel(late["id"])


async def test_enqueue_hands_back_futures_collected_in_bulk(live_url: str) -> None:
    async with AsyncClient(live_url) as c:
        sent = record(c)
        futures = [c.enqueue("sleep", {"ms": 0}) for _ in range(300)]
        bad = c.enqueue("no-such-preset", {})
        assert not any(f.acknowledged() for f in futures) and futures[0].id is None
        await c.flush()
        assert all(f.acknowledged() and f.id for f in futures) and not bad.acknowledged()
        with pytest.raises(APIError, match="no-such-preset"):
            await bad.acknowledgement()
        tasks = [await f for f in futures]
        assert [t["id"] for t in tasks] == [f.id for f in futures]
        assert all(t["state"] == "succeeded" for t in tasks)
        assert sent.count("POST /v1/tasks/bulk") == 2 and sent.count("POST /v1/tasks") == 1
        assert len(sent) < 30, sent  # the bad item peeled off, the rest resent as one bulk
        first = futures[0]
        assert (await first.task())["state"] == "succeeded"
        failing = c.enqueue("behave", {"action": "fail"})
        with pytest.raises(TaskFailedError):
            await failing.result(timeout=30)
        slow = c.enqueue("behave-cpu", {"action": "slow", "s": 30})
        with pytest.raises(TimeoutError):
            await slow.result(timeout=0.2)
        assert (await slow.task())["state"] in ("queued", "running")
        await c.cancel(await slow.acknowledgement())


async def test_without_coalescing_each_call_is_its_own_request(live_url: str) -> None:
    async with AsyncClient(live_url, coalesce=False) as c:
        sent = record(c)
        tasks = await asyncio.gather(*(c.run("sleep", {"ms": 0}) for _ in range(5)))
        assert all(t["state"] == "succeeded" for t in tasks)
        assert sent.count("POST /v1/tasks") == 5 and "POST /v1/tasks/bulk" not in sent
