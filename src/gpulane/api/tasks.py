"""Task endpoints: submit (one or bulk), read, list, cancel, long-poll result, SSE events."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from gpulane.api.responses import JSON
from gpulane.api.schemas import BulkSubmit, ErrorView, TaskPage, TaskSubmit, TaskView
from gpulane.config import DEFAULT_BULK_MAX, DEFAULT_RESULT_WAIT_MAX_S
from gpulane.errors import PayloadTooLargeError, ValidationError
from gpulane.model import TaskState
from gpulane.node import Node

router = APIRouter(prefix="/v1/tasks", tags=["tasks"])

SSE_KEEPALIVE_S = 15.0
"""A comment line is sent this often on a quiet stream so proxies keep it open."""

_ERRORS: dict[int | str, dict[str, Any]] = {
    c: {"model": ErrorView} for c in (400, 401, 404, 409, 413, 422)}


def _node(request: Request) -> Node:
    node: Node = request.app.state.node
    return node


async def read_json(request: Request) -> Any:
    """The request body as JSON, refusing bodies over the node's size limit."""
    limit = _node(request).settings.max_input_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(int(declared), limit)
    body = await request.body()
    if len(body) > limit:
        raise _too_large(len(body), limit)
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise ValidationError("invalid_json", f"the request body is not valid JSON: {exc}",
                              field="body") from None


def _too_large(size: int, limit: int) -> PayloadTooLargeError:
    return PayloadTooLargeError(
        "payload_too_large", f"the request body is {size} bytes, over the limit of {limit}: "
        "send a smaller input, pass large data by path or URL, or raise max_input_bytes",
        field="input")


def _wait_s(value: str | None, field: str = "wait") -> float | None:
    if value is None or value == "":
        return None
    try:
        seconds = float(value)
    except ValueError:
        raise ValidationError("invalid_wait", f"{field}={value!r} must be a number of seconds",
                              field=field) from None
    if not 0 <= seconds <= DEFAULT_RESULT_WAIT_MAX_S:
        raise ValidationError(
            "invalid_wait", f"{field}={value!r} must be between 0 and "
            f"{DEFAULT_RESULT_WAIT_MAX_S:g} seconds", field=field)
    return seconds


def _require_object(body: Any, where: str) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise ValidationError("invalid_body", f"{where or 'the body'} must be a JSON object "
                              "like {\"preset\": \"sleep\", \"input\": {}}", field=where or "body")
    return body


@router.post("", status_code=202, response_model=TaskView, responses=_ERRORS,
             openapi_extra={"requestBody": {"required": True, "content": {
                 "application/json": {"schema": TaskSubmit.model_json_schema()}}}})
async def submit_task(request: Request, wait: str | None = None) -> JSON:
    """Queue a task. With ``?wait=S`` the answer waits up to S seconds for the task to end
    (200 when it has, 202 when it is still queued or running)."""
    node = _node(request)
    body = _require_object(await read_json(request), "")
    wait_s = _wait_s(wait)
    spec = node.build_spec(body, request.headers.get("idempotency-key"))
    task, _created = await node.submit(spec)
    if wait_s:
        task = await node.wait(task.id, wait_s)
    return JSON(task.to_json(), status_code=200 if task.state.final else 202)


@router.post("/bulk", status_code=202, responses=_ERRORS,
             openapi_extra={"requestBody": {"required": True, "content": {
                 "application/json": {"schema": BulkSubmit.model_json_schema()}}}})
async def submit_bulk(request: Request) -> JSON:
    """Queue many tasks in one request and one transaction (all or none)."""
    node = _node(request)
    body = _require_object(await read_json(request), "")
    items = body.get("tasks")
    if not isinstance(items, list) or not items:
        raise ValidationError("invalid_tasks", "tasks must be a non-empty list of task bodies",
                              field="tasks")
    if len(items) > DEFAULT_BULK_MAX:
        raise ValidationError("too_many_tasks", f"tasks has {len(items)} items; send at most "
                              f"{DEFAULT_BULK_MAX} per request", field="tasks")
    specs = []
    for i, item in enumerate(items):
        where = f"tasks[{i}]."
        item = _require_object(item, f"tasks[{i}]")
        key = item.pop("idempotency_key", None)
        specs.append(node.build_spec(item, key, where))
    results = await node.submit_many(specs)
    return JSON({"tasks": [t.to_json() for t, _ in results]}, status_code=202)


@router.get("", response_model=TaskPage, responses=_ERRORS)
async def list_tasks(request: Request, state: str | None = None, preset: str | None = None,
                     limit: int = 50, cursor: str | None = None) -> JSON:
    """Tasks, newest first, filtered by state and preset; follow ``next_cursor`` for more."""
    st = None
    if state:
        try:
            st = TaskState(state)
        except ValueError:
            raise ValidationError(
                "invalid_state", f"state={state!r} is not one of "
                f"{[s.value for s in TaskState]}", field="state") from None
    if not 1 <= limit <= 1000:
        raise ValidationError("invalid_limit", f"limit={limit} must be 1-1000", field="limit")
    if cursor is not None and not cursor.isdigit():
        raise ValidationError("invalid_cursor", "cursor must be a next_cursor value from a "
                              "previous page", field="cursor")
    tasks, nxt = await _node(request).store.list_tasks(st, preset, limit, cursor)
    return JSON({"tasks": [t.to_json() for t in tasks], "next_cursor": nxt})


@router.get("/{task_id}", response_model=TaskView, responses=_ERRORS)
async def get_task(request: Request, task_id: str) -> JSON:
    return JSON((await _node(request).get(task_id)).to_json())


@router.get("/{task_id}/result", response_model=TaskView, responses=_ERRORS)
async def task_result(request: Request, task_id: str, wait: str | None = None
                      ) -> JSON:
    """The task once it is final, or as it stands after ``wait`` seconds (check ``state``)."""
    wait_s = _wait_s(wait) or 0.0
    task = await _node(request).wait(task_id, wait_s)
    return JSON(task.to_json())


@router.post("/{task_id}/cancel", response_model=TaskView, responses=_ERRORS)
async def cancel_task(request: Request, task_id: str) -> JSON:
    """Cancel a queued or running task; a final task is returned unchanged."""
    return JSON((await _node(request).cancel(task_id)).to_json())


@router.get("/{task_id}/events", responses={
    200: {"content": {"text/event-stream": {}}, "description": "Server-Sent Events"},
    **_ERRORS})
async def task_events(request: Request, task_id: str,
                      last_event_id: str | None = None) -> StreamingResponse:
    """The task's events as Server-Sent Events. Resume with ``Last-Event-ID``; the stream
    closes after the task's final state event."""
    node = _node(request)
    await node.get(task_id)  # 404 before the stream starts
    raw = request.headers.get("last-event-id") or last_event_id or "0"
    if not raw.isdigit():
        raise ValidationError("invalid_last_event_id", f"Last-Event-ID={raw!r} must be an "
                              "event number from this stream", field="Last-Event-ID")
    return StreamingResponse(_sse(node, task_id, int(raw)), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _sse(node: Node, task_id: str, after: int) -> AsyncIterator[bytes]:
    store = node.store
    while True:
        seen = store.notifier.version(task_id)
        events = await store.events(task_id, after)
        chunks = []
        for e in events:
            after = e.seq
            chunks.append(b"id: %d\nevent: %s\ndata: %s\n\n" % (
                e.seq, e.type.encode(), orjson.dumps(e.data)))
            if e.type == "state" and e.data.get("state") in _FINAL:
                yield b"".join(chunks)
                return
        if chunks:
            yield b"".join(chunks)
            continue
        task = await store.get(task_id)
        if task is None or task.state.final:
            return
        if not await store.notifier.wait(task_id, seen, SSE_KEEPALIVE_S):
            yield b": keep-alive\n\n"


_FINAL = frozenset(s.value for s in TaskState if s.final)
