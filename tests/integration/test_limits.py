"""Limits a caller meets at the door: JSON bodies only (415), the body limit held while the
body is read (413, readable by a client that sends its whole body first), full queues (429
with Retry-After)."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from gpulane.api.app import create_app
from gpulane.api.bodies import DISCARD_MAX_BYTES, DISCARD_MAX_S
from gpulane.node import Node
from tests.conftest import LoopClock, settle
from tests.integration.conftest import make_settings, node_api, stop_node


def _error(r: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    err: dict[str, Any] = r.json()["error"]
    assert err["code"] == code and err["message"]
    return err


# -- 415 ---------------------------------------------------------------------------------------

LEASE = b'{"holder": "page", "vram_mb": 1024, "priority": "immediate"}'
TASK = b'{"preset": "sleep", "input": {"ms": 0}}'


@pytest.mark.parametrize("content_type", [
    "text/plain", "text/plain;charset=UTF-8", "application/x-www-form-urlencoded",
    "multipart/form-data; boundary=x", None])
async def test_a_body_that_is_not_declared_json_is_refused(
        api: httpx.AsyncClient, node: Node, content_type: str | None) -> None:
    # What a web page may send any site without a preflight: refused before it acts.
    headers = {} if content_type is None else {"Content-Type": content_type}
    for path, body in (("/v1/leases", LEASE), ("/v1/tasks", TASK),
                       ("/v1/tasks/bulk", b'{"tasks": [%s]}' % TASK)):
        # httpx adds no Content-Type for content=: None sends none at all.
        err = _error(await api.post(path, content=body, headers=headers), 415,
                     "unsupported_media_type")
        assert err["field"] == "Content-Type"
        assert "application/json" in err["message"]
    assert node.active_leases() == []
    page = await api.get("/v1/tasks")
    assert page.json()["tasks"] == []


@pytest.mark.parametrize("content_type", [
    "application/json", "Application/JSON", "application/json; charset=utf-8",
    "application/merge-patch+json"])
async def test_json_content_types_are_taken(api: httpx.AsyncClient, content_type: str) -> None:
    r = await api.post("/v1/tasks", content=TASK, headers={"Content-Type": content_type})
    assert r.status_code == 202, r.text


# -- 413 ---------------------------------------------------------------------------------------

@pytest.fixture
async def small(tmp_path: Path) -> AsyncIterator[Node]:
    n = Node(make_settings(tmp_path, max_input_bytes=4096))
    await n.start()
    try:
        yield n
    finally:
        await stop_node(n)


def _urllib_post(url: str, body: bytes) -> tuple[int, dict[str, Any], str]:
    """POST as urllib does: the whole body is sent before the answer is read."""
    req = urllib.request.Request(url, data=body, method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read()), r.headers.get("Connection", "")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read()), exc.headers.get("Connection", "")


async def test_urllib_sending_11_mib_reads_the_413(live_url: str) -> None:
    body = b'{"preset": "sleep", "input": "' + b"x" * (11 * 1024 * 1024) + b'"}'
    status, answer, connection = await asyncio.to_thread(
        _urllib_post, f"{live_url}/v1/tasks", body)
    assert status == 413
    assert answer["error"]["code"] == "payload_too_large"
    assert "max_input_bytes" in answer["error"]["message"]
    assert connection.lower() == "close"


async def test_a_chunked_body_over_the_limit_is_413_on_a_real_server(live_url: str) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"preset": "sleep", "input": "'
        for _ in range(200):  # 12.5 MiB, no Content-Length
            yield b"x" * 65536
        yield b'"}'

    async with httpx.AsyncClient(base_url=live_url, timeout=30) as c:
        r = await c.post("/v1/tasks", content=chunks(),
                         headers={"Content-Type": "application/json"})
        err = _error(r, 413, "payload_too_large")
        assert err["field"] == "input"
        assert r.headers["connection"] == "close"
        # The node still serves (a new connection).
        ok = await c.post("/v1/tasks", content=TASK,
                          headers={"Content-Type": "application/json"})
        assert ok.status_code == 202, ok.text


async def _raw(app: Any, headers: list[tuple[bytes, bytes]],
               chunks: AsyncIterator[bytes]) -> tuple[int, dict[str, Any], int]:
    """Call the ASGI app with a body fed chunk by chunk: (status, error body, bytes the app
    pulled from the body)."""
    pulled = 0
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        nonlocal pulled
        chunk = await anext(chunks)
        pulled += len(chunk)
        return {"type": "http.request", "body": chunk, "more_body": True}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": "/v1/tasks", "raw_path": b"/v1/tasks",
             "root_path": "", "query_string": b"", "server": ("t", 80), "client": ("c", 1),
             "headers": [(b"host", b"t"), (b"content-type", b"application/json"), *headers]}
    await app(scope, receive, send)
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], json.loads(body), pulled


async def test_an_endless_body_is_cut_off_after_a_bounded_read(small: Node) -> None:
    # Without a Content-Length and never ending: the body is neither held whole (the old
    # reader buffered it all before measuring) nor read forever.
    async def endless() -> AsyncIterator[bytes]:
        while True:
            yield b"x" * 65536

    status, answer, pulled = await _raw(create_app(small, manage_node=False), [], endless())
    assert status == 413 and answer["error"]["code"] == "payload_too_large"
    assert pulled <= 4096 + DISCARD_MAX_BYTES + 2 * 65536


async def test_a_sender_that_stalls_past_the_limit_is_answered_after_the_discard_bound(
        small: Node, loop_clock: LoopClock) -> None:
    stalled = asyncio.Event()

    async def stalls() -> AsyncIterator[bytes]:
        yield b"x" * 8192  # past the limit of 4096
        stalled.set()
        await asyncio.Event().wait()  # then nothing, ever
        yield b""

    call = asyncio.create_task(_raw(create_app(small, manage_node=False), [], stalls()))
    await stalled.wait()
    await settle()
    assert not call.done()  # still throwing the body away
    await loop_clock.advance(DISCARD_MAX_S)
    status, answer, _ = await asyncio.wait_for(call, 10)
    assert status == 413 and answer["error"]["code"] == "payload_too_large"


async def test_a_declared_length_past_the_discard_bound_is_answered_unread(small: Node) -> None:
    async def never() -> AsyncIterator[bytes]:
        raise AssertionError("the body was read")
        yield b""

    length = str(DISCARD_MAX_BYTES + 1).encode()
    status, answer, pulled = await _raw(create_app(small, manage_node=False),
                                        [(b"content-length", length)], never())
    assert status == 413 and pulled == 0
    assert str(DISCARD_MAX_BYTES + 1) in answer["error"]["message"]


# -- 429 queue_full ----------------------------------------------------------------------------

SLEEP_WORKER = Path(__file__).parents[2] / "examples" / "presets" / "workers" / "sleep_worker.py"


@pytest.fixture
async def capped(tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    """A node whose queues hold 3 tasks (``capped`` sets its own 2), with nothing started:
    the scheduler is paused, so what is queued stays queued."""
    presets = tmp_path / "capped.yaml"
    presets.write_text(f"presets:\n  - name: capped\n    argv: [python, {SLEEP_WORKER}]\n"
                       "    devices: [cpu]\n    max_queued: 2\n")
    async with node_api(tmp_path, paused=True, max_queued=3, presets=[str(presets)]) as api:
        yield api


async def _queue(api: httpx.AsyncClient, preset: str, n: int) -> list[str]:
    ids = []
    for _ in range(n):
        r = await api.post("/v1/tasks", json={"preset": preset, "input": {"ms": 0}})
        assert r.status_code == 202, r.text
        ids.append(r.json()["id"])
    return ids


async def test_a_full_queue_is_429_with_retry_after_and_the_numbers(
        capped: httpx.AsyncClient) -> None:
    await _queue(capped, "sleep", 3)  # the node's max_queued
    r = await capped.post("/v1/tasks", json={"preset": "sleep", "input": {"ms": 0}})
    err = _error(r, 429, "queue_full")
    assert err["field"] == "preset"
    assert err["queued"] == 3 and err["max_queued"] == 3 and err["adding"] == 1
    assert err["drain_per_s"] is None  # nothing measured yet on a paused node
    assert int(r.headers["Retry-After"]) >= 1
    assert "max_queued" in err["message"]
    # The preset's own limit wins over the node's; other presets are not held up.
    await _queue(capped, "capped", 2)
    _error(await capped.post("/v1/tasks", json={"preset": "capped"}), 429, "queue_full")
    status = (await capped.get("/v1/status")).json()
    assert status["presets"]["capped"]["queued"] == 2
    assert status["presets"]["capped"]["max_queued"] == 2
    assert status["presets"]["sleep"]["max_queued"] == 3


async def test_a_repeated_keyed_submit_gets_its_task_from_a_full_queue(
        capped: httpx.AsyncClient) -> None:
    first = await capped.post("/v1/tasks", json={"preset": "capped"},
                              headers={"Idempotency-Key": "k1"})
    await _queue(capped, "capped", 1)
    again = await capped.post("/v1/tasks", json={"preset": "capped"},
                              headers={"Idempotency-Key": "k1"})
    assert again.status_code == 202 and again.json()["id"] == first.json()["id"]
    # The same key with another body is still the conflict it always was.
    other = await capped.post("/v1/tasks", json={"preset": "capped", "input": 1},
                              headers={"Idempotency-Key": "k1"})
    assert other.status_code == 409
    _error(await capped.post("/v1/tasks", json={"preset": "capped"},
                             headers={"Idempotency-Key": "k2"}), 429, "queue_full")
    # In a bulk too: the repeat rides along, the new one is refused and so is the whole.
    bulk = await capped.post("/v1/tasks/bulk", json={"tasks": [
        {"preset": "capped", "idempotency_key": "k1"}]})
    assert bulk.status_code == 202 and bulk.json()["tasks"][0]["id"] == first.json()["id"]


async def test_a_bulk_that_would_pass_the_limit_is_refused_whole(
        capped: httpx.AsyncClient) -> None:
    await _queue(capped, "sleep", 1)
    r = await capped.post("/v1/tasks/bulk", json={"tasks": [
        {"preset": "capped"}, {"preset": "sleep"}, {"preset": "sleep"}, {"preset": "sleep"}]})
    err = _error(r, 429, "queue_full")
    assert err["field"] == "tasks[1].preset" and err["adding"] == 3
    page = (await capped.get("/v1/tasks")).json()["tasks"]
    assert len(page) == 1  # all or none: nothing of the bulk was queued
    ok = await capped.post("/v1/tasks/bulk", json={"tasks": [
        {"preset": "capped"}, {"preset": "sleep"}, {"preset": "sleep"}]})
    assert ok.status_code == 202, ok.text


async def test_a_bulk_larger_than_the_limit_itself_is_422_not_a_429_to_wait_out(
        capped: httpx.AsyncClient) -> None:
    # Three tasks of a preset whose queue holds two fit no matter how long one waits: a
    # Retry-After would send the SDK back again and again for nothing.
    r = await capped.post("/v1/tasks/bulk", json={"tasks": [{"preset": "sleep"}] + [
        {"preset": "capped"}] * 3})
    err = _error(r, 422, "exceeds_max_queued")
    assert err["field"] == "tasks[1].preset"
    assert (err["adding"], err["max_queued"]) == (3, 2)
    assert "retry-after" not in r.headers
    assert "send at most 2 at once" in err["message"]
    assert (await capped.get("/v1/tasks")).json()["tasks"] == []


async def test_submit_cancel_and_retry_cannot_fill_a_queue_past_its_limit(
        capped: httpx.AsyncClient) -> None:
    first = await _queue(capped, "capped", 2)
    for task_id in first:
        assert (await capped.post(f"/v1/tasks/{task_id}/cancel")).json()["state"] == "cancelled"
    await _queue(capped, "capped", 2)  # the queue is at its limit again
    r = await capped.post(f"/v1/tasks/{first[0]}/retry")
    err = _error(r, 429, "queue_full")
    assert (err["queued"], err["max_queued"], err["adding"]) == (2, 2, 1)
    assert int(r.headers["Retry-After"]) >= 1
    assert (await capped.get("/v1/status")).json()["presets"]["capped"]["queued"] == 2
    # Another preset's dead letter is not held up by this one's full queue.
    other = (await _queue(capped, "sleep", 1))[0]
    await capped.post(f"/v1/tasks/{other}/cancel")
    assert (await capped.post(f"/v1/tasks/{other}/retry")).json()["state"] == "queued"
