"""Operator endpoints: retry a dead letter, drain and resume a node, reload its presets,
and the status view.

Drain and resume act on this node, or on any node of the fleet named by ``node`` in the body
(forwarded to it through the fleet). ``exit: true`` makes a drain end with the node's exit:
running work gets ``grace_s`` (drain_grace_s) to finish, the rest goes back to the queue with
its attempts unspent, its leases are released, it leaves the fleet and the process exits 0.

Scopes come from the guard's one table (api/auth.py): ``/v1/tasks/...`` needs ``tasks``,
``/v1/admin/...`` needs ``admin``, and ``GET /v1/status`` any key. A ``tasks`` key may
retry only the tasks it submitted; an admin key any.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from gpulane.api.auth import check_owner
from gpulane.api.bodies import read_body
from gpulane.api.responses import JSON
from gpulane.api.schemas import ErrorView, TaskView
from gpulane.api.validation import fix
from gpulane.node import Node

router = APIRouter()

DRAIN_EXAMPLE = '{"node": "gpu-b", "exit": true, "grace_s": 30}'
"""What a drain body looks like, for the error of a body that is not one."""


class DrainBody(BaseModel):
    """Body of POST /v1/admin/drain and /v1/admin/resume (optional: this node, no exit)."""

    model_config = ConfigDict(extra="forbid")

    node: Annotated[str | None, Field(min_length=1, description=(
        "the node to drain (GET /v1/nodes lists them); this one when absent")), fix(
        "invalid_node", "{field}={value!r} must be a node's name (GET /v1/nodes lists them)")
    ] = None
    exit: Annotated[bool, Field(strict=True, description=(
        "exit once drained (as SIGTERM does); a plain drain pauses until resumed")), fix(
        "invalid_exit", "{field}={value!r} must be true or false")] = False
    grace_s: Annotated[float | None, Field(ge=0, le=86400, description=(
        "with exit: how long running work may take to finish [drain_grace_s]")), fix(
        "invalid_grace_s", "{field}={value!r} must be a number of seconds 0-86400")] = None


async def _drain_body(request: Request) -> DrainBody:
    """The body, or the defaults when none was sent (the old form of these routes)."""
    if request.headers.get("content-length", "0") == "0" and \
            "transfer-encoding" not in request.headers:
        return DrainBody()
    return await read_body(request, DrainBody, DRAIN_EXAMPLE)


def _node(request: Request) -> Node:
    node: Node = request.app.state.node
    return node


@router.post("/v1/tasks/{task_id}/retry", tags=["tasks"], response_model=TaskView,
             responses={404: {"model": ErrorView}, 409: {"model": ErrorView,
                        "description": "the task is not failed or cancelled"}})
async def retry_task(request: Request, task_id: str) -> JSON:
    """Queue a failed or cancelled task (a dead letter) again, with fresh attempts."""
    node = _node(request)
    task = await node.get(task_id)
    check_owner(request, task.submitted_by, f"task {task_id}")
    return JSON((await node.retry(task_id)).to_json())


@router.post("/v1/admin/drain", tags=["admin"], responses={
    404: {"model": ErrorView, "description": "no live node of that name"},
    503: {"model": ErrorView, "description": "the node did not answer"}})
async def drain(request: Request) -> JSON:
    """Stop starting queued work (running work finishes) and refuse submits with 503
    ``draining`` until resumed; /readyz answers 503 meanwhile. Optional body
    ``{"node": NAME, "exit": true, "grace_s": 30}``: drain another node of the fleet, and
    end with its exit (running work gets grace_s, the rest is requeued unspent). Answers
    the drained node's status."""
    body = await _drain_body(request)
    return JSON(await _node(request).drains.node(
        body.node, "drain", {"exit": body.exit, "grace_s": body.grace_s}))


@router.post("/v1/admin/resume", tags=["admin"], responses={
    404: {"model": ErrorView, "description": "no live node of that name"},
    409: {"model": ErrorView, "description": "the node is draining to exit"}})
async def resume(request: Request) -> JSON:
    """Take and start tasks again after a drain (optional body ``{"node": NAME}``)."""
    body = await _drain_body(request)
    return JSON(await _node(request).drains.node(body.node, "resume", {}))


@router.post("/v1/admin/presets/reload", tags=["admin"],
             responses={422: {"model": ErrorView, "description": (
                 "a preset file is invalid (error.problems lists each problem); the presets "
                 "in use are unchanged")}})
async def reload_presets(request: Request) -> JSON:
    """Read the preset files again. Workers of a changed or removed preset are retired after
    their current batch; queued tasks of a removed preset wait until it is back (or are
    cancelled)."""
    return JSON(await _node(request).reload_presets())


@router.get("/v1/status", tags=["system"])
async def status(request: Request) -> JSON:
    """The node: draining or not, each preset's queue against its max_queued and its drain
    rate (tasks started per second), and the store's housekeeping; per preset and lane
    (``lanes``) queued and running tasks, the oldest queued task's wait, this node's workers
    warm, loading and busy, the measured worker load time and per-worker drain rate; per GPU
    (``devices``) health (ok or lost), VRAM declared and free and the workers on it, and the
    CPU pool (``cpu``); every fallback by reason with per-minute rates over 1 and 15 minutes
    (``fallbacks``). docs/api.md describes every field."""
    return JSON(await _node(request).status_view())
