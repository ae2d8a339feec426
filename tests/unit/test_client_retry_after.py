"""The SDK honours Retry-After: a 429 or 503 that says when to come back is retried then,
within the retry budget and the call's deadline, and never counts against the circuit; when
it cannot be waited out the APIError carries ``retry_after``."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from gpulane.client import AsyncClient, BreakerConfig, BudgetConfig, CircuitBreaker, RetryPolicy
from gpulane.client.resilience import State
from gpulane.errors import APIError
from tests.unit.test_client_resilience import Script, aclient, client, task
from tests.unit.test_resilience import FakeClock


def full(after: str = "3", status: int = 429, code: str = "queue_full") -> httpx.Response:
    return httpx.Response(status, headers={"Retry-After": after}, json={"error": {
        "code": code, "message": "come back later", "field": "preset"}})


def test_a_full_queue_is_submitted_again_after_retry_after() -> None:
    script = Script(full("3"), full("2", 503, "draining"), httpx.Response(202, json=task()))
    c, sleeps = client(script)
    with c:
        assert c.submit("echo", 1)["id"] == "t1"
    # What the server said, never sooner, spread up to a fifth later (not the backoff's).
    assert len(sleeps) == 2 and 3.0 <= sleeps[0] <= 3.6 and 2.0 <= sleeps[1] <= 2.4, sleeps
    keys = {r.headers["idempotency-key"] for r in script.requests}
    assert len(keys) == 1  # the same submit each time


def test_come_back_answers_never_open_the_circuit() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker("x", BreakerConfig(min_calls=2, window_s=60), clock)
    c, _ = client(Script(full("1")), breaker=breaker,
                  retry=RetryPolicy(max_attempts=2), budget=None)
    with c:
        for _ in range(20):
            with pytest.raises(APIError) as info:
                c.get("t1")
            assert info.value.status == 429 and info.value.retry_after == 1.0
    assert breaker.state is State.CLOSED
    assert breaker.snapshot()["window"]["failures"] == 0


def test_a_429_without_retry_after_still_counts_as_a_failure() -> None:
    # Without a word on when to come back it is plain overload (a proxy's, say).
    clock = FakeClock()
    breaker = CircuitBreaker("x", BreakerConfig(min_calls=2, window_s=60), clock)
    c, _ = client(Script(httpx.Response(429, json={})), breaker=breaker,
                  retry=RetryPolicy(max_attempts=1), budget=None)
    with c:
        for _ in range(2):
            with pytest.raises(APIError):
                c.get("t1")
    assert breaker.state is State.OPEN


def test_a_retry_after_past_the_deadline_raises_with_retry_after() -> None:
    script = Script(full("8"), httpx.Response(200, json=task()))
    c, sleeps = client(script, retry=RetryPolicy(max_retry_after_s=30))
    with c, pytest.raises(APIError) as info:
        c.run("echo", 1, timeout=5)
    assert info.value.code == "queue_full" and info.value.retry_after == 8.0
    assert sleeps == [] and len(script.requests) == 1


def test_a_spent_budget_raises_with_retry_after() -> None:
    script = Script(full("1"))
    c, sleeps = client(script, budget=BudgetConfig(ratio=0.0, min_per_s=0.1, window_s=10))
    with c:
        with pytest.raises(APIError):
            c.get("t1")  # the budget's one retry (0.1/s over 10 s)
        assert len(sleeps) == 1 and 1.0 <= sleeps[0] <= 1.2
        with pytest.raises(APIError) as info:
            c.get("t1")
    assert len(sleeps) == 1  # no retry left: raised at once
    assert info.value.retry_after == 1.0 and info.value.attempts == 1
    assert c.stats()["retries_denied"] >= 1


async def test_the_async_client_waits_out_retry_after_too() -> None:
    script = Script(full("4"), httpx.Response(202, json=task()))
    c, sleeps = aclient(script)
    assert isinstance(c, AsyncClient)
    async with c:
        answer: dict[str, Any] = await c.submit("echo", 1)
    assert answer["id"] == "t1" and len(sleeps) == 1 and 4.0 <= sleeps[0] <= 4.8


def test_clients_refused_together_come_back_spread_out() -> None:
    """Retry-After is whole seconds: without a spread, every client refused in one second
    would come back in one instant, into the queue that refused them."""
    sleeps: list[float] = []
    for _ in range(20):
        script = Script(full("2"), httpx.Response(202, json=task()))
        c, got = client(script)
        with c:
            c.submit("echo", 1)
        sleeps += got
    assert all(2.0 <= s <= 2.4 for s in sleeps), sleeps
    assert max(sleeps) - min(sleeps) > 0.1  # spread, not in step (20 draws in [0, 0.4))
