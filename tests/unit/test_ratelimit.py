"""The per-key token bucket on a fake clock: burst, refill, Retry-After, one bucket per key."""

from __future__ import annotations

import pytest

from gpulane.api.ratelimit import RateLimiter, burst_of, retry_after_s
from tests.unit.conftest import Clock


def test_a_burst_goes_through_then_the_rate_holds() -> None:
    clock = Clock()
    limiter = RateLimiter(clock)
    assert [limiter.check("a", 2.0, 3) for _ in range(3)] == [0.0, 0.0, 0.0]
    wait = limiter.check("a", 2.0, 3)
    assert wait == pytest.approx(0.5)  # one token at 2/s
    clock.now += 0.25
    assert limiter.check("a", 2.0, 3) == pytest.approx(0.25)
    clock.now += 0.25
    assert limiter.check("a", 2.0, 3) == 0.0
    assert limiter.check("a", 2.0, 3) > 0


def test_the_bucket_never_fills_past_its_burst() -> None:
    clock = Clock()
    limiter = RateLimiter(clock)
    limiter.check("a", 1.0, 2)
    clock.now += 3600
    assert [limiter.check("a", 1.0, 2) == 0.0 for _ in range(3)] == [True, True, False]


def test_each_key_has_its_own_bucket_and_zero_is_no_limit() -> None:
    clock = Clock()
    limiter = RateLimiter(clock)
    assert limiter.check("a", 1.0, 1) == 0.0
    assert limiter.check("a", 1.0, 1) > 0
    assert limiter.check("b", 1.0, 1) == 0.0
    assert all(limiter.check("c", 0.0, 0) == 0.0 for _ in range(1000))
    assert len(limiter) == 2  # no bucket for an unlimited key


def test_a_changed_rate_starts_a_fresh_bucket() -> None:
    clock = Clock()
    limiter = RateLimiter(clock)
    limiter.check("a", 1.0, 1)
    assert limiter.check("a", 1.0, 1) > 0
    assert limiter.check("a", 5.0, 1) == 0.0


def test_burst_zero_is_one_seconds_worth_and_retry_after_is_a_whole_second_or_more() -> None:
    assert burst_of(10.0, 0) == 10.0 and burst_of(0.2, 0) == 1.0 and burst_of(2.5, 0) == 3.0
    assert burst_of(1.0, 7) == 7.0
    assert retry_after_s(0.001) == 1 and retry_after_s(1.0) == 1 and retry_after_s(1.2) == 2
