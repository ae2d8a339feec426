"""One exception tree for gpulane, server and SDK alike.

::

    GpulaneError                      base of everything gpulane raises on purpose
    ├── ConfigError                   bad settings or flags (startup refuses)
    ├── PresetError                   a preset file is invalid (carries every problem found)
    ├── StoreError                    the store failed or refused a write
    │   ├── StaleTokenError           a fencing token is no longer the task's current one
    │   └── StoreUnavailableError     the store cannot be reached (Redis down): 503 + Retry-After
    ├── RequestError                  a caller's request is wrong; has code, field and HTTP status
    │   ├── NotFoundError             404: unknown task, preset, lease or device
    │   ├── ConflictError             409: idempotency key reused with another body, stale token
    │   ├── PayloadTooLargeError      413: input over the size limit
    │   ├── UnsupportedMediaTypeError 415: a request body that is not application/json
    │   ├── ValidationError           422: a field is malformed or out of range
    │   ├── TooManyRequestsError      429: a queue is full or a rate is spent; Retry-After
    │   └── UnavailableError          503: the node is draining; Retry-After
    └── ClientError                   raised by the SDK (gpulane.client); ``attempts`` made
        ├── TransportError            no HTTP answer: refused, reset, DNS failure, timeout
        │   └── CircuitOpenError      not sent: the breaker of that base URL is open; ``retry_in``
        ├── APIError                  the server answered with an error; status, code, field,
        │                             ``retry_after``; ``transient`` for 408, 429, 502, 503, 504
        ├── TaskFailedError           Client.run(): the task ended failed or cancelled
        └── LeasePreempted            Client.gpu(): the lease was preempted or lost

How the SDK treats its errors (``gpulane.client.resilience``): *transient* ones (every
``TransportError`` but a local one, and an ``APIError`` with a status in ``TRANSIENT_STATUSES``)
are retried with backoff and count against the circuit breaker; *permanent* ones (an
``APIError`` with another 4xx status, e.g. ``PERMANENT_STATUSES``) are never retried and never
count against the circuit; any other 5xx counts against the circuit but is not retried. A 429
or 503 with ``Retry-After`` (a full queue, a spent rate, a drain) is retried after that
delay (never sooner, up to a fifth later at random) and never counts against the circuit.
A ``ClientError`` reaches the caller only once retrying is over; ``Client.run(fallback=...)``
calls the fallback instead for a ``CircuitOpenError`` or a transient error.

Each ``RequestError`` renders to the wire as
``{"error": {"code": ..., "message": ..., "field": ...}}`` with its ``status`` and ``headers``.
"""

from __future__ import annotations

from typing import Any


class GpulaneError(Exception):
    """Base of every error gpulane raises on purpose."""


class ConfigError(GpulaneError):
    """Settings, flags or environment variables are invalid."""


class PresetError(GpulaneError):
    """A preset registry file is invalid; ``problems`` lists each one with file:line."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(problems))


class StoreError(GpulaneError):
    """The store failed or refused a write."""


class StaleTokenError(StoreError):
    """A fencing token is no longer the current one for its task or lease."""


class RequestError(GpulaneError):
    """A request a client made is wrong. Rendered as a JSON error with ``status``."""

    status = 400

    def __init__(self, code: str, message: str, field: str | None = None,
                 extra: dict[str, Any] | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.field = field
        self.extra = extra or {}
        self.headers = headers or {}
        """Response headers the answer carries (Retry-After, Connection)."""

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {"code": self.code, "message": self.message, "field": self.field}
        body.update(self.extra)
        return {"error": body}


class NotFoundError(RequestError):
    status = 404


class ConflictError(RequestError):
    status = 409


class PayloadTooLargeError(RequestError):
    status = 413


class UnsupportedMediaTypeError(RequestError):
    status = 415


class ValidationError(RequestError):
    status = 422


class TooManyRequestsError(RequestError):
    status = 429


class UnavailableError(RequestError):
    status = 503


class StoreUnavailableError(StoreError, UnavailableError):
    """The store cannot be reached (Redis down, a broken connection): the call may not have
    been applied. The API answers it 503 with Retry-After (a RequestError like any other);
    the store reconnects with backoff by itself."""

    RETRY_AFTER_S = 2
    """What the 503 asks a client to wait: about one reconnect backoff step."""

    def __init__(self, message: str) -> None:
        super().__init__("store_unavailable",
                         f"{message}: the store cannot be reached; retry after "
                         f"{self.RETRY_AFTER_S} s (the node reconnects by itself)",
                         headers={"Retry-After": str(self.RETRY_AFTER_S)})


TRANSIENT_STATUSES = frozenset({408, 429, 502, 503, 504})
ANSWER_CODES = frozenset({"lease_wait_timeout"})
"""Error codes that are the server's considered answer, whatever their status: a 408 after a
lease's ``wait_s`` ran out says "not granted in time", and asking again at once would only
wait again (a proxy's own 408 carries no such code and stays transient)."""
"""HTTP statuses the SDK retries (honouring Retry-After) and counts against the circuit."""
PERMANENT_STATUSES = frozenset({400, 401, 403, 404, 409, 413, 422})
"""HTTP statuses that mean the request itself is wrong: never retried, never held against the
circuit (so is any other 4xx)."""


class ClientError(GpulaneError):
    """Base of the errors the SDK raises."""

    attempts: int = 1
    """HTTP requests made for the call that raised this, retries included (0: none was sent)."""

    @property
    def transient(self) -> bool:
        """True when the same request may well succeed later (a network or overload error)."""
        return False


class TransportError(ClientError):
    """The request got no HTTP answer: connection refused or reset, DNS failure, timeout."""

    def __init__(self, message: str, *, transient: bool = True) -> None:
        super().__init__(message)
        self._transient = transient

    @property
    def transient(self) -> bool:
        return self._transient


class CircuitOpenError(TransportError):
    """Not sent: the circuit breaker of ``url`` is open after recent failures there.

    ``retry_in`` says how many seconds until it lets a probe through.
    """

    def __init__(self, url: str, retry_in: float, what: str = "") -> None:
        where = f"{what}: " if what else ""
        super().__init__(f"{where}circuit breaker for {url} is open (server failing; "
                         f"next probe in {retry_in:.1f}s)")
        self.url = url
        self.retry_in = retry_in


class APIError(ClientError):
    """The server answered with an error status.

    ``retry_after`` holds the seconds of a Retry-After header, if the answer had one.
    """

    def __init__(self, status: int, code: str, message: str, field: str | None = None,
                 body: dict[str, Any] | None = None, retry_after: float | None = None) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.field = field
        self.body = body or {}
        self.retry_after = retry_after

    @property
    def transient(self) -> bool:
        return self.status in TRANSIENT_STATUSES and self.code not in ANSWER_CODES


class TaskFailedError(ClientError):
    """``Client.run`` waited for a task that ended failed or cancelled."""

    def __init__(self, task: dict[str, Any]) -> None:
        err = task.get("error") or {}
        super().__init__(
            f"task {task.get('id')} {task.get('state')}: "
            f"{err.get('kind', '?')}: {err.get('message', '')}")
        self.task = task


class LeasePreempted(ClientError):
    """A lease held through ``Client.gpu()`` was preempted (or expired, or revoked)."""

    def __init__(self, lease: dict[str, Any]) -> None:
        by = f" by {lease['preempted_by']}" if lease.get("preempted_by") else ""
        super().__init__(f"lease {lease.get('id')} was {lease.get('state')}{by}: "
                         "release the GPU and try again later")
        self.lease = lease
