"""AsyncClient's coalescing against a scripted server: how bulk and results answers, refusals
and failures reach each caller."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

import httpx
import pytest

from gpulane.client import AsyncClient
from gpulane.client import _core as core
from gpulane.client._coalesce_async import bad_item, bulk_request, resend_singly
from gpulane.errors import APIError, ClientError, TransportError

Handler = Callable[[httpx.Request], httpx.Response]


def client(handler: Handler, sent: list[str]) -> AsyncClient:
    def record(request: httpx.Request) -> httpx.Response:
        sent.append(f"{request.method} {request.url.path}")
        return handler(request)

    return AsyncClient("http://gl.test", transport=httpx.MockTransport(record), retry=None,
                       breaker=None, budget=None)


def task(n: int, state: str = "succeeded") -> dict[str, object]:
    return {"id": f"t{n}", "state": state, "output": n}


def preset_of(body: dict[str, object]) -> int:
    return int(str(body["preset"])[1:])


def test_the_sans_io_rules() -> None:
    one = core.submit(core.task_body("p", 1), "k1", wait=30.0, gpu=True)
    two = core.submit(core.task_body("p", 2), "k2", wait=30.0, gpu=True)
    bulk = bulk_request([one, two], 0.5)
    assert bulk.params == {"gpu": "true", "wait": "0.500"} and bulk.hold_s == 0.5
    assert [t["idempotency_key"] for t in bulk.json["tasks"]] == ["k1", "k2"]
    refused = APIError(422, "unknown_preset", "no preset", field="tasks[1].preset")
    assert bad_item(refused, 2) == 1 and bad_item(refused, 1) is None
    assert resend_singly(refused) and not resend_singly(APIError(429, "busy", "later"))
    assert not resend_singly(APIError(401, "unauthorized", "no key"))
    assert not resend_singly(TransportError("down"))


async def test_a_refused_bulk_is_resent_so_each_caller_gets_its_own_answer() -> None:
    sent: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        if request.url.path == "/v1/tasks/bulk":
            for i, item in enumerate(body["tasks"]):
                if preset_of(item) % 3 == 0:  # every third item is refused
                    return httpx.Response(422, json={"error": {
                        "code": "unknown_preset", "message": f"no {item['preset']}",
                        "field": f"tasks[{i}].preset"}})
            return httpx.Response(200, json={"tasks": [task(preset_of(i)) for i in body["tasks"]]})
        if preset_of(body) % 3 == 0:
            return httpx.Response(422, json={"error": {
                "code": "unknown_preset", "message": f"no {body['preset']}", "field": "preset"}})
        return httpx.Response(200, json=task(preset_of(body)))

    async with client(handler, sent) as c:
        out = await asyncio.gather(*(c.run(f"p{n}", None) for n in range(1, 11)),
                                   return_exceptions=True)
    for n, answer in enumerate(out, start=1):
        if n % 3 == 0:
            assert isinstance(answer, APIError) and answer.message == f"no p{n}"
        else:
            assert isinstance(answer, dict) and answer["output"] == n
    # 3 bad items peeled off one by one, then the 7 good ones in one bulk
    assert sent.count("POST /v1/tasks/bulk") == 4 and sent.count("POST /v1/tasks") == 3


async def test_results_polls_deliver_ends_and_name_missing_tasks() -> None:
    sent: list[str] = []
    polls: list[list[str]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        if request.url.path == "/v1/tasks/bulk":
            return httpx.Response(202, json={"tasks": [
                task(preset_of(i), "queued") for i in body["tasks"]]})
        ids = body["ids"]
        polls.append(ids)
        if len(polls) == 1:  # t1 ends, t2 is gone, t3 still runs
            return httpx.Response(200, json={"tasks": [task(1)], "pending": ["t3"],
                                             "missing": ["t2"]})
        return httpx.Response(200, json={"tasks": [task(3, "failed")], "pending": [],
                                         "missing": []})

    async with client(handler, sent) as c:
        one, two, three = await asyncio.gather(*(c.run(f"p{n}", None) for n in (1, 2, 3)),
                                               return_exceptions=True)
    assert isinstance(one, dict) and one["state"] == "succeeded"
    assert isinstance(two, APIError) and two.status == 404 and two.code == "unknown_task"
    assert type(three).__name__ == "TaskFailedError"
    assert polls == [["t1", "t2", "t3"], ["t3"]]


async def test_a_transport_failure_reaches_every_caller_of_the_request() -> None:
    sent: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    async with client(handler, sent) as c:
        out = await asyncio.gather(*(c.submit("p1", None) for _ in range(5)),
                                   return_exceptions=True)
    assert all(isinstance(e, TransportError) for e in out) and sent == ["POST /v1/tasks/bulk"]


async def test_a_cancelled_gatherer_leaves_the_others_to_be_sent() -> None:
    sent: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        return httpx.Response(202, json={"tasks": [task(preset_of(i), "queued")
                                                   for i in body["tasks"]]})

    async with client(handler, sent) as c:
        first = asyncio.ensure_future(c.submit("p1", None))
        others = [asyncio.ensure_future(c.submit(f"p{n}", None)) for n in (2, 3)]
        await asyncio.sleep(0)  # all three are gathered; the first waits for its turn's end
        first.cancel()
        answers = await asyncio.gather(*others)
    assert [a["id"] for a in answers] == ["t2", "t3"] and sent == ["POST /v1/tasks/bulk"]
    with pytest.raises(asyncio.CancelledError):
        await first


async def test_a_results_poll_that_fails_transiently_is_asked_again() -> None:
    sent: list[str] = []
    polls = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal polls
        body = json.loads(request.content)
        if request.url.path == "/v1/tasks/bulk":
            return httpx.Response(202, json={"tasks": [
                task(preset_of(i), "queued") for i in body["tasks"]]})
        polls += 1
        if polls == 1:
            raise httpx.ReadError("reset", request=request)
        return httpx.Response(200, json={"tasks": [task(n) for n in (1, 2)], "pending": [],
                                         "missing": []})

    async with client(handler, sent) as c:
        one, two = await asyncio.gather(c.run("p1", None), c.run("p2", None))
    assert (one["state"], two["state"]) == ("succeeded", "succeeded") and polls == 2


async def test_a_bulk_counts_as_its_callers_calls_in_the_retry_budget() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        return httpx.Response(202, json={"tasks": [task(preset_of(i), "queued")
                                                   for i in body["tasks"]]})

    c = AsyncClient("http://gl.test", transport=httpx.MockTransport(handler), retry=None,
                    breaker=None)
    async with c:
        await asyncio.gather(*(c.submit(f"p{n}", None) for n in range(1, 11)))
        budget = c.stats()["budget"]
    assert budget["calls"] == 10


async def test_close_sends_what_was_enqueued_and_ends_what_it_no_longer_collects() -> None:
    sent: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        if request.url.path == "/v1/tasks/bulk":
            return httpx.Response(202, json={"tasks": [
                task(preset_of(i), "queued") for i in body["tasks"]]})
        return httpx.Response(200, json={"tasks": [], "pending": body["ids"], "missing": []})

    async with client(handler, sent) as c:
        futures = [c.enqueue(f"p{n}", None) for n in (1, 2)]
    assert all(f.acknowledged() for f in futures) and sent == ["POST /v1/tasks/bulk"]
    with pytest.raises(ClientError, match="closed"):
        await futures[0].result()
