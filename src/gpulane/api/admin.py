"""Operator endpoints: retry a dead letter, drain and resume the node, reload its presets,
and the status view.

Scopes come from the guard's one table (api/auth.py): ``/v1/tasks/...`` needs ``tasks``,
``/v1/admin/...`` needs ``admin``, and ``GET /v1/status`` any key. A ``tasks`` key may
retry only the tasks it submitted; an admin key any.
"""

from __future__ import annotations

from fastapi import APIRouter, Request

from gpulane.api.auth import check_owner
from gpulane.api.responses import JSON
from gpulane.api.schemas import ErrorView, TaskView
from gpulane.node import Node

router = APIRouter()


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


@router.post("/v1/admin/drain", tags=["admin"])
async def drain(request: Request) -> JSON:
    """Stop starting queued work (running work finishes) and refuse submits with 503
    ``draining`` until resumed; /readyz answers 503 meanwhile."""
    node = _node(request)
    node.drain()
    return JSON(await node.status_view())


@router.post("/v1/admin/resume", tags=["admin"])
async def resume(request: Request) -> JSON:
    """Take and start tasks again after a drain."""
    node = _node(request)
    node.resume()
    return JSON(await node.status_view())


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
    rate (tasks started per second), and the store's housekeeping."""
    return JSON(await _node(request).status_view())
