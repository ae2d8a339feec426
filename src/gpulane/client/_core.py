"""The sans-IO core both clients share: request descriptions, response parsing, SSE, polling.

Nothing here does I/O or sleeps. ``Client`` and ``AsyncClient`` turn a :class:`Request`
into an HTTP exchange in their single ``_send`` method, so retries and circuit breaking
(:mod:`gpulane.client.resilience`) can wrap that one seam for both.
"""

from __future__ import annotations

import importlib.util
import os
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from gpulane.errors import APIError, CircuitOpenError, ClientError, TaskFailedError

DEFAULT_URL = "http://127.0.0.1:8765"
URL_ENV = "GPULANE_URL"
TOKEN_ENV = "GPULANE_TOKEN"

FINAL_STATES = frozenset({"succeeded", "failed", "cancelled"})
FAILED_STATES = frozenset({"failed", "cancelled"})

MAX_POLL_WAIT = 30.0
"""Longest ``?wait=`` one request asks for; long holds get cut by proxies and idle timeouts."""
WAIT_SLACK = 10.0
"""Extra read timeout over a ``?wait=`` so the server's own answer arrives before ours fires."""
RECONNECT_BACKOFF: tuple[float, ...] = (0.0, 0.25, 0.5, 1.0, 2.0)
"""Delays before each consecutive reconnect of an event stream; one more failure raises."""

Params = dict[str, str | int | float]


@dataclass(slots=True)
class Request:
    """One HTTP request, described without doing it."""

    method: str
    path: str
    params: Params = field(default_factory=dict)
    json: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    # A raw body instead of JSON (an upload: bytes, or an iterable of chunks).
    content: Any = None
    stream: bool = False
    # Seconds the server may hold the answer (?wait=); the read timeout must outlast it.
    hold_s: float | None = None
    # Safe to repeat: a GET, a cancel, or a submit carrying an Idempotency-Key.
    idempotent: bool = True
    # On the caller's monotonic clock: no retry is started that would end after it.
    deadline: float | None = None

    @property
    def slow_by_design(self) -> bool:
        """Held by the server (``?wait=``) or an event stream: never a "slow call"."""
        return self.stream or self.hold_s is not None

    @property
    def long_poll(self) -> bool:
        """``GET .../result?wait=``: repeated only after a pause, never in a tight loop."""
        return self.method == "GET" and self.hold_s is not None


def resolve_url(url: str | None) -> str:
    """The base URL: the argument, else ``$GPULANE_URL``, else the local default."""
    return (url or os.environ.get(URL_ENV) or DEFAULT_URL).rstrip("/")


def resolve_token(token: str | None) -> str | None:
    """The bearer token: the argument, else ``$GPULANE_TOKEN``, else none."""
    return token or os.environ.get(TOKEN_ENV) or None


def base_headers(token: str | None) -> dict[str, str]:
    headers = {"Accept": "application/json", "User-Agent": "gpulane-client/0.1"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return headers


def new_idempotency_key() -> str:
    return uuid.uuid4().hex


def is_final(task: Mapping[str, Any]) -> bool:
    return task.get("state") in FINAL_STATES


# --- request builders ---------------------------------------------------------------------


def task_body(preset: str | None, input: Any, *, device: str = "auto",
              priority: str | int = "normal", timeout_s: float | None = None,
              content_type: str | None = None, fallback: bool | None = None) -> dict[str, Any]:
    """The JSON body of one submitted task; without ``preset`` the server routes it by its
    ``content_type``; ``fallback=False``: a GPU or nothing."""
    body: dict[str, Any] = {"input": input, "device": device, "priority": priority,
                            "timeout_s": timeout_s, "content_type": content_type}
    if preset is not None:
        body["preset"] = preset
    if fallback is not None:
        body["fallback"] = fallback
    return body


def gpu_params(gpu: bool | None) -> Params:
    """``?gpu=true|false`` (device gpu or cpu), or nothing."""
    return {} if gpu is None else {"gpu": "true" if gpu else "false"}


def submit(body: dict[str, Any], idempotency_key: str | None = None,
           wait: float | None = None, gpu: bool | None = None) -> Request:
    """``POST /v1/tasks``; always keyed so a repeated send never makes a second task."""
    params: Params = gpu_params(gpu)
    if wait is not None:
        params["wait"] = _seconds(wait)
    key = idempotency_key or new_idempotency_key()
    return Request("POST", "/v1/tasks", params=params, json=body,
                   headers={"Idempotency-Key": key}, hold_s=wait)


def submit_many(items: list[dict[str, Any]], gpu: bool | None = None) -> Request:
    """``POST /v1/tasks/bulk``; every item gets its own idempotency key when it has none;
    ``gpu`` (``?gpu=``) applies to every item."""
    tasks = [{**item, "idempotency_key": item.get("idempotency_key") or new_idempotency_key()}
             for item in items]
    return Request("POST", "/v1/tasks/bulk", params=gpu_params(gpu), json={"tasks": tasks})


def get(task_id: str) -> Request:
    return Request("GET", f"/v1/tasks/{_segment(task_id)}")


def list_tasks(state: str | None = None, preset: str | None = None, limit: int = 50,
               cursor: str | None = None) -> Request:
    params: Params = {"limit": limit}
    if state:
        params["state"] = state
    if preset:
        params["preset"] = preset
    if cursor:
        params["cursor"] = cursor
    return Request("GET", "/v1/tasks", params=params)


def cancel(task_id: str) -> Request:
    return Request("POST", f"/v1/tasks/{_segment(task_id)}/cancel")


def retry(task_id: str) -> Request:
    # Not repeated after it may have been taken: a second one would find the task queued
    # again and answer 409.
    return Request("POST", f"/v1/tasks/{_segment(task_id)}/retry", idempotent=False)


def result(task_id: str, wait: float) -> Request:
    w = max(0.0, wait)
    return Request("GET", f"/v1/tasks/{_segment(task_id)}/result",
                   params={"wait": _seconds(w)}, hold_s=w)


def events(task_id: str, last_event_id: int | None = None) -> Request:
    headers = {"Accept": "text/event-stream", "Cache-Control": "no-cache"}
    if last_event_id is not None:
        headers["Last-Event-ID"] = str(last_event_id)
    return Request("GET", f"/v1/tasks/{_segment(task_id)}/events", headers=headers, stream=True)


def admin(action: str, body: dict[str, Any] | None = None) -> Request:
    """``POST /v1/admin/<action>`` (drain, resume: both safe to repeat); ``body``: the fleet's
    node to act on, and a drain's exit and grace_s."""
    return Request("POST", f"/v1/admin/{action}", json=body or None)


def drain_body(node: str | None, exit: bool = False,
               grace_s: float | None = None) -> dict[str, Any]:
    """The body of a drain (or a resume: node only), without the defaults."""
    body: dict[str, Any] = {}
    if node is not None:
        body["node"] = node
    if exit:
        body["exit"] = True
    if grace_s is not None:
        body["grace_s"] = grace_s
    return body


def simple_get(path: str) -> Request:
    return Request("GET", path)


def _segment(task_id: str) -> str:
    if not task_id or "/" in task_id or task_id in (".", ".."):
        raise ValueError(f"not a task id: {task_id!r}")
    return task_id


def _seconds(value: float) -> str:
    return f"{value:.3f}".rstrip("0").rstrip(".") or "0"


# --- responses ----------------------------------------------------------------------------


def is_error_status(status: int) -> bool:
    return status >= 400


def api_error(status: int, body: bytes, reason: str = "",
              retry_after: float | None = None) -> APIError:
    """An APIError from an error answer, useful even when the body is not our JSON shape."""
    parsed: Any = None
    try:
        parsed = orjson.loads(body) if body else None
    except ValueError:
        parsed = None
    err = parsed.get("error") if isinstance(parsed, dict) else None
    if isinstance(err, dict):
        return APIError(status, str(err.get("code") or f"http_{status}"),
                        str(err.get("message") or reason or f"HTTP {status}"),
                        err.get("field") if isinstance(err.get("field"), str) else None,
                        body=parsed, retry_after=retry_after)
    if isinstance(parsed, dict) and isinstance(parsed.get("detail"), str):
        # A framework's own error answer (e.g. a 404 for an unknown route).
        return APIError(status, f"http_{status}", parsed["detail"], body=parsed,
                        retry_after=retry_after)
    text = body.decode("utf-8", "replace").strip()
    message = text[:500] if text else (reason or f"HTTP {status}")
    return APIError(status, f"http_{status}", message,
                    body=parsed if isinstance(parsed, dict) else {"raw": text[:2000]},
                    retry_after=retry_after)


def parse_json(status: int, body: bytes) -> dict[str, Any]:
    """The JSON object of a successful answer; anything else raises APIError."""
    try:
        parsed = orjson.loads(body) if body else {}  # several times json's speed on a bulk
    except ValueError as exc:
        raise APIError(status, "bad_response", f"the server answered non-JSON: {exc}",
                       body={"raw": body[:2000].decode("utf-8", "replace")}) from exc
    if not isinstance(parsed, dict):
        raise APIError(status, "bad_response", "the server answered JSON that is not an object",
                       body={"raw": parsed})
    return parsed


def task_list(answer: dict[str, Any], key: str = "tasks") -> list[dict[str, Any]]:
    items = answer.get(key)
    if not isinstance(items, list):
        raise APIError(200, "bad_response", f"the answer has no {key!r} list", body=answer)
    return items


# --- long polling -------------------------------------------------------------------------


class LongPoll:
    """Plans ``GET /result?wait=`` rounds until a task is final or the deadline passes.

    ``deadline`` is on the caller's monotonic clock; ``None`` polls forever.
    """

    def __init__(self, task_id: str, deadline: float | None) -> None:
        self.task_id = task_id
        self.deadline = deadline
        self._quick = 0

    def remaining(self, now: float) -> float | None:
        return None if self.deadline is None else max(0.0, self.deadline - now)

    def request(self, now: float) -> Request:
        left = self.remaining(now)
        req = result(self.task_id, MAX_POLL_WAIT if left is None else min(left, MAX_POLL_WAIT))
        req.deadline = self.deadline
        return req

    def after(self, task: dict[str, Any], asked: float, elapsed: float, now: float) -> float | None:
        """``None`` when done (final or out of time), else seconds to pause before polling again.

        A server that answers far sooner than asked (it ignores or caps ``wait``) gets a growing
        pause so a non-final task is not polled in a tight loop.
        """
        left = self.remaining(now)
        if is_final(task) or left == 0.0:
            return None
        if elapsed >= min(asked, 1.0) * 0.5:
            self._quick = 0
            return 0.0
        self._quick += 1
        pause = min(0.1 * 2.0 ** (self._quick - 1), 2.0)
        return pause if left is None else min(pause, left)


# --- server-sent events -------------------------------------------------------------------


class SSEDecoder:
    """Turns event-stream lines into ``{"id": int, "event": str, "data": dict}``.

    Follows the WHATWG rules: ``data`` lines join with newlines, a blank line dispatches,
    comments (``:``) are skipped and the last ``id`` carries over to events without one.
    """

    def __init__(self, last_event_id: int | None = None) -> None:
        self.last_event_id = last_event_id
        self.retry_ms: int | None = None
        self._event = ""
        self._data: list[str] = []
        self._id: int | None = None

    def feed(self, line: str) -> dict[str, Any] | None:
        """Feed one line (without its newline); returns an event when the line completes one."""
        line = line.rstrip("\r\n")
        if not line:
            return self._dispatch()
        if line.startswith(":"):
            return None
        name, sep, value = line.partition(":")
        if sep and value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id":
            if value.strip().isdigit():
                self._id = int(value.strip())
        elif name == "retry" and value.strip().isdigit():
            self.retry_ms = int(value.strip())
        return None

    def reset(self) -> None:
        """Drop a half-read event (its connection broke before the blank line)."""
        self._event, self._data, self._id = "", [], None

    def _dispatch(self) -> dict[str, Any] | None:
        if self._id is not None:
            self.last_event_id = self._id
        data, event = self._data, self._event or "message"
        self._data, self._event, self._id = [], "", None
        if not data:
            return None
        return {"id": self.last_event_id if self.last_event_id is not None else 0,
                "event": event, "data": _event_data("\n".join(data))}


def _event_data(text: str) -> dict[str, Any]:
    try:
        parsed = orjson.loads(text)
    except ValueError:
        return {"raw": text}
    return parsed if isinstance(parsed, dict) else {"value": parsed}


def is_final_event(event: Mapping[str, Any]) -> bool:
    """True for the event after which the server closes the stream."""
    data = event.get("data")
    return (event.get("event") == "state" and isinstance(data, dict)
            and data.get("state") in FINAL_STATES)


class EventStream:
    """The state of one task's event stream across reconnects.

    The client loop asks :meth:`request` for each (re)connection, feeds each line to
    :meth:`feed` and calls :meth:`dropped` when a connection breaks; :attr:`done` turns true
    after the final event.
    """

    def __init__(self, task_id: str, last_event_id: int | None = None,
                 backoff: tuple[float, ...] = RECONNECT_BACKOFF) -> None:
        self.task_id = task_id
        self.decoder = SSEDecoder(last_event_id)
        self.backoff = backoff
        self.done = False
        self.connected = False
        self._failures = 0
        self._resume_from: int | None = None

    def request(self) -> Request:
        self._resume_from = self.decoder.last_event_id
        self.decoder.reset()
        return events(self.task_id, self.decoder.last_event_id)

    def feed(self, line: str) -> dict[str, Any] | None:
        event = self.decoder.feed(line)
        if event is None:
            return None
        self._failures = 0
        if self._resume_from is not None and event["id"] <= self._resume_from:
            # A server that ignored Last-Event-ID replays from the start; drop what we gave.
            return None
        self.done = is_final_event(event)
        return event

    def dropped(self) -> float | None:
        """A connection broke: seconds to pause before reconnecting, or ``None`` to give up.

        Only events received reset the count, so a server that accepts and drops at once
        still runs out of attempts.
        """
        if not self.connected:
            return None  # never reached the server: report it, as every other call does
        self._failures += 1
        if self._failures > len(self.backoff):
            return None
        delay = self.backoff[self._failures - 1]
        if self.decoder.retry_ms is not None and self._failures == 1:
            delay = max(delay, self.decoder.retry_ms / 1000.0)  # the server's `retry:` field
        return delay


def fallback_reason(exc: ClientError) -> str | None:
    """Why ``run(fallback=...)`` serves ``exc``'s call locally, or None to raise it.

    Only for a server that cannot be relied on now: an open circuit, or a transient error that
    outlasted its retries (or the retry budget). A wrong request, a failed task or a plain 500
    is raised, since the local path would hide a bug rather than an outage.
    """
    if isinstance(exc, CircuitOpenError):
        return "circuit_open"
    if exc.transient:
        return "retries_exhausted"
    return None


def fallback_task(preset: str | None, input: Any, output: Any, reason: str,
                  error: ClientError) -> dict[str, Any]:
    """``run``'s answer when the fallback served the call: shaped like a succeeded task, with
    ``id`` None and ``fallback`` saying why."""
    return {"id": None, "preset": preset, "state": "succeeded", "input": input,
            "output": output, "error": None, "attempts": 0, "placement": None,
            "fallback": {"reason": reason, "error": str(error)}}


def h2_available() -> bool:
    """Whether the ``h2`` package is importable (httpx's HTTP/2 support needs it)."""
    return importlib.util.find_spec("h2") is not None


def run_outcome(task: dict[str, Any]) -> dict[str, Any]:
    """``run``'s answer: the task, or TaskFailedError when it ended failed or cancelled."""
    if task.get("state") in FAILED_STATES:
        raise TaskFailedError(task)
    return task


def health(status: int, body: bytes) -> dict[str, Any]:
    """``/healthz`` may answer plain text; still give a dict."""
    try:
        return parse_json(status, body)
    except APIError:
        return {"status": body.decode("utf-8", "replace").strip() or "ok"}
