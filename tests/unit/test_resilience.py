"""gpulane.client.resilience on its own: classification, backoff, budget, breaker, one call.

Every state machine runs on a fake clock and a scripted random source: nothing sleeps.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator

import httpx
import pytest

from gpulane.client.resilience import (
    REGISTRY,
    BreakerConfig,
    BudgetConfig,
    CircuitBreaker,
    Outcome,
    Registry,
    Resilience,
    RetryBudget,
    RetryPolicy,
    State,
    classify,
    classify_exception,
    classify_status,
    parse_retry_after,
    shared_breaker,
)
from gpulane.errors import (
    PERMANENT_STATUSES,
    TRANSIENT_STATUSES,
    APIError,
    CircuitOpenError,
    ClientError,
    TransportError,
)


class FakeClock:
    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def transport_error(exc: Exception) -> TransportError:
    err = TransportError(str(exc))
    err.__cause__ = exc
    return err


# --- classification ------------------------------------------------------------------------


@pytest.mark.parametrize("status", sorted(TRANSIENT_STATUSES))
def test_transient_statuses_are_retried_and_count_against_the_circuit(status: int) -> None:
    verdict = classify_status(status)
    assert (verdict.kind, verdict.retry, verdict.outcome) == ("transient", True, Outcome.FAILURE)
    assert APIError(status, "x", "y").transient


@pytest.mark.parametrize("status", sorted(PERMANENT_STATUSES | {405, 410, 415}))
def test_permanent_statuses_are_never_retried_nor_held_against_the_circuit(status: int) -> None:
    verdict = classify_status(status)
    assert (verdict.kind, verdict.retry, verdict.outcome) == ("permanent", False, Outcome.SUCCESS)
    assert not APIError(status, "x", "y").transient


def test_other_server_errors_count_against_the_circuit_but_are_not_retried() -> None:
    for status in (500, 501, 505):
        verdict = classify_status(status)
        assert (verdict.retry, verdict.outcome) == (False, Outcome.FAILURE)


@pytest.mark.parametrize("exc", [
    httpx.ConnectError("[Errno 111] Connection refused"),
    httpx.ConnectError("[Errno -2] Name or service not known"),  # DNS failure
    httpx.ConnectTimeout("connect"), httpx.ReadTimeout("read"), httpx.WriteTimeout("write"),
    httpx.ReadError("[Errno 104] Connection reset by peer"),
    httpx.RemoteProtocolError("Server disconnected without sending a response."),
])
def test_network_failures_are_transient(exc: Exception) -> None:
    verdict = classify(transport_error(exc))
    assert (verdict.kind, verdict.retry, verdict.outcome) == ("transient", True, Outcome.FAILURE)


def test_maybe_sent_requests_are_repeated_only_when_idempotent() -> None:
    reset = httpx.ReadError("reset")
    assert classify_exception(reset, idempotent=False).retry is False
    assert classify_exception(reset, idempotent=False).outcome is Outcome.FAILURE
    # Refused: the server never saw it, so even a non-idempotent request may go again.
    assert classify_exception(httpx.ConnectError("refused"), idempotent=False).retry is True


@pytest.mark.parametrize("exc", [httpx.PoolTimeout("pool"), httpx.UnsupportedProtocol("ftp"),
                                 httpx.LocalProtocolError("bad header")])
def test_local_errors_say_nothing_about_the_server(exc: Exception) -> None:
    verdict = classify_exception(exc)
    assert (verdict.retry, verdict.outcome) == (False, Outcome.IGNORED)


def test_retry_after_parses_seconds_and_dates() -> None:
    assert parse_retry_after("3", 0.0) == 3.0
    assert parse_retry_after(" 0.5 ", 0.0) == 0.5
    assert parse_retry_after("-4", 0.0) == 0.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:10 GMT", 1445412480.0) == 10.0
    assert parse_retry_after("soon", 0.0) is None
    assert parse_retry_after("nan", 0.0) is None
    assert parse_retry_after(None, 0.0) is None


# --- backoff and budget --------------------------------------------------------------------


def test_backoff_is_capped_exponential_full_jitter() -> None:
    policy = RetryPolicy(base_s=0.1, cap_s=1.0)
    assert policy.backoff(1, 0.0) == 0.0
    assert policy.backoff(1, 0.999) == pytest.approx(0.0999)
    assert policy.backoff(3, 0.5) == pytest.approx(0.2)
    assert policy.backoff(10, 0.999) == pytest.approx(0.999)  # capped at 1 s
    rng = random.Random(7)
    delays = [policy.backoff(2, rng.random()) for _ in range(2000)]
    assert 0 <= min(delays) < 0.01 and 0.19 < max(delays) <= 0.2  # spread over [0, 0.2]
    with pytest.raises(ValueError):
        RetryPolicy(max_attempts=0)


def test_budget_allows_a_fraction_of_calls_plus_a_floor() -> None:
    clock = FakeClock()
    budget = RetryBudget(BudgetConfig(ratio=0.2, min_per_s=0.5, window_s=10.0), clock)
    granted = sum(budget.try_retry() for _ in range(100))
    assert granted == 5  # the floor alone: 0.5/s over 10 s
    for _ in range(100):
        budget.record_call()
    granted = sum(budget.try_retry() for _ in range(100))
    assert granted == 20  # 20 % of the 100 calls now in the window
    assert budget.snapshot()["retries_left"] == 0
    clock.advance(11.0)  # everything slid out of the window
    assert budget.snapshot() == {"window_s": 10.0, "calls": 0, "retries": 0, "retries_left": 5}
    assert budget.try_retry()


# --- breaker -------------------------------------------------------------------------------


def run_load(breaker: CircuitBreaker, clock: FakeClock, seconds: float, rate: float,
             fail: float | None = None, rng: random.Random | None = None,
             failing: bool = False) -> None:
    """Feed ``rate`` requests per second for ``seconds``; each fails with probability ``fail``
    (or always, with ``failing``); refused requests are skipped like a client would."""
    step = 1.0 / rate
    for _ in range(int(seconds * rate)):
        clock.advance(step)
        permit = breaker.acquire()
        if permit is None:
            continue
        bad = failing or (fail is not None and rng is not None and rng.random() < fail)
        breaker.record(permit, Outcome.FAILURE if bad else Outcome.SUCCESS, 0.002)


def test_breaker_needs_min_calls_before_it_may_open() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker("b", BreakerConfig(min_calls=5), clock)
    for _ in range(4):  # one call's four failed attempts
        permit = breaker.acquire()
        assert permit is not None
        breaker.record(permit, Outcome.FAILURE, 0.001)
    assert breaker.state is State.CLOSED
    permit = breaker.acquire()
    assert permit is not None
    breaker.record(permit, Outcome.FAILURE, 0.001)
    assert breaker.state is State.OPEN
    assert breaker.acquire() is None


def test_a_burst_of_errors_under_load_does_not_open_it() -> None:
    clock, rng = FakeClock(), random.Random(1)
    breaker = CircuitBreaker("b", BreakerConfig(), clock)
    run_load(breaker, clock, 2.0, 500, fail=0.05, rng=rng)  # 5 % errors, steadily
    run_load(breaker, clock, 0.3, 500, failing=True)        # a 300 ms outage under load
    run_load(breaker, clock, 2.0, 500, fail=0.05, rng=rng)
    assert breaker.state is State.CLOSED
    assert breaker.snapshot()["opened"] == 0


@pytest.mark.parametrize("fail_rate", [500, 100, 20])
def test_a_dead_server_opens_it_within_a_second(fail_rate: int) -> None:
    """Healthy at 500 requests/s; then every request fails, as fast as the successes came or
    (retries backing off) far slower."""
    clock = FakeClock()
    breaker = CircuitBreaker("b", BreakerConfig(), clock)
    run_load(breaker, clock, 3.0, 500)
    died = clock.now
    while breaker.state is State.CLOSED and clock.now - died < 5:
        run_load(breaker, clock, 0.05, fail_rate, failing=True)
    assert breaker.state is State.OPEN
    assert clock.now - died <= 0.6


def test_sparse_or_slow_failures_open_it_through_the_streak_rule() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker("b", BreakerConfig(), clock)
    failed = 0
    while breaker.state is State.CLOSED:  # a quiet app: a failure every 0.4 s (timeouts, say)
        clock.advance(0.4)
        permit = breaker.acquire()
        assert permit is not None
        breaker.record(permit, Outcome.FAILURE, 0.4)
        failed += 1
    # The 1 s window never holds min_calls (5) of them; five in a row over 1.6 s do it.
    assert failed == 5
    assert "in a row" in breaker.transitions[-1]["reason"]


def test_open_then_half_open_probes_then_closed(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "gpulane.client")
    clock = FakeClock()
    cfg = BreakerConfig(open_s=5.0, half_open_probes=3)
    breaker = CircuitBreaker("http://gpu:1", cfg, clock)
    breaker.force_open("test")
    assert breaker.acquire() is None
    assert breaker.retry_in() == 5.0
    clock.advance(4.9)
    assert breaker.acquire() is None
    clock.advance(0.1)
    probes = [breaker.acquire() for _ in range(4)]
    assert breaker.state is State.HALF_OPEN
    assert probes[3] is None  # three probes at a time
    for permit in probes[:3]:
        assert permit is not None and permit.probe
        breaker.record(permit, Outcome.SUCCESS, 0.01)
    assert breaker.state is State.CLOSED
    snap = breaker.snapshot()
    assert [(t["from"], t["to"]) for t in snap["transitions"]] == [
        ("closed", "open"), ("open", "half_open"), ("half_open", "closed")]
    assert (snap["opened"], snap["half_opened"], snap["closed"]) == (1, 1, 1)
    assert snap["rejected"] == 3
    messages = [r.getMessage() for r in caplog.records]
    assert any("http://gpu:1: closed -> open" in m for m in messages)
    assert any("half_open -> closed" in m for m in messages)
    assert caplog.records[0].levelno == logging.WARNING


def test_a_failed_probe_reopens_for_a_full_interval() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker("b", BreakerConfig(open_s=2.0), clock)
    breaker.force_open()
    clock.advance(2.0)
    probe = breaker.acquire()
    assert probe is not None
    breaker.record(probe, Outcome.FAILURE, 0.01)
    assert breaker.state is State.OPEN
    assert breaker.retry_in() == 2.0


def test_half_open_slow_probe_reopens_but_long_polls_are_never_slow() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker("b", BreakerConfig(open_s=1.0, slow_call_s=1.0,
                                                half_open_probes=1), clock)
    breaker.force_open()
    clock.advance(1.0)
    probe = breaker.acquire()
    assert probe is not None
    breaker.record(probe, Outcome.SUCCESS, 30.0, slow_exempt=True)  # a 30 s long-poll
    assert breaker.state is State.CLOSED
    breaker.force_open()
    clock.advance(1.0)
    probe = breaker.acquire()
    assert probe is not None
    breaker.record(probe, Outcome.SUCCESS, 3.0)
    assert breaker.state is State.OPEN


def test_slow_calls_open_it_at_the_slow_rate() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker("b", BreakerConfig(slow_call_s=0.5, slow_rate=0.8), clock)
    for i in range(10):
        permit = breaker.acquire()
        assert permit is not None
        breaker.record(permit, Outcome.SUCCESS, 0.9 if i % 2 else 0.1)
    assert breaker.state is State.CLOSED  # half slow: under 80 %
    for _ in range(40):
        permit = breaker.acquire()
        assert permit is not None
        breaker.record(permit, Outcome.SUCCESS, 5.0, slow_exempt=True)  # long-polls
    assert breaker.state is State.CLOSED
    clock.advance(1.0)  # all of that slid out of the window
    for _ in range(5):
        permit = breaker.acquire()
        assert permit is not None
        breaker.record(permit, Outcome.SUCCESS, 0.9)
    assert breaker.state is State.OPEN
    assert "took over 0.5s" in breaker.transitions[-1]["reason"]


def test_late_results_from_an_earlier_state_are_ignored() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker("b", BreakerConfig(open_s=1.0, half_open_probes=1), clock)
    old = breaker.acquire()
    assert old is not None
    breaker.force_open()
    clock.advance(1.0)
    probe = breaker.acquire()
    assert probe is not None
    breaker.record(old, Outcome.FAILURE, 2.0)  # admitted while closed: not a probe
    assert breaker.state is State.HALF_OPEN
    breaker.record(probe, Outcome.SUCCESS, 0.01)
    assert breaker.state is State.CLOSED


def test_vanished_and_released_probes_give_their_place_back() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker("b", BreakerConfig(open_s=1.0, slow_call_s=1.0,
                                                half_open_probes=1), clock)
    breaker.force_open()
    clock.advance(1.0)
    probe = breaker.acquire()
    assert probe is not None and breaker.acquire() is None
    breaker.release(probe)  # e.g. the caller was cancelled
    probe = breaker.acquire()
    assert probe is not None
    clock.advance(1.5)  # it never reports back
    assert breaker.acquire() is not None


def test_ignored_outcomes_do_not_count() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker("b", BreakerConfig(min_calls=1), clock)
    for _ in range(10):
        permit = breaker.acquire()
        assert permit is not None
        breaker.record(permit, Outcome.IGNORED, 5.0)
    assert breaker.state is State.CLOSED
    assert breaker.snapshot()["window"]["calls"] == 0


def test_registry_shares_per_url_and_config() -> None:
    reg = Registry()
    a = reg.breaker("http://h:1")
    assert reg.breaker("http://h:1") is a
    assert reg.breaker("http://h:2") is not a
    assert reg.breaker("http://h:1", BreakerConfig(open_s=1.0)) is not a
    assert reg.budget("http://h:1") is reg.budget("http://h:1")
    assert shared_breaker("http://reg.test/") is REGISTRY.breaker("http://reg.test")


# --- one call ------------------------------------------------------------------------------


class Script:
    """A random source that replays given values (then 0.5 forever)."""

    def __init__(self, *values: float) -> None:
        self.values = list(values)

    def __call__(self) -> float:
        return self.values.pop(0) if self.values else 0.5


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


DEFAULT_BREAKER = BreakerConfig()
DEFAULT_BUDGET = BudgetConfig()


def make(clock: FakeClock, *, retry: RetryPolicy | None = None,
         breaker: BreakerConfig | None = DEFAULT_BREAKER,
         budget: BudgetConfig | None = DEFAULT_BUDGET, rng: Script | None = None) -> Resilience:
    return Resilience(
        "http://h", retry=retry or RetryPolicy(),
        breaker=CircuitBreaker("http://h", breaker, clock) if breaker else None,
        budget=RetryBudget(budget, clock) if budget else None, clock=clock,
        rng=rng or Script())


def drive(res: Resilience, errors: Iterator[ClientError | None], **begin: object) -> list[float]:
    """Run one call whose attempts fail with ``errors`` (None: success); the delays asked."""
    call = res.begin("GET /x", **begin)  # type: ignore[arg-type]
    delays: list[float] = []
    while True:
        call.admit()
        error = next(errors)
        if error is None:
            call.succeeded()
            return delays
        delay = call.failed(error)
        if delay is None:
            raise error
        delays.append(delay)


def test_transient_errors_are_retried_with_jittered_backoff(clock: FakeClock) -> None:
    res = make(clock, rng=Script(0.5, 0.5, 0.5))
    refused = transport_error(httpx.ConnectError("refused"))
    delays = drive(res, iter([refused, refused, refused, None]))
    assert delays == pytest.approx([0.05, 0.1, 0.2])
    stats = res.snapshot()
    assert (stats["calls"], stats["attempts"], stats["retries"], stats["successes"]) == (1, 4, 3, 1)


def test_attempts_run_out_and_the_last_error_carries_the_count(clock: FakeClock) -> None:
    res = make(clock, retry=RetryPolicy(max_attempts=3))
    unavailable = APIError(503, "busy", "busy")
    with pytest.raises(APIError) as info:
        drive(res, iter([unavailable] * 5))
    assert info.value.attempts == 3
    assert res.snapshot()["errors"] == 1


def test_permanent_errors_are_not_retried_and_not_held_against_the_circuit(
        clock: FakeClock) -> None:
    res = make(clock, breaker=BreakerConfig(min_calls=1))
    for _ in range(20):
        with pytest.raises(APIError):
            drive(res, iter([APIError(404, "not_found", "no")]))
    snap = res.snapshot()
    assert snap["attempts"] == 20 and snap["retries"] == 0
    assert snap["breaker"]["state"] == "closed"
    assert snap["breaker"]["window"]["failures"] == 0


def test_retry_after_is_honoured_or_the_call_gives_up(clock: FakeClock) -> None:
    # The backoff's draw (0.0) is ignored; the second (0.5) spreads the wait a tenth later.
    res = make(clock, rng=Script(0.0, 0.5, 0.0, 0.0))
    assert drive(res, iter([APIError(429, "slow_down", "x", retry_after=2.5), None])) == [2.75]
    with pytest.raises(APIError):  # longer than max_retry_after_s: fail (or fall back) now
        drive(res, iter([APIError(503, "maintenance", "x", retry_after=120.0), None]))


def test_long_polls_pause_between_retries(clock: FakeClock) -> None:
    res = make(clock, rng=Script(0.0))
    reset = transport_error(httpx.RemoteProtocolError("closed"))
    assert drive(res, iter([reset, None]), long_poll=True) == [0.25]


def test_no_retry_past_the_deadline(clock: FakeClock) -> None:
    res = make(clock, rng=Script(0.9))
    reset = transport_error(httpx.ReadError("reset"))
    with pytest.raises(TransportError):
        drive(res, iter([reset, None]), deadline=clock.now + 0.05)


def test_the_budget_stops_retries_when_everything_fails(clock: FakeClock) -> None:
    res = make(clock, breaker=None, budget=BudgetConfig(ratio=0.2, min_per_s=0.0),
               rng=Script(*[0.0] * 10_000))
    refused = transport_error(httpx.ConnectError("refused"))
    for _ in range(1000):
        with pytest.raises(TransportError):
            drive(res, iter([refused] * 10))
        clock.advance(0.001)
    snap = res.snapshot()
    # Without a budget a dead server would see 4000 requests; with it, about 1200.
    assert snap["attempts"] <= 1.2 * snap["calls"] + 1
    assert snap["retries_denied"] > 0


def test_an_open_breaker_refuses_before_sending(clock: FakeClock) -> None:
    res = make(clock, rng=Script(*[0.0] * 100))
    refused = transport_error(httpx.ConnectError("refused"))
    with pytest.raises(TransportError):
        drive(res, iter([refused] * 4))
    with pytest.raises(CircuitOpenError) as info:  # attempt 5 opens it; 6 is refused
        drive(res, iter([refused] * 4))
    assert info.value.__cause__ is not None  # chained to the error that came before
    assert info.value.attempts == 1
    with pytest.raises(CircuitOpenError) as info:
        drive(res, iter([None]))
    assert info.value.attempts == 0 and info.value.retry_in == 5.0
    assert isinstance(info.value, TransportError) and info.value.transient
    snap = res.snapshot()
    assert snap["rejected"] == 2 and snap["breaker"]["state"] == "open"


def test_an_abandoned_attempt_releases_its_probe(clock: FakeClock) -> None:
    res = make(clock, breaker=BreakerConfig(half_open_probes=1, open_s=1.0))
    assert res.breaker is not None
    res.breaker.force_open()
    clock.advance(1.0)
    call = res.begin("GET /x")
    call.admit()
    call.abandon()  # cancelled mid-request
    assert drive(res, iter([None])) == []
    assert res.breaker.state is State.CLOSED


def test_stats_latency_percentiles(clock: FakeClock) -> None:
    res = make(clock)
    for ms in range(1, 101):
        call = res.begin("GET /x")
        call.admit()
        clock.advance(ms / 1000)
        call.succeeded()
    call = res.begin("GET /events", timed=False)  # streams are not timed
    call.admit()
    clock.advance(60)
    call.succeeded()
    latency = res.snapshot()["latency_ms"]
    assert latency["samples"] == 100
    assert latency["p50"] == pytest.approx(50.5)
    assert latency["p99"] == pytest.approx(99.01)
