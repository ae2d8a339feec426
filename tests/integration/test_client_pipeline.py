"""The sync Client's pipelined submitter against a live node: enqueue() futures end through
shared results polls, 64 threads calling run() share bulk requests, a lone caller goes alone,
and each caller keeps its own answer, error and timeout."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from gpulane.client import Client
from gpulane.client import _core as core
from gpulane.errors import APIError, ClientError, TaskFailedError


def record(c: Client) -> list[str]:
    """The requests ``c`` sends from now on, as ``METHOD path``."""
    sent: list[str] = []
    lock = threading.Lock()
    send_once = c._send_once

    def spy(request: core.Request) -> Any:
        with lock:
            sent.append(f"{request.method} {request.path}")
        return send_once(request)

    c._send_once = spy  # type: ignore[method-assign]
    return sent


async def test_enqueued_futures_end_with_their_own_outcomes(live_url: str) -> None:
    def use() -> None:
        with Client(live_url) as c:
            sent = record(c)
            futures = [c.enqueue("sleep", {"ms": 0, "n": n}) for n in range(200)]
            bad = c.enqueue("no-such-preset", {})
            failed = c.enqueue("behave", {"action": "fail"})
            assert c.flush(timeout=30)
            outs = [f.result(30) for f in futures]
            assert all(o["state"] == "succeeded" for o in outs)
            assert [o["input"]["n"] for o in outs] == list(range(200))
            assert len({f.id for f in futures}) == 200
            with pytest.raises(APIError) as refused:
                _ = bad.id
            assert refused.value.status in (404, 422) and "no-such-preset" in str(refused.value)
            assert refused.value.field == "preset" and not bad.acknowledged()
            with pytest.raises(TaskFailedError) as ended:
                failed.result(30)
            assert ended.value.task["id"] == failed.id
            assert "POST /v1/tasks/bulk" in sent and sent.count("POST /v1/tasks/bulk") < 50
            assert set(sent) <= {"POST /v1/tasks/bulk", "POST /v1/tasks",
                                 "POST /v1/tasks/results"}

    await asyncio.to_thread(use)


async def test_64_threads_share_bulks_and_each_keeps_its_answer(live_url: str) -> None:
    def one(c: Client, n: int) -> dict[str, Any] | ClientError:
        try:
            if n == 5:
                return c.run("no-such-preset", {})
            if n == 6:
                return c.run("behave", {"action": "fail"})
            if n == 7:
                return c.run("behave-cpu", {"action": "slow", "s": 30}, timeout=0.3)
            return c.run("sleep", {"ms": 0, "n": n})
        except ClientError as exc:
            return exc

    def use() -> None:
        with Client(live_url) as c:
            sent = record(c)
            assert c.run("sleep", {"ms": 0})["state"] == "succeeded"
            assert sent == ["POST /v1/tasks"]  # a lone caller: exactly as before
            sent.clear()
            with ThreadPoolExecutor(64) as pool:
                answers = list(pool.map(lambda n: one(c, n), range(320)))
            unknown, failed, late = answers[5], answers[6], answers[7]
            assert isinstance(unknown, APIError) and "no-such-preset" in str(unknown)
            assert isinstance(failed, TaskFailedError)
            assert isinstance(late, dict) and late["state"] in ("queued", "running")
            rest = [a for n, a in enumerate(answers) if n not in (5, 6, 7)]
            assert all(isinstance(a, dict) and a["state"] == "succeeded" for a in rest)
            assert [a["input"]["n"] for a in rest if isinstance(a, dict)] == [
                n for n in range(320) if n not in (5, 6, 7)]
            assert "POST /v1/tasks/bulk" in sent and len(sent) < 320

    await asyncio.to_thread(use)
