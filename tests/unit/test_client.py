"""gpulane.client through httpx.MockTransport: requests sent, answers parsed, errors mapped."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import httpx
import pytest

from gpulane.client import AsyncClient, Client
from gpulane.client import _core as core
from gpulane.errors import APIError, TaskFailedError, TransportError

Handler = Callable[[httpx.Request], httpx.Response]


def task(state: str = "queued", **extra: Any) -> dict[str, Any]:
    return {"id": "t1", "preset": "echo", "state": state, "input": {"x": 1}, "output": None,
            "error": None, "attempts": 0, "priority": 50, "device_wish": "auto",
            "placement": None, "created_at": 1.0, "started_at": None, "finished_at": None,
            **extra}


def sse(*events: tuple[int | None, str, Any]) -> bytes:
    out = []
    for eid, kind, data in events:
        if eid is not None:
            out.append(f"id: {eid}")
        out.append(f"event: {kind}")
        out.append(f"data: {json.dumps(data)}")
        out.append("")
    return ("\n".join(out) + "\n").encode()


class DroppingStream(httpx.SyncByteStream, httpx.AsyncByteStream):
    """Sends ``chunks``, then breaks the connection the way a dead peer does."""

    def __init__(self, *chunks: bytes) -> None:
        self.chunks = chunks

    def __iter__(self) -> Iterator[bytes]:
        yield from self.chunks
        raise httpx.RemoteProtocolError("peer closed connection")

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for chunk in self.chunks:
            yield chunk
        raise httpx.RemoteProtocolError("peer closed connection")


class Recorder:
    """A MockTransport handler that records requests and answers from a queue of responses."""

    def __init__(self, *responses: httpx.Response | Exception) -> None:
        self.responses = list(responses)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        request.read()
        self.requests.append(request)
        answer = self.responses.pop(0) if len(self.responses) > 1 else self.responses[0]
        if isinstance(answer, Exception):
            raise answer
        return answer

    def body(self, i: int = -1) -> Any:
        return json.loads(self.requests[i].content)


async def _no_sleep(seconds: float) -> None:
    pass


def client(handler: Handler, **kwargs: Any) -> Client:
    c = Client("http://gl.test", transport=httpx.MockTransport(handler), **kwargs)
    c.reconnect_backoff = (0.0, 0.0, 0.0)
    c._sleep = lambda seconds: None  # retries: no real waiting in unit tests
    return c


def aclient(handler: Handler, **kwargs: Any) -> AsyncClient:
    c = AsyncClient("http://gl.test", transport=httpx.MockTransport(handler), **kwargs)
    c.reconnect_backoff = (0.0, 0.0, 0.0)
    c._sleep = _no_sleep
    return c


# --- requests ------------------------------------------------------------------------------


def test_submit_sends_body_idempotency_key_and_token() -> None:
    rec = Recorder(httpx.Response(202, json=task()))
    with client(rec, token="s3cret") as c:
        answer = c.submit("echo", {"x": 1}, device="gpu", priority=70, timeout_s=5.0)
    assert answer["id"] == "t1"
    req = rec.requests[0]
    assert (req.method, req.url.path) == ("POST", "/v1/tasks")
    assert req.headers["authorization"] == "Bearer s3cret"
    key = req.headers["idempotency-key"]
    assert len(key) == 32 and int(key, 16) >= 0
    assert rec.body() == {"preset": "echo", "input": {"x": 1}, "device": "gpu", "priority": 70,
                          "timeout_s": 5.0, "content_type": None}
    assert "wait" not in req.url.params


def test_submit_keeps_given_key_makes_fresh_ones_and_passes_wait() -> None:
    rec = Recorder(httpx.Response(200, json=task("succeeded")))
    with client(rec) as c:
        c.submit("echo", 1, idempotency_key="k-1", wait=2.5)
        c.submit("echo", 1)
        c.submit("echo", 1)
    assert rec.requests[0].headers["idempotency-key"] == "k-1"
    assert rec.requests[0].url.params["wait"] == "2.5"
    # The server holds a ?wait= answer, so the read timeout must outlast it.
    assert rec.requests[0].extensions["timeout"]["read"] >= 2.5 + core.WAIT_SLACK
    assert rec.requests[1].headers["idempotency-key"] != rec.requests[2].headers["idempotency-key"]
    assert "authorization" not in rec.requests[1].headers


def test_submit_many_adds_missing_keys() -> None:
    rec = Recorder(httpx.Response(202, json={"tasks": [task(), task(id="t2")]}))
    with client(rec) as c:
        tasks = c.submit_many([{"preset": "echo", "input": 1},
                               {"preset": "echo", "input": 2, "idempotency_key": "mine"}])
    assert [t["id"] for t in tasks] == ["t1", "t2"]
    items = rec.body()["tasks"]
    assert len(items[0]["idempotency_key"]) == 32
    assert items[1]["idempotency_key"] == "mine"


def test_get_list_cancel_and_info_endpoints() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/healthz":
            return httpx.Response(200, text="ok")
        return httpx.Response(200, json={"path": request.url.path,
                                         "params": dict(request.url.params),
                                         "method": request.method})

    with client(handler) as c:
        assert c.get("t9")["path"] == "/v1/tasks/t9"
        page = c.list(state="running", preset="echo", limit=5, cursor="c1")
        assert page["params"] == {"state": "running", "preset": "echo", "limit": "5",
                                  "cursor": "c1"}
        assert c.list()["params"] == {"limit": "50"}
        assert c.cancel("t9") == {"path": "/v1/tasks/t9/cancel", "params": {}, "method": "POST"}
        assert c.presets()["path"] == "/v1/presets"
        assert c.gpus()["path"] == "/v1/gpus"
        assert c.workers()["path"] == "/v1/workers"
        assert c.health() == {"status": "ok"}
        with pytest.raises(ValueError):
            c.get("../etc")


def test_url_and_token_fall_back_to_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPULANE_URL", "http://envhost:9999/")
    monkeypatch.setenv("GPULANE_TOKEN", "envtok")
    rec = Recorder(httpx.Response(200, json=task()))
    with Client(transport=httpx.MockTransport(rec)) as c:
        c.get("t1")
    assert str(rec.requests[0].url) == "http://envhost:9999/v1/tasks/t1"
    assert rec.requests[0].headers["authorization"] == "Bearer envtok"
    monkeypatch.delenv("GPULANE_URL")
    assert Client().url == "http://127.0.0.1:8765"


# --- errors --------------------------------------------------------------------------------


def test_error_status_becomes_api_error_with_code_and_field() -> None:
    body = {"error": {"code": "unknown_preset", "message": "no preset 'nope'", "field": "preset"}}
    with client(Recorder(httpx.Response(404, json=body))) as c, pytest.raises(APIError) as info:
        c.submit("nope", None)
    err = info.value
    assert (err.status, err.code, err.field) == (404, "unknown_preset", "preset")
    assert err.message == "no preset 'nope'"
    assert err.body == body


def test_non_json_error_body_still_gives_a_useful_api_error() -> None:
    html = httpx.Response(502, text="<html>Bad Gateway from proxy</html>")
    with client(Recorder(html)) as c, pytest.raises(APIError) as info:
        c.get("t1")
    assert info.value.status == 502
    assert info.value.code == "http_502"
    assert "Bad Gateway" in info.value.message


def test_non_json_success_body_is_an_api_error() -> None:
    with client(Recorder(httpx.Response(200, text="oops"))) as c, pytest.raises(APIError) as info:
        c.get("t1")
    assert info.value.code == "bad_response"


@pytest.mark.parametrize("exc", [httpx.ConnectError("refused"), httpx.ReadTimeout("slow")])
def test_transport_failures_become_transport_error(exc: Exception) -> None:
    with client(Recorder(exc)) as c, pytest.raises(TransportError) as info:
        c.get("t1")
    assert info.value.__cause__ is exc
    assert "http://gl.test/v1/tasks/t1" in str(info.value)


# --- result / run --------------------------------------------------------------------------


def test_result_long_polls_until_final() -> None:
    rec = Recorder(httpx.Response(200, json=task("running")),
                   httpx.Response(200, json=task("running")),
                   httpx.Response(200, json=task("succeeded", output=42)))
    # The mock answers at once, as a server that caps ?wait= would; keep the pauses short.
    with client(rec) as c:
        done = c.result("t1", wait=100.0)
    assert done["output"] == 42
    assert len(rec.requests) == 3
    waits = [float(r.url.params["wait"]) for r in rec.requests]
    assert all(0 < w <= core.MAX_POLL_WAIT for w in waits)
    assert {r.url.path for r in rec.requests} == {"/v1/tasks/t1/result"}


def test_result_returns_non_final_task_when_wait_passes() -> None:
    rec = Recorder(httpx.Response(200, json=task("running")))
    with client(rec) as c:
        assert c.result("t1", wait=0.2)["state"] == "running"
        n = len(rec.requests)
        assert c.result("t1", wait=0)["state"] == "running"
    assert 1 <= n <= 5  # paced, not a tight loop
    assert rec.requests[-1].url.params["wait"] == "0"


def test_run_is_one_round_trip_for_a_fast_task() -> None:
    rec = Recorder(httpx.Response(200, json=task("succeeded", output="hi")))
    with client(rec) as c:
        assert c.run("echo", "hi", timeout=5)["output"] == "hi"
    assert len(rec.requests) == 1
    assert rec.requests[0].url.params["wait"] == "5"


def test_run_polls_then_raises_task_failed() -> None:
    failed = task("failed", error={"code": "oom", "kind": "oom", "message": "out of memory"})
    rec = Recorder(httpx.Response(202, json=task("queued")), httpx.Response(200, json=failed))
    with client(rec) as c, pytest.raises(TaskFailedError) as info:
        c.run("echo", 1, device="cpu")
    assert info.value.task["state"] == "failed"
    assert "out of memory" in str(info.value)
    assert rec.requests[1].url.path == "/v1/tasks/t1/result"
    assert rec.body(0)["device"] == "cpu"


def test_run_raises_on_cancelled() -> None:
    rec = Recorder(httpx.Response(200, json=task("cancelled")))
    with client(rec) as c, pytest.raises(TaskFailedError):
        c.run("echo", 1)


# --- events --------------------------------------------------------------------------------


def test_sse_decoder_handles_multiline_data_comments_and_ids() -> None:
    dec = core.SSEDecoder()
    lines = [": keep-alive", "id: 3", "event: text", "data: {\"a\":", "data: 1}", "",
             "event: log", "data:plain text: with colon", "", "id: 4", "", "data: [1,2]", "\r"]
    events = [e for line in lines if (e := dec.feed(line)) is not None]
    assert events == [{"id": 3, "event": "text", "data": {"a": 1}},
                      {"id": 3, "event": "log", "data": {"raw": "plain text: with colon"}},
                      {"id": 4, "event": "message", "data": {"value": [1, 2]}}]
    assert dec.last_event_id == 4


def test_events_parse_and_stop_after_final_state() -> None:
    body = (b": hello\n\nid: 1\nevent: progress\ndata: {\"progress\": 0.5,\ndata: \"m\": \"x\"}\n\n"
            + sse((2, "text_delta", {"delta": "hi"}), (3, "state", {"state": "succeeded"}),
                  (4, "log", {"line": "after the end"})))
    rec = Recorder(httpx.Response(200, content=body,
                                  headers={"content-type": "text/event-stream"}))
    with client(rec) as c:
        events = list(c.events("t1"))
    assert events == [{"id": 1, "event": "progress", "data": {"progress": 0.5, "m": "x"}},
                      {"id": 2, "event": "text_delta", "data": {"delta": "hi"}},
                      {"id": 3, "event": "state", "data": {"state": "succeeded"}}]
    assert rec.requests[0].headers["accept"] == "text/event-stream"
    assert "last-event-id" not in rec.requests[0].headers


def test_events_resume_with_last_event_id_after_a_drop() -> None:
    first = DroppingStream(sse((1, "progress", {"p": 1}), (2, "text_delta", {"delta": "a"}))
                           + b"id: 3\nevent: text_delta\ndata: {\"del")
    # This server ignores Last-Event-ID and replays everything: the client drops repeats.
    second = sse((1, "progress", {"p": 1}), (2, "text_delta", {"delta": "a"}),
                 (3, "text_delta", {"delta": "b"}), (4, "state", {"state": "failed"}))
    rec = Recorder(httpx.Response(200, stream=first), httpx.Response(200, content=second))
    with client(rec) as c:
        events = list(c.events("t1", last_event_id=0))
    assert [e["id"] for e in events] == [1, 2, 3, 4]
    assert events[2]["data"] == {"delta": "b"}
    assert rec.requests[0].headers["last-event-id"] == "0"
    assert rec.requests[1].headers["last-event-id"] == "2"


def test_events_end_normally_when_stream_just_ends() -> None:
    rec = Recorder(httpx.Response(200, content=sse((1, "progress", {"p": 1}))))
    with client(rec) as c:
        assert [e["id"] for e in c.events("t1")] == [1]
    assert len(rec.requests) == 1


def test_events_give_up_after_repeated_drops() -> None:
    requests: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        requests.append(request)
        return httpx.Response(200, stream=DroppingStream(b": nothing\n"))

    with client(handler) as c, pytest.raises(TransportError) as info:
        list(c.events("t1"))
    assert isinstance(info.value.__cause__, httpx.RemoteProtocolError)
    assert len(requests) == 1 + len(c.reconnect_backoff)


def test_events_reconnect_survives_a_refused_reconnect() -> None:
    rec = Recorder(httpx.Response(200, stream=DroppingStream(sse((5, "progress", {})))),
                   httpx.ConnectError("refused"),
                   httpx.Response(200, content=sse((6, "state", {"state": "succeeded"}))))
    with client(rec) as c:
        assert [e["id"] for e in c.events("t1")] == [5, 6]
    assert rec.requests[2].headers["last-event-id"] == "5"


def test_events_first_connect_failure_and_error_status_raise() -> None:
    with client(Recorder(httpx.ConnectError("refused"))) as c, pytest.raises(TransportError):
        list(c.events("t1"))
    missing = httpx.Response(404, json={"error": {"code": "not_found", "message": "no task"}})
    with client(Recorder(missing)) as c, pytest.raises(APIError) as info:
        list(c.events("t1"))
    assert info.value.code == "not_found"


# --- async twins ---------------------------------------------------------------------------


async def test_async_submit_get_and_errors() -> None:
    rec = Recorder(httpx.Response(202, json=task()),
                   httpx.Response(422, json={"error": {"code": "invalid_priority",
                                                       "message": "bad", "field": "priority"}}),
                   httpx.ConnectError("refused"))
    async with aclient(rec, token="t") as c:
        assert (await c.submit("echo", 1, idempotency_key="k"))["id"] == "t1"
        with pytest.raises(APIError) as info:
            await c.submit("echo", 1, priority=500)
        assert (info.value.code, info.value.field, info.value.status) == (
            "invalid_priority", "priority", 422)
        with pytest.raises(TransportError):
            await c.get("t1")
    assert rec.requests[0].headers["idempotency-key"] == "k"
    assert rec.requests[1].headers["idempotency-key"] != "k"
    assert rec.requests[0].headers["authorization"] == "Bearer t"


async def test_async_result_run_and_bulk() -> None:
    rec = Recorder(httpx.Response(200, json=task("running")),
                   httpx.Response(200, json=task("succeeded", output=1)),
                   httpx.Response(202, json=task("queued")),
                   httpx.Response(200, json=task("cancelled")),
                   httpx.Response(202, json={"tasks": [task()]}),
                   httpx.Response(200, json={"tasks": [], "next_cursor": None}))
    async with aclient(rec) as c:
        assert (await c.result("t1", wait=10))["output"] == 1
        with pytest.raises(TaskFailedError):
            await c.run("echo", 1, timeout=3)
        assert len(await c.submit_many([{"preset": "echo", "input": 1}])) == 1
        assert (await c.list(state="queued"))["tasks"] == []
    assert rec.requests[2].url.params["wait"] == "3"
    assert rec.requests[3].url.path == "/v1/tasks/t1/result"
    assert len(rec.body(4)["tasks"][0]["idempotency_key"]) == 32


async def test_async_events_resume_after_drop() -> None:
    first = DroppingStream(sse((1, "text_delta", {"delta": "a"})))
    second = sse((2, "text_delta", {"delta": "b\nc"}), (3, "state", {"state": "succeeded"}))
    rec = Recorder(httpx.Response(200, stream=first), httpx.Response(200, content=second))
    async with aclient(rec) as c:
        events = [e async for e in c.events("t1")]
    assert [e["data"].get("delta") for e in events] == ["a", "b\nc", None]
    assert rec.requests[1].headers["last-event-id"] == "1"


async def test_async_health_and_info() -> None:
    rec = Recorder(httpx.Response(200, json={"status": "ok"}))
    async with aclient(rec) as c:
        assert await c.health() == {"status": "ok"}
        assert await c.gpus() == {"status": "ok"}
        await c.presets()
        await c.workers()
        await c.cancel("t1")
    assert [r.url.path for r in rec.requests] == [
        "/healthz", "/v1/gpus", "/v1/presets", "/v1/workers", "/v1/tasks/t1/cancel"]
