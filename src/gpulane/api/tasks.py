"""Task endpoints: submit (one or bulk), read, list, cancel, long-poll result, SSE events.

Submit, read and result are the hot path every client takes: they live on ``hot``, whose
routes are :class:`~gpulane.api.routing.HotRoute` (see there why); the app puts them first
in its one route table.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from gpulane.api.auth import caller, check_owner
from gpulane.api.bodies import read_body
from gpulane.api.requests import (
    RESULTS_EXAMPLE,
    TASK_EXAMPLE,
    BulkSubmit,
    CursorQuery,
    GpuQuery,
    LastEventIdHeader,
    LastEventIdQuery,
    LimitQuery,
    ResultsQuery,
    StateQuery,
    TaskSubmit,
    WaitQuery,
    resolve_device,
)
from gpulane.api.responses import JSON
from gpulane.api.routing import HotRoute
from gpulane.api.schemas import ErrorView, TaskList, TaskPage, TaskResults, TaskView
from gpulane.api.task_inputs import resolve_inputs
from gpulane.errors import ValidationError
from gpulane.model import TaskSpec, TaskState
from gpulane.node import Node

hot = APIRouter(prefix="/v1/tasks", tags=["tasks"], route_class=HotRoute)
router = APIRouter(prefix="/v1/tasks", tags=["tasks"])

SSE_KEEPALIVE_S = 15.0
"""A comment line is sent this often on a quiet stream so proxies keep it open."""


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI responses for the error statuses a route can answer."""
    return {s: {"model": ErrorView} for s in statuses}


def json_body(model: str, *, header: str | None = None) -> dict[str, Any]:
    """openapi_extra for a route that reads its JSON body itself (with the size limit):
    a required body of the ``model`` component, and an optional request header."""
    extra: dict[str, Any] = {"requestBody": {"required": True, "content": {
        "application/json": {"schema": {"$ref": f"#/components/schemas/{model}"}}}}}
    if header is not None:
        extra["parameters"] = [{"name": header, "in": "header", "required": False,
                                "schema": {"type": "string"}}]
    return extra


def _node(request: Request) -> Node:
    node: Node = request.app.state.node
    return node


def _one_gpu(request: Request, gpu: bool | None) -> bool | None:
    """``?gpu=`` as FastAPI read it (the last of repeated ones): 422 when it was given more than
    once with values that disagree (?gpu=true&gpu=false), rather than the last one winning."""
    if not request.scope["query_string"]:
        return gpu  # the usual submit: no query string to parse again
    said = {v.strip().lower() for v in request.query_params.getlist("gpu")}
    if len(said) > 1:
        raise ValidationError(
            "conflicting_device", f"?gpu= is given {len(request.query_params.getlist('gpu'))} "
            f"times and disagrees ({sorted(said)}): send it once", field="gpu")
    return gpu


def _submitter(request: Request) -> str | None:
    """The caller's key name; None on a node without API keys."""
    who = caller(request)
    return who.name if who is not None else None


async def _specs(request: Request, node: Node, items: list[TaskSubmit],
                 keys: list[str | None], wheres: list[str], gpu: bool | None) -> list[TaskSpec]:
    """The specs of a submit's items: each key checked, the files of every input resolved off
    the event loop (api/task_inputs.py), then each checked against the node."""
    gpu = _one_gpu(request, gpu)
    name = _submitter(request)
    stored = [_idempotency_key(k, name, w) for k, w in zip(keys, wheres, strict=True)]
    inputs = await resolve_inputs(node, [i.input for i in items], wheres, stored, name)
    return [node.build_spec(preset=item.preset, input=item.input, resolved=resolved,
                            device=resolve_device(item, gpu, where), fallback=item.fallback,
                            priority=int(item.priority), timeout_s=item.timeout_s,
                            content_type=item.content_type, where=where, submitted_by=name,
                            idempotency_key=key)
            for item, resolved, key, where in zip(items, inputs, stored, wheres, strict=True)]


def _idempotency_key(key: str | None, owner: str | None, where: str) -> str | None:
    """The key as stored: 422 when empty (it made no body hash, so every later submit with
    one got the first such task back, its own work dropped without a word); on a node with
    API keys, under the caller's name (a key name holds no '/'), so that two apps that both
    send "order-42" get two tasks, not a 409 showing one the other's task."""
    if key is None:
        return None
    if not key.strip():
        name = f"{where}idempotency_key" if where else "Idempotency-Key"
        raise ValidationError(
            "invalid_idempotency_key", f"{name} is empty: send a key you choose (e.g. "
            "order-42), the same for a retry of the same task, or none at all", field=name)
    return key if owner is None else f"{owner}/{key}"


@hot.post("", status_code=202, response_model=TaskView,
          responses={200: {"model": TaskView, "description": "the task ended within wait"},
                     **errors(400, 404, 409, 413, 415, 422, 429, 503)},
          openapi_extra=json_body("TaskSubmit", header="Idempotency-Key"))
async def submit_task(request: Request, wait: WaitQuery = None, gpu: GpuQuery = None) -> JSON:
    """Queue a task. With ``?wait=S`` the answer waits up to S seconds for the task to end
    (200 when it has, 202 when it is still queued or running). Without ``preset`` the task
    goes where its ``content_type`` is routed (415 ``no_route`` when nowhere)."""
    node = _node(request)
    body = await read_body(request, TaskSubmit, TASK_EXAMPLE)
    (spec,) = await _specs(request, node, [body], [request.headers.get("idempotency-key")],
                           [""], gpu)
    task, _created = await node.submit(spec)
    if wait:
        task = await node.wait(task.id, wait)
    return JSON(task.to_json(), status_code=200 if task.state.final else 202)


@hot.post("/results", response_model=TaskResults, responses=errors(413, 415, 422),
          openapi_extra=json_body("ResultsQuery"))
async def task_results(request: Request, wait: WaitQuery = None) -> JSON:
    """Collect many tasks' ends in one call: each asked task that is final (in the order
    asked), the ids still queued or running (``pending``) and those unknown (``missing``).
    Answers at once when any is final or unknown; otherwise waits up to ``wait`` seconds for
    the first to end, then answers with every one final by then."""
    body = await read_body(request, ResultsQuery, RESULTS_EXAMPLE)
    ids = list(dict.fromkeys(body.ids))  # one answer per id, however often it was asked
    got = await _node(request).wait_many(ids, wait or 0.0)
    final, pending, missing = [], [], []
    for task_id, task in zip(ids, got, strict=True):
        if task is None:
            missing.append(task_id)
        elif task.state.final:
            final.append(task.to_json())
        else:
            pending.append(task_id)
    return JSON({"tasks": final, "pending": pending, "missing": missing})


@hot.get("/{task_id}", response_model=TaskView, responses=errors(404))
async def get_task(request: Request, task_id: str) -> JSON:
    return JSON((await _node(request).get(task_id)).to_json())


@hot.get("/{task_id}/result", response_model=TaskView, responses=errors(404, 422))
async def task_result(request: Request, task_id: str, wait: WaitQuery = None) -> JSON:
    """The task once it is final, or as it stands after ``wait`` seconds (check ``state``)."""
    task = await _node(request).wait(task_id, wait or 0.0)
    return JSON(task.to_json())


@router.post("/bulk", status_code=202, response_model=TaskList,
             responses={200: {"model": TaskList, "description": "every task ended within wait"},
                        **errors(400, 404, 409, 413, 415, 422, 429, 503)},
             openapi_extra=json_body("BulkSubmit"))
async def submit_bulk(request: Request, wait: WaitQuery = None, gpu: GpuQuery = None) -> JSON:
    """Queue many tasks in one request and one transaction (all or none); each is routed by
    its own content_type when it names no preset, and ``?gpu=`` applies to every one. With
    ``?wait=S`` the answer waits up to S seconds for every task to end (200 when all have,
    202 with the tasks as they stand otherwise)."""
    node = _node(request)
    body = await read_body(request, BulkSubmit, TASK_EXAMPLE)
    specs = await _specs(request, node, body.tasks, [t.idempotency_key for t in body.tasks],
                         [f"tasks[{i}]." for i in range(len(body.tasks))], gpu)
    tasks = [t for t, _ in await node.submit_many(specs)]
    if wait:
        got = await node.wait_many([t.id for t in tasks], wait, every=True)
        # A task gone meanwhile (purged, its retention shorter than the wait) shows as sent.
        tasks = [g or t for g, t in zip(got, tasks, strict=True)]
    done = bool(wait) and all(t.state.final for t in tasks)
    return JSON({"tasks": [t.to_json() for t in tasks]}, status_code=200 if done else 202)


@router.get("", response_model=TaskPage, responses=errors(422))
async def list_tasks(request: Request, state: StateQuery = None, preset: str | None = None,
                     limit: LimitQuery = 50, cursor: CursorQuery = None) -> JSON:
    """Tasks, newest first, filtered by state and preset; follow ``next_cursor`` for more."""
    tasks, nxt = await _node(request).list_tasks(
        TaskState(state) if state else None, preset, limit, cursor)
    return JSON({"tasks": [t.to_json() for t in tasks], "next_cursor": nxt})


@router.post("/{task_id}/cancel", response_model=TaskView, responses=errors(404))
async def cancel_task(request: Request, task_id: str) -> JSON:
    """Cancel a queued or running task; a final task is returned unchanged. Only the key that
    submitted it, or an admin key, may."""
    node = _node(request)
    if caller(request) is not None:
        task = await node.get(task_id)
        check_owner(request, task.submitted_by, f"task {task_id}")
    return JSON((await node.cancel(task_id)).to_json())


@router.get("/{task_id}/events", responses={
    200: {"content": {"text/event-stream": {}}, "description": "Server-Sent Events"},
    **errors(404, 422)})
async def task_events(request: Request, task_id: str, last_event_id: LastEventIdQuery = None,
                      last_event_id_header: LastEventIdHeader = None) -> StreamingResponse:
    """The task's events as Server-Sent Events. Resume with ``Last-Event-ID``; the stream
    closes after the task's final state event."""
    node = _node(request)
    await node.get(task_id)  # 404 before the stream starts
    after = int(last_event_id_header or last_event_id or 0)
    return StreamingResponse(_sse(node, task_id, after), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _sse(node: Node, task_id: str, after: int) -> AsyncIterator[bytes]:
    async for batch in node.follow(task_id, after, SSE_KEEPALIVE_S):
        if not batch:
            yield b": keep-alive\n\n"
            continue
        yield b"".join(b"id: %d\nevent: %s\ndata: %s\n\n" % (
            e.seq, e.type.encode(), orjson.dumps(e.data)) for e in batch)
