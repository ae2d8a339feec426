"""Admission: queue limits and the Retry-After drawn from a measured drain rate."""

from __future__ import annotations

import pytest

from gpulane.scheduling.admission import (
    RETRY_AFTER_MAX_S,
    SAMPLE_S,
    UNMEASURED_RETRY_S,
    Admission,
)
from gpulane.store.base import QueueStats
from tests.unit.conftest import Clock


def test_within_the_limit_nothing_is_refused() -> None:
    adm = Admission(10, Clock())
    assert adm.refusal("p", None, 9, 1) is None
    assert adm.refusal("p", 3, 2, 1) is None
    assert adm.refusal("p", 3, 3, 1) is not None  # its own limit wins


def test_unmeasured_the_retry_after_is_the_documented_guess() -> None:
    err = Admission(2, Clock()).refusal("p", None, 2, 1, "tasks[4].")
    assert err is not None and err.status == 429 and err.code == "queue_full"
    assert err.headers["Retry-After"] == str(UNMEASURED_RETRY_S)
    assert err.field == "tasks[4].preset"
    assert err.extra == {"queued": 2, "max_queued": 2, "adding": 1, "drain_per_s": None}


def test_retry_after_follows_the_measured_drain_rate() -> None:
    clock = Clock()
    adm = Admission(100, clock)
    adm.observe({"p": QueueStats(100, 0)})
    clock.now += 2.0
    adm.observe({"p": QueueStats(100, 20)})  # 10 tasks/s
    assert adm.drain_per_s("p") == pytest.approx(10.0)
    err = adm.refusal("p", None, 100, 50)  # 50 over: 5 s at 10/s
    assert err is not None and err.headers["Retry-After"] == "5"
    assert err.extra["drain_per_s"] == 10.0
    # A reading closer than SAMPLE_S is skipped: the rate does not jump on noise.
    clock.now += SAMPLE_S / 2
    adm.observe({"p": QueueStats(100, 1000)})
    assert adm.drain_per_s("p") == pytest.approx(10.0)


def test_the_rate_is_a_moving_average_that_follows_a_change() -> None:
    clock = Clock()
    adm = Admission(1, clock)
    claimed = 0
    adm.observe({"p": QueueStats(5, claimed)})
    for _ in range(10):
        clock.now += 1
        claimed += 10
        adm.observe({"p": QueueStats(5, claimed)})
    assert adm.drain_per_s("p") == pytest.approx(10.0)
    for _ in range(60):  # the queue stops draining: the rate falls towards 0
        clock.now += 1
        adm.observe({"p": QueueStats(5, claimed)})
    rate = adm.drain_per_s("p")
    assert rate is not None and rate < 0.1
    err = adm.refusal("p", None, 5, 1)
    assert err is not None and int(err.headers["Retry-After"]) == RETRY_AFTER_MAX_S


@pytest.mark.parametrize(("excess", "rate", "after"), [
    (1, 1000.0, 1), (10, 3.0, 4), (10**6, 1.0, RETRY_AFTER_MAX_S), (5, 0.0, RETRY_AFTER_MAX_S),
    (5, None, UNMEASURED_RETRY_S)])
def test_retry_after_is_whole_seconds_within_bounds(excess: int, rate: float | None,
                                                    after: int) -> None:
    assert Admission.retry_after_s(excess, rate) == after


def test_a_store_reopened_counts_no_negative_drain() -> None:
    clock = Clock()
    adm = Admission(1, clock)
    adm.observe({"p": QueueStats(0, 500)})
    clock.now += 2
    adm.observe({"p": QueueStats(0, 3)})
    assert adm.drain_per_s("p") == 0.0
