"""SSE over a real socket, resumable with Last-Event-ID, and the SDK against a live node."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from gpulane.client import AsyncClient, Client
from gpulane.errors import APIError, TaskFailedError


def _parse_sse(text: str) -> list[tuple[int, str, str]]:
    out = []
    for block in text.strip().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line
                      and not line.startswith(":"))
        if "id" in fields:
            out.append((int(fields["id"]), fields["event"], fields["data"]))
    return out


async def test_sse_streams_live_and_closes_after_the_final_event(live_url: str) -> None:
    async with httpx.AsyncClient(base_url=live_url, timeout=20) as http:
        tid = (await http.post("/v1/tasks", json={"preset": "echo-stream",
                                                   "input": {"text": "one two three four"}})
               ).json()["id"]
        received: list[str] = []
        async with http.stream("GET", f"/v1/tasks/{tid}/events") as r:
            assert r.headers["content-type"].startswith("text/event-stream")
            async for chunk in r.aiter_text():
                received.append(chunk)
        events = _parse_sse("".join(received))
        ids = [e[0] for e in events]
        assert ids == list(range(1, len(ids) + 1))
        kinds = [e[1] for e in events]
        assert kinds[0] == "state" and kinds[-1] == "state"
        assert '"succeeded"' in events[-1][2]
        assert kinds.count("text_delta") == 4
        assert len(received) > 1  # delivered in pieces as they happened, not at the end


async def test_sse_resumes_after_last_event_id(live_url: str) -> None:
    async with httpx.AsyncClient(base_url=live_url, timeout=20) as http:
        tid = (await http.post("/v1/tasks?wait=10", json={"preset": "echo-stream",
                                                           "input": {"text": "a b c"}})
               ).json()["id"]
        full = _parse_sse((await http.get(f"/v1/tasks/{tid}/events")).text)
        cut = full[3][0]
        rest = _parse_sse((await http.get(f"/v1/tasks/{tid}/events",
                                          headers={"Last-Event-ID": str(cut)})).text)
        assert rest == full[4:]


async def test_sse_bad_last_event_id_is_422(live_url: str) -> None:
    async with httpx.AsyncClient(base_url=live_url) as http:
        tid = (await http.post("/v1/tasks", json={"preset": "sleep", "input": {}})).json()["id"]
        r = await http.get(f"/v1/tasks/{tid}/events", headers={"Last-Event-ID": "x"})
        assert r.status_code == 422 and r.json()["error"]["field"] == "Last-Event-ID"



async def test_sdk_round_trip(live_url: str) -> None:
    def work() -> None:
        with Client(live_url) as c:
            task = c.run("sleep", {"ms": 1})
            assert task["state"] == "succeeded" and task["output"] == {"slept_ms": 1}
            sub = c.submit("echo-stream", {"text": "x y"})
            kinds = [e["event"] for e in c.events(sub["id"])]
            assert kinds.count("text_delta") == 2 and kinds[-1] == "state"
            assert c.result(sub["id"], wait=10)["state"] == "succeeded"
            with pytest.raises(TaskFailedError) as exc:
                c.run("behave", {"action": "fail"})
            assert exc.value.task["error"]["kind"] == "bad_input"
            with pytest.raises(APIError) as api_exc:
                c.submit("nope", {})
            assert api_exc.value.status == 404 and api_exc.value.field == "preset"
            assert {p["name"] for p in c.presets()["presets"]} >= {"sleep"}
            assert c.gpus()["simulated"] is True
            many = c.submit_many([{"preset": "sleep", "input": {"ms": 0}}] * 3)
            assert len({t["id"] for t in many}) == 3
    await asyncio.to_thread(work)


async def test_async_sdk(live_url: str) -> None:
    async with AsyncClient(live_url) as c:
        results = await asyncio.gather(*(c.run("sleep", {"ms": 1}) for _ in range(10)))
        assert all(t["state"] == "succeeded" for t in results)
        sub = await c.submit("echo-stream", {"text": "p q r"})
        kinds = [e["event"] async for e in c.events(sub["id"])]
        assert kinds.count("text_delta") == 3
        slow = await c.submit("behave", {"action": "slow", "s": 30})
        cancelled = await c.cancel(slow["id"])
        assert cancelled["state"] in ("cancelled", "queued", "running")
        final = await c.result(slow["id"], wait=10)
        assert final["state"] == "cancelled"


async def test_sdk_idempotent_submit_returns_one_task(live_url: str) -> None:
    async with AsyncClient(live_url) as c:
        a = await c.submit("sleep", {"ms": 0}, idempotency_key="same")
        b = await c.submit("sleep", {"ms": 0}, idempotency_key="same")
        assert a["id"] == b["id"]
