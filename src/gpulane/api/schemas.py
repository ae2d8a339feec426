"""Response shapes for the OpenAPI document (requests are in requests.py)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel


class TaskError(BaseModel):
    code: str
    kind: str
    message: str


class PlacementView(BaseModel):
    node: str
    device: str
    fallback_reason: str | None


class TaskView(BaseModel):
    """A task as the API shows it."""

    id: str
    preset: str
    state: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    input: Any
    output: Any
    error: TaskError | None
    attempts: int
    priority: int
    device_wish: str
    lane: str
    fallback_reason: str | None
    placement: PlacementView | None
    timeout_s: float | None
    content_type: str | None
    created_at: float
    started_at: float | None
    finished_at: float | None
    submitted_by: str | None


class TaskPage(BaseModel):
    tasks: list[TaskView]
    next_cursor: str | None


class TaskResults(BaseModel):
    """POST /v1/tasks/results: the asked tasks that are final, and the ids of the others."""

    tasks: list[TaskView]
    pending: list[str]
    missing: list[str]


class TaskList(BaseModel):
    """POST /v1/tasks/bulk: the tasks, in the order sent."""

    tasks: list[TaskView]


class ErrorBody(BaseModel):
    code: str
    message: str
    field: str | None


class ErrorView(BaseModel):
    error: ErrorBody
