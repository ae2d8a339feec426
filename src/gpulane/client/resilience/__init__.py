"""What keeps the SDK trustworthy on a bad network: classification, retries, budget, breaker.

Everything here is a sans-IO state machine: no sockets, no sleeping, and the clock and the
random source are injectable, so the unit tests drive it deterministically and ``Client`` and
``AsyncClient`` share every decision. Each client turns one request into a :class:`Call` and
loops::

    call = resilience.begin(...)
    try:
        while True:
            call.admit()                  # CircuitOpenError when the breaker refuses
            try: response = send_once()
            except ClientError as exc:
                delay = call.failed(exc)  # None: give up (re-raise); else sleep and go again
            else:
                call.succeeded(); return response
            sleep(delay)
    except BaseException:
        call.abandon()                    # cancelled mid-call: hand back a half-open probe
        raise

One module per idea:

* :mod:`.classify` - transient errors (no answer, 408, 429, 502, 503, 504) are retried and
  count against the circuit; permanent ones (other 4xx) are neither; other 5xx count against
  the circuit but are not retried.
* :mod:`.retry` - :class:`RetryPolicy`: capped exponential backoff with full jitter,
  honouring Retry-After.
* :mod:`.budget` - :class:`RetryBudget`: retries may be at most ``ratio`` of the calls in a
  sliding window plus ``min_per_s``, so a dead server sees about the app's own call rate.
* :mod:`.breaker` - :class:`CircuitBreaker`: closed / open / half-open on a time-based sliding
  window of recent HTTP requests (its docstring says why its defaults are what they are).
* :mod:`.stats` - :class:`ClientStats`: one client's counters and latency percentiles.

Around them, :mod:`.registry` shares one breaker and one budget per base URL across the
process (:data:`REGISTRY`), and :mod:`.call` drives one call's attempts (:class:`Resilience`,
:class:`Call`).
"""

from gpulane.client.resilience._window import Clock
from gpulane.client.resilience.breaker import (
    MAX_TRANSITIONS,
    BreakerConfig,
    CircuitBreaker,
    Permit,
    State,
)
from gpulane.client.resilience.budget import BudgetConfig, RetryBudget
from gpulane.client.resilience.call import Call, Resilience
from gpulane.client.resilience.classify import (
    Outcome,
    Verdict,
    classify,
    classify_exception,
    classify_status,
    parse_retry_after,
)
from gpulane.client.resilience.registry import REGISTRY, Registry, shared_breaker
from gpulane.client.resilience.retry import NO_RETRY, RetryPolicy
from gpulane.client.resilience.stats import LATENCY_SAMPLES, ClientStats

__all__ = [
    "LATENCY_SAMPLES",
    "MAX_TRANSITIONS",
    "NO_RETRY",
    "REGISTRY",
    "BreakerConfig",
    "BudgetConfig",
    "Call",
    "CircuitBreaker",
    "ClientStats",
    "Clock",
    "Outcome",
    "Permit",
    "Registry",
    "Resilience",
    "RetryBudget",
    "RetryPolicy",
    "State",
    "Verdict",
    "classify",
    "classify_exception",
    "classify_status",
    "parse_retry_after",
    "shared_breaker",
]
