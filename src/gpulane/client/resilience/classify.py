"""Which failures are worth another try, and which count against the server's circuit.

Transient errors (no answer, 408, 429, 502, 503, 504) are retried and count against the
circuit; permanent ones (other 4xx) are neither; other 5xx count against the circuit but are
not retried. A 429 or 503 that says when to come back (``Retry-After``) is the server's
considered answer, a full queue, a spent rate or a drain: it is retried then, and never held
against the circuit. Also here: reading a ``Retry-After`` header.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from email.utils import parsedate_to_datetime

import httpx

from gpulane.errors import (
    ANSWER_CODES,
    TRANSIENT_STATUSES,
    APIError,
    ClientError,
    TransportError,
)


class Outcome(enum.Enum):
    """How one HTTP request counts in the breaker's window."""

    SUCCESS = "success"  # the server answered (2xx-4xx): alive, as far as the circuit cares
    FAILURE = "failure"  # no answer, a transient status or a 5xx: counts against the circuit
    IGNORED = "ignored"  # says nothing about the server (our own pool ran dry, a bad URL)


@dataclass(frozen=True, slots=True)
class Verdict:
    """What to make of one failed attempt."""

    kind: str  # "transient", "permanent", "server_error" or "local"
    retry: bool
    outcome: Outcome


_TRANSIENT = Verdict("transient", True, Outcome.FAILURE)
_TRANSIENT_UNSAFE = Verdict("transient", False, Outcome.FAILURE)
_COME_BACK = Verdict("come_back", True, Outcome.IGNORED)
_PERMANENT = Verdict("permanent", False, Outcome.SUCCESS)
_SERVER_ERROR = Verdict("server_error", False, Outcome.FAILURE)
_LOCAL = Verdict("local", False, Outcome.IGNORED)

COME_BACK_STATUSES = frozenset({429, 503})
"""Statuses whose Retry-After makes them a "come back later" from a live server, which took
nothing of the request: safe to repeat any request, and no sign of a failing server."""
# Errors after which the request surely never reached the server: safe to repeat any request.
_NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout)
# Errors where the server may or may not have seen the request: safe for idempotent requests.
_MAYBE_SENT = (httpx.ReadTimeout, httpx.WriteTimeout, httpx.NetworkError,
               httpx.RemoteProtocolError, httpx.ProxyError)


def classify_status(status: int) -> Verdict:
    """408, 429, 502, 503, 504 are transient; other 5xx count against the circuit but are not
    retried (they may well be deterministic); other 4xx are the caller's fault: permanent."""
    if status in TRANSIENT_STATUSES:
        return _TRANSIENT
    if status >= 500:
        return _SERVER_ERROR
    return _PERMANENT


def classify_exception(exc: BaseException, idempotent: bool = True) -> Verdict:
    """Connection refused or reset, DNS failure and timeouts are transient; the local pool
    running dry (PoolTimeout) and malformed requests say nothing about the server."""
    if isinstance(exc, httpx.PoolTimeout):
        return _LOCAL
    if isinstance(exc, _NOT_SENT):
        return _TRANSIENT
    if isinstance(exc, _MAYBE_SENT):
        return _TRANSIENT if idempotent else _TRANSIENT_UNSAFE
    return _LOCAL


def classify(error: ClientError, idempotent: bool = True) -> Verdict:
    """The verdict for an error one attempt raised."""
    if isinstance(error, APIError):
        if error.code in ANSWER_CODES:
            return _PERMANENT
        if error.status in COME_BACK_STATUSES and error.retry_after is not None:
            return _COME_BACK
        return classify_status(error.status)
    if isinstance(error, TransportError) and error.__cause__ is not None:
        return classify_exception(error.__cause__, idempotent)
    if isinstance(error, TransportError) and error.transient:
        return _TRANSIENT if idempotent else _TRANSIENT_UNSAFE
    return _LOCAL


def parse_retry_after(value: str | None, now_wall: float) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date); None if absent/bad."""
    if not value:
        return None
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        try:
            seconds = parsedate_to_datetime(text).timestamp() - now_wall
        except (TypeError, ValueError, IndexError, OverflowError):
            return None
    if seconds != seconds:  # NaN
        return None
    return max(0.0, seconds)
