"""Client and AsyncClient resilience through httpx.MockTransport: retries, breaker, fallback.

Sleeps between retries are recorded instead of slept; where a breaker's clock matters it is a
fake one handed in through ``breaker=``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from gpulane.client import (
    AsyncClient,
    BreakerConfig,
    BudgetConfig,
    CircuitBreaker,
    Client,
    RetryPolicy,
    shared_breaker,
)
from gpulane.client import _core as core
from gpulane.client._base import DEFAULT_TIMEOUT
from gpulane.client.resilience import REGISTRY, State
from gpulane.errors import APIError, CircuitOpenError, TaskFailedError, TransportError
from tests.conftest import free_port
from tests.unit.test_resilience import FakeClock

Handler = Callable[[httpx.Request], httpx.Response]


def task(state: str = "succeeded", **extra: Any) -> dict[str, Any]:
    return {"id": "t1", "preset": "echo", "state": state, "input": 1, "output": "gpu",
            "error": None, "attempts": 1, **extra}


class Script:
    """Answers requests from a list of responses/exceptions (the last one repeats)."""

    def __init__(self, *answers: httpx.Response | BaseException) -> None:
        self.answers = list(answers)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        request.read()
        self.requests.append(request)
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, BaseException):
            raise answer
        return answer


class Sleeps(list[float]):
    def __call__(self, seconds: float) -> None:
        self.append(seconds)


def client(handler: Handler, **kwargs: Any) -> tuple[Client, Sleeps]:
    c = Client("http://gl.test", transport=httpx.MockTransport(handler), **kwargs)
    sleeps = Sleeps()
    c._sleep = sleeps
    return c, sleeps


def aclient(handler: Handler, **kwargs: Any) -> tuple[AsyncClient, Sleeps]:
    c = AsyncClient("http://gl.test", transport=httpx.MockTransport(handler), **kwargs)
    sleeps = Sleeps()

    async def record(seconds: float) -> None:
        sleeps.append(seconds)

    c._sleep = record
    return c, sleeps


REFUSED = httpx.ConnectError("[Errno 111] Connection refused")
RESET = httpx.ReadError("[Errno 104] Connection reset by peer")


@pytest.fixture(autouse=True)
def _fresh_registry() -> Iterator[None]:
    REGISTRY.clear()
    yield
    REGISTRY.clear()


# --- retries -------------------------------------------------------------------------------


def test_a_retried_submit_keeps_its_idempotency_key() -> None:
    script = Script(RESET, httpx.Response(503, text="busy"), httpx.Response(200, json=task()))
    c, sleeps = client(script)
    with c:
        assert c.submit("echo", 1)["id"] == "t1"
    keys = {r.headers["idempotency-key"] for r in script.requests}
    assert len(script.requests) == 3 and len(keys) == 1
    assert len(sleeps) == 2 and all(0 <= s <= 0.2 for s in sleeps)
    stats = c.stats()
    assert (stats["calls"], stats["attempts"], stats["retries"], stats["successes"]) == (
        1, 3, 2, 1)


def test_bulk_items_keep_their_keys_across_retries() -> None:
    script = Script(RESET, httpx.Response(202, json={"tasks": [task(), task(id="t2")]}))
    c, _ = client(script)
    with c:
        c.submit_many([{"preset": "echo", "input": 1}, {"preset": "echo", "input": 2}])
    first, second = (core_body(r)["tasks"] for r in script.requests)
    assert [i["idempotency_key"] for i in first] == [i["idempotency_key"] for i in second]


def core_body(request: httpx.Request) -> dict[str, Any]:
    import json

    body: dict[str, Any] = json.loads(request.content)
    return body


def test_retry_after_is_honoured() -> None:
    script = Script(httpx.Response(429, headers={"Retry-After": "1.5"}, json={}),
                    httpx.Response(200, json=task()))
    c, sleeps = client(script)
    with c:
        c.get("t1")
    assert len(sleeps) == 1 and 1.5 <= sleeps[0] <= 1.8, sleeps


def test_a_long_retry_after_is_not_waited_out() -> None:
    script = Script(httpx.Response(503, headers={"Retry-After": "600"}, text="maintenance"),
                    httpx.Response(200, json=task()))
    c, sleeps = client(script)
    with c, pytest.raises(APIError) as info:
        c.get("t1")
    assert info.value.status == 503 and info.value.retry_after == 600.0
    assert info.value.transient and len(script.requests) == 1 and sleeps == []


@pytest.mark.parametrize("status", [400, 401, 403, 404, 409, 413, 422, 500])
def test_permanent_errors_and_500_are_not_retried(status: int) -> None:
    script = Script(httpx.Response(status, json={"error": {"code": "no", "message": "no"}}))
    c, sleeps = client(script)
    with c, pytest.raises(APIError) as info:
        c.submit("echo", 1)
    assert info.value.status == status and info.value.attempts == 1
    assert len(script.requests) == 1 and sleeps == []


def test_transient_errors_are_retried_until_attempts_run_out() -> None:
    script = Script(REFUSED)
    c, sleeps = client(script, retry=RetryPolicy(max_attempts=3))
    with c, pytest.raises(TransportError) as info:
        c.get("t1")
    assert info.value.__cause__ is REFUSED and info.value.attempts == 3
    assert len(script.requests) == 3 and len(sleeps) == 2


def test_retry_none_sends_once() -> None:
    script = Script(REFUSED)
    c, _ = client(script, retry=None)
    with c, pytest.raises(TransportError):
        c.get("t1")
    assert len(script.requests) == 1


def test_a_long_poll_is_not_retried_in_a_tight_loop() -> None:
    script = Script(httpx.Response(502, text="proxy"), httpx.RemoteProtocolError("cut"),
                    httpx.Response(200, json=task()))
    c, sleeps = client(script)
    with c:
        assert c.result("t1", wait=10)["state"] == "succeeded"
    assert len(sleeps) == 2 and all(s >= RetryPolicy().long_poll_min_s for s in sleeps)


def test_an_event_stream_connect_is_retried() -> None:
    body = b"id: 1\nevent: state\ndata: {\"state\": \"succeeded\"}\n\n"
    script = Script(REFUSED, httpx.Response(200, content=body))
    c, _ = client(script)
    with c:
        assert [e["id"] for e in c.events("t1")] == [1]
    assert len(script.requests) == 2


def test_timeouts_are_per_phase_and_long_polls_read_longer() -> None:
    script = Script(httpx.Response(200, json=task()))
    c, _ = client(script)
    with c:
        c.get("t1")
        c.submit("echo", 1, wait=20)
    plain, held = (r.extensions["timeout"] for r in script.requests)
    assert plain == {"connect": DEFAULT_TIMEOUT.connect, "read": DEFAULT_TIMEOUT.read,
                     "write": DEFAULT_TIMEOUT.write, "pool": DEFAULT_TIMEOUT.pool}
    assert held["read"] == 20 + core.WAIT_SLACK and held["connect"] == DEFAULT_TIMEOUT.connect


def test_sync_client_takes_the_lean_pool_unless_http2_or_a_transport_is_asked_for() -> None:
    assert core.h2_available()
    with Client("http://gl.test") as c:
        assert c._fast is not None
    with Client("http://gl.test", http2=True) as c:
        assert c._fast is None
        assert c._http._transport._pool._http2 is True  # type: ignore[attr-defined]
    with Client("http://gl.test", transport=httpx.MockTransport(lambda r: httpx.Response(200))
                ) as c:
        assert c._fast is None


async def test_async_client_speaks_http2_when_h2_is_installed() -> None:
    async with AsyncClient("http://gl.test") as c:
        assert c._http._transport._pool._http2 is True  # type: ignore[attr-defined]
    async with AsyncClient("http://gl.test", http2=False) as c:
        assert c._http._transport._pool._http2 is False  # type: ignore[attr-defined]


# --- breaker -------------------------------------------------------------------------------


def test_the_breaker_opens_then_refuses_without_sending() -> None:
    script = Script(REFUSED)
    c, _ = client(script)
    with c:
        with pytest.raises(TransportError):
            c.get("t1")  # 4 attempts: under min_calls (5), still closed
        assert c.stats()["breaker"]["state"] == "closed"
        with pytest.raises(CircuitOpenError):
            c.get("t1")  # attempt 5 opens it, the retry is refused
        sent = len(script.requests)
        for _ in range(10):
            with pytest.raises(CircuitOpenError) as info:
                c.get("t1")
        assert info.value.url == "http://gl.test" and info.value.attempts == 0
        assert len(script.requests) == sent == 5
        stats = c.stats()
    assert stats["breaker"]["state"] == "open" and stats["rejected"] == 11
    assert stats["breaker"]["transitions"][-1]["to"] == "open"
    assert "failed" in stats["breaker"]["transitions"][-1]["reason"]


def test_slow_calls_count_but_long_polls_do_not() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        time.sleep(0.06)
        return httpx.Response(200, json=task("running"))

    cfg = BreakerConfig(slow_call_s=0.05, slow_rate=0.5, min_calls=3, window_s=60)
    c, _ = client(handler, breaker=cfg)
    with c:
        for _ in range(3):
            c.submit("echo", 1, wait=1)  # held by the server on purpose
        assert c.stats()["breaker"]["window"] == {
            "seconds": 60, "calls": 3, "failures": 0, "slow": 0, "failure_rate": 0.0}
        for _ in range(3):
            c.get("t1")
        assert c.stats()["breaker"]["state"] == "open"


def test_breakers_are_shared_per_url_across_clients() -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens: refused at once
    a, b = Client(url), Client(url)
    a._sleep = b._sleep = lambda s: None
    with a, b:
        assert a.breaker is b.breaker is shared_breaker(url)
        for _ in range(3):
            with pytest.raises(TransportError):
                a.health()
        assert a.stats()["breaker"]["state"] == "open"
        with pytest.raises(CircuitOpenError):
            b.health()
        assert b.stats()["attempts"] == 0
    # Another base URL, or a client with its own transport, has a breaker of its own.
    other = Client(f"http://127.0.0.1:{free_port()}")
    mocked = Client(url, transport=httpx.MockTransport(Script(httpx.Response(200))))
    assert other.breaker is not a.breaker and mocked.breaker is not a.breaker
    shared = Client(url, transport=httpx.MockTransport(Script(httpx.Response(200))),
                    breaker=shared_breaker(url))
    assert shared.breaker is a.breaker


def test_the_breaker_closes_after_the_open_interval_and_probes() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker("http://gl.test", BreakerConfig(open_s=5.0), clock)
    script = Script(httpx.Response(200, json=task()))
    c, _ = client(script, breaker=breaker)
    breaker.force_open("test")
    with c:
        with pytest.raises(CircuitOpenError) as info:
            c.get("t1")
        assert info.value.retry_in == 5.0
        clock.advance(5.0)
        for _ in range(3):
            c.get("t1")
    assert breaker.state is State.CLOSED
    assert [t["to"] for t in c.stats()["breaker"]["transitions"]] == [
        "open", "half_open", "closed"]


def test_a_cancelled_probe_gives_its_place_back() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker("x", BreakerConfig(open_s=1.0, half_open_probes=1), clock)
    script = Script(KeyboardInterrupt(), httpx.Response(200, json=task()))
    c, _ = client(script, breaker=breaker)
    breaker.force_open()
    clock.advance(1.0)
    with c:
        with pytest.raises(KeyboardInterrupt):
            c.get("t1")
        c.get("t1")  # the probe slot was released, so this one may probe
    assert breaker.state is State.CLOSED


# --- fallback ------------------------------------------------------------------------------


def test_run_falls_back_when_retries_are_exhausted() -> None:
    script = Script(RESET)
    c, _ = client(script)
    with c:
        done = c.run("embed", {"text": "hi"}, fallback=lambda: "cpu")
    assert done["output"] == "cpu" and done["state"] == "succeeded" and done["id"] is None
    assert done["fallback"]["reason"] == "retries_exhausted"
    assert "ReadError" in done["fallback"]["error"]
    assert len(script.requests) == 4
    assert c.stats()["fallbacks"] == 1


def test_run_falls_back_at_once_when_the_circuit_is_open() -> None:
    script = Script(httpx.Response(200, json=task()))
    breaker = CircuitBreaker("x", BreakerConfig())
    breaker.force_open()
    c, _ = client(script, breaker=breaker)
    with c:
        calls = [c.run("embed", i, fallback=lambda: "cpu") for i in range(5)]
    assert {d["fallback"]["reason"] for d in calls} == {"circuit_open"}
    assert script.requests == []
    assert c.stats()["fallbacks"] == 5 and c.stats()["rejected"] == 5


def test_run_without_fallback_raises_and_never_falls_back_for_caller_errors() -> None:
    used: list[int] = []
    c, _ = client(Script(httpx.Response(404, json={"error": {"code": "unknown_preset",
                                                              "message": "no"}})))
    with c, pytest.raises(APIError):
        c.run("nope", 1, fallback=lambda: used.append(1))
    failed = task("failed", error={"kind": "oom", "message": "out of memory"})
    c, _ = client(Script(httpx.Response(200, json=failed)))
    with c, pytest.raises(TaskFailedError):
        c.run("echo", 1, fallback=lambda: used.append(1))
    c, _ = client(Script(RESET))
    with c, pytest.raises(TransportError):
        c.run("echo", 1)
    assert used == []


def test_run_falls_back_when_the_result_poll_fails() -> None:
    script = Script(httpx.Response(202, json=task("queued")), RESET)
    c, _ = client(script)
    with c:
        assert c.run("echo", 1, fallback=lambda: "local")["output"] == "local"


def test_a_sync_client_refuses_an_async_fallback() -> None:
    async def local() -> str:
        return "x"

    c, _ = client(Script(RESET))
    with c, pytest.raises(TypeError, match="AsyncClient"):
        c.run("echo", 1, fallback=local)


def test_a_failing_fallback_raises_its_own_error() -> None:
    def broken() -> str:
        raise RuntimeError("cpu path broke too")

    c, _ = client(Script(RESET))
    with c, pytest.raises(RuntimeError) as info:
        c.run("echo", 1, fallback=broken)
    assert isinstance(info.value.__context__, TransportError)


# --- async ---------------------------------------------------------------------------------


async def test_async_retries_and_fallbacks_sync_and_async() -> None:
    script = Script(RESET, httpx.Response(200, json=task()))
    c, sleeps = aclient(script)

    async def local_async() -> str:
        await asyncio.sleep(0)
        return "async-cpu"

    async with c:
        assert (await c.run("echo", 1))["output"] == "gpu"
        assert len(sleeps) == 1
        c.breaker.force_open()  # type: ignore[union-attr]
        sync_done = await c.run("echo", 1, fallback=lambda: "sync-cpu")
        async_done = await c.run("echo", 1, fallback=local_async)
    assert sync_done["output"] == "sync-cpu" and async_done["output"] == "async-cpu"
    assert async_done["fallback"]["reason"] == "circuit_open"
    stats = c.stats()
    assert stats["fallbacks"] == 2 and stats["retries"] == 1 and stats["successes"] == 1


async def test_async_cancellation_releases_the_probe() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker("x", BreakerConfig(open_s=1.0, half_open_probes=1), clock)
    gate = asyncio.Event()

    async def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/slow"):
            await gate.wait()
        return httpx.Response(200, json=task())

    c = AsyncClient("http://gl.test", transport=httpx.MockTransport(handler), breaker=breaker)
    breaker.force_open()
    clock.advance(1.0)
    async with c:
        hung = asyncio.create_task(c.get("slow"))
        await asyncio.sleep(0.01)
        with pytest.raises(CircuitOpenError):
            await c.get("t1")  # the one probe slot is taken
        hung.cancel()
        with pytest.raises(asyncio.CancelledError):
            await hung
        await c.get("t1")
        stats = c.stats()
    assert breaker.state is State.CLOSED
    assert (stats["calls"], stats["cancelled"], stats["rejected"], stats["successes"]) == (
        3, 1, 1, 1)


async def test_async_budget_limits_retries_against_a_dead_server() -> None:
    script = Script(REFUSED)
    c, _ = aclient(script, breaker=None, budget=BudgetConfig(ratio=0.2, min_per_s=0.0))
    async with c:
        for _ in range(200):
            with pytest.raises(TransportError):
                await c.get("t1")
    stats = c.stats()
    assert stats["calls"] == 200
    assert stats["attempts"] <= 1.2 * 200 + 1
    assert stats["retries_denied"] > 0


def test_a_lease_wait_timeout_is_an_answer_not_a_transient_failure() -> None:
    from gpulane.client.resilience import classify

    answered = APIError(408, "lease_wait_timeout", "not granted within wait_s=1")
    proxy = APIError(408, "http_408", "Request Timeout")
    assert not answered.transient and proxy.transient
    assert classify(answered).kind == "permanent" and classify(proxy).kind == "transient"
