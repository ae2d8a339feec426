"""The JSON-lines wire contract between a node and its workers (see docs/protocol.md).

Worker -> node: one JSON object per line on stdout; logs go to stderr.
Node -> session worker: one JSON object per line on stdin (``run``, ``cancel``, ``shutdown``).
This module is shared by the runtime and the worker SDK and imports nothing else of gpulane.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

_loads: Callable[[str], Any]
try:  # orjson parses several times faster; the worker SDK must also run without it.
    from orjson import loads as _loads
except ImportError:  # pragma: no cover
    _loads = json.loads

PROTOCOL_VERSION = 1
"""Version a worker announces in its ``connection`` event."""


class EventType(str, enum.Enum):
    """The events a worker may emit, plus the ones the node itself records."""

    CONNECTION = "connection"
    WORKER = "worker"
    PROGRESS = "progress"
    TEXT_DELTA = "text_delta"
    TEXT = "text"
    RESULT = "result"
    FINISH = "finish"
    ERROR = "error"
    WARNING = "warning"  # something a client should know (e.g. input truncated); not fatal
    # Recorded by the node, never sent by a worker:
    STATE = "state"  # a task's state changed (queued, running, retrying, ...)
    LOG = "log"  # a worker printed a line on stdout that is not JSON
    UNKNOWN = "unknown"  # a worker emitted JSON with an event name not in this list


WORKER_EVENTS = frozenset({
    EventType.CONNECTION, EventType.WORKER, EventType.PROGRESS, EventType.TEXT_DELTA,
    EventType.TEXT, EventType.RESULT, EventType.FINISH, EventType.ERROR, EventType.WARNING,
})
"""Events a worker is allowed to emit."""

TASK_SCOPED_EVENTS = frozenset({
    EventType.PROGRESS, EventType.TEXT_DELTA, EventType.TEXT, EventType.RESULT,
    EventType.FINISH, EventType.ERROR, EventType.WARNING,
})
"""Events that belong to one task (and carry ``task`` in a session worker's batch)."""


class WorkerStatus(str, enum.Enum):
    LOADING = "loading"
    READY = "ready"
    CLEANING_UP = "cleaning_up"


class Op(str, enum.Enum):
    """Commands the node writes to a session worker's stdin."""

    RUN = "run"
    CANCEL = "cancel"
    SHUTDOWN = "shutdown"


@dataclass(slots=True)
class WorkerMessage:
    """One parsed line from a worker: a known event, an unknown one, or a plain log line."""

    type: EventType
    data: dict[str, Any]
    task: str | None = None
    raw: str | None = None


def parse_line(line: str | bytes) -> WorkerMessage:
    """Parse one stdout line. Never raises: non-JSON becomes LOG, unknown events UNKNOWN."""
    text = line.decode("utf-8", "replace") if isinstance(line, bytes) else line
    text = text.rstrip("\r\n")
    try:
        obj = _loads(text)
    except ValueError:
        try:  # the stdlib also reads NaN and Infinity, which Python workers write by default
            obj = json.loads(text)
        except ValueError:
            return WorkerMessage(EventType.LOG, {"line": text}, raw=text)
    if not isinstance(obj, dict):
        return WorkerMessage(EventType.LOG, {"line": text}, raw=text)
    name = obj.get("event")
    task = obj.get("task")
    task_id = str(task) if task is not None else None
    try:
        etype = EventType(name)
    except ValueError:
        return WorkerMessage(EventType.UNKNOWN, {"event": name, "payload": obj}, task_id, raw=text)
    if etype not in WORKER_EVENTS:
        return WorkerMessage(EventType.UNKNOWN, {"event": name, "payload": obj}, task_id, raw=text)
    data = {k: v for k, v in obj.items() if k not in ("event", "task")}
    return WorkerMessage(etype, data, task_id)


def encode(obj: dict[str, Any]) -> bytes:
    """One protocol line, newline-terminated."""
    return (json.dumps(obj, separators=(",", ":"), ensure_ascii=False) + "\n").encode()


def run_op(tasks: list[tuple[str, Any]]) -> bytes:
    """The ``run`` op for a batch of (task id, input)."""
    return encode({"op": Op.RUN.value, "tasks": [{"task": t, "input": i} for t, i in tasks]})


def cancel_op(task_id: str) -> bytes:
    return encode({"op": Op.CANCEL.value, "task": task_id})


def shutdown_op() -> bytes:
    return encode({"op": Op.SHUTDOWN.value})


def connection_event() -> dict[str, Any]:
    return {"event": EventType.CONNECTION.value, "status": "connected",
            "protocol": PROTOCOL_VERSION}


ENV_INPUT = "GPULANE_INPUT"
"""A one-off worker's input as JSON text."""
ENV_INPUT_FILE = "GPULANE_INPUT_FILE"
"""A one-off worker's input as a path to a JSON file (used for large inputs)."""
ENV_TASK_ID = "GPULANE_TASK_ID"
"""The task a one-off worker runs."""
ENV_MODE = "GPULANE_MODE"
"""``session`` or ``oneoff``: how the worker is served."""
ENV_ALLOWED_ROOTS = "GPULANE_ALLOWED_ROOTS"
"""The folders (separated by os.pathsep) a worker may read task files from: the node's
allowed roots and its uploads folder. The node resolved and checked every path it hands a
worker; a worker that opens one checks it again against these (defence in depth)."""
