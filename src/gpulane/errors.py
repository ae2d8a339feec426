"""One exception tree for gpulane, server and SDK alike.

::

    GpulaneError                      base of everything gpulane raises on purpose
    ├── ConfigError                   bad settings or flags (startup refuses)
    ├── PresetError                   a preset file is invalid (carries every problem found)
    ├── StoreError                    the store failed or refused a write
    │   └── StaleTokenError           a fencing token is no longer the task's current one
    ├── RequestError                  a caller's request is wrong; has code, field and HTTP status
    │   ├── NotFoundError             404: unknown task, preset, lease or device
    │   ├── ConflictError             409: idempotency key reused with another body, stale token
    │   ├── PayloadTooLargeError      413: input over the size limit
    │   └── ValidationError           422: a field is malformed or out of range
    └── ClientError                   raised by the SDK (gpulane.client)
        ├── TransportError            the request never got an HTTP answer (refused, reset, timeout)
        ├── APIError                  the server answered with an error; carries status, code, field
        └── TaskFailedError           Client.run(): the task ended failed or cancelled

Each ``RequestError`` renders to the wire as
``{"error": {"code": ..., "message": ..., "field": ...}}`` with its ``status``.
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
                 extra: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.field = field
        self.extra = extra or {}

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


class ValidationError(RequestError):
    status = 422


class ClientError(GpulaneError):
    """Base of the errors the SDK raises."""


class TransportError(ClientError):
    """The request got no HTTP answer: connection refused or reset, DNS failure, timeout."""


class APIError(ClientError):
    """The server answered with an error status."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None,
                 body: dict[str, Any] | None = None) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.field = field
        self.body = body or {}


class TaskFailedError(ClientError):
    """``Client.run`` waited for a task that ended failed or cancelled."""

    def __init__(self, task: dict[str, Any]) -> None:
        err = task.get("error") or {}
        super().__init__(
            f"task {task.get('id')} {task.get('state')}: "
            f"{err.get('kind', '?')}: {err.get('message', '')}")
        self.task = task
