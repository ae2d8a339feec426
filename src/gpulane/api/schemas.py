"""Request and response shapes, for validation messages and the OpenAPI document."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field


class TaskSubmit(BaseModel):
    """Body of POST /v1/tasks."""

    preset: str = Field(description="name of a preset (GET /v1/presets)")
    input: Any = Field(None, description="the preset's input, any JSON")
    device: Literal["auto", "gpu", "cpu"] = "auto"
    priority: str | int = Field("normal", description="immediate, normal, background or 0-100")
    timeout_s: float | None = Field(None, gt=0, description="overrides the preset's timeout_s")
    content_type: str | None = Field(None, description="the input's content type")
    idempotency_key: str | None = Field(
        None, description="bulk only; single submits use the Idempotency-Key header")


class BulkSubmit(BaseModel):
    """Body of POST /v1/tasks/bulk."""

    tasks: list[TaskSubmit]


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


class TaskPage(BaseModel):
    tasks: list[TaskView]
    next_cursor: str | None


class ErrorBody(BaseModel):
    code: str
    message: str
    field: str | None


class ErrorView(BaseModel):
    error: ErrorBody
