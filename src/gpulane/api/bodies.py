"""Request bodies: read within the node's size limit, parse as JSON, validate with a model."""

from __future__ import annotations

from typing import Any, TypeVar

import orjson
from pydantic import BaseModel
from pydantic import ValidationError as PydanticValidationError
from starlette.requests import Request

from gpulane.api.validation import request_error
from gpulane.errors import PayloadTooLargeError, ValidationError
from gpulane.node import Node

M = TypeVar("M", bound=BaseModel)

JSON_DEPTH_MAX = 254
"""Deepest JSON orjson writes (a TypeError past it; it reads up to 1024 levels). A body is
refused up front when it would not fit with two levels to spare: a task's input is written
at most two levels deeper than a single submit carries it (a page of tasks, {"tasks":
[{"input": ...}]}), so a deeper one would fail as a 500 on every list that shows it."""
JSON_DEPTH_ROOM = 2
"""Levels a body's content may be written below where it sits in the body (see above)."""


async def read_json(request: Request) -> Any:
    """The request body as JSON, refusing bodies over the node's size limit."""
    node: Node = request.app.state.node
    limit = node.settings.max_input_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(int(declared), limit)
    body = await request.body()
    if len(body) > limit:
        raise _too_large(len(body), limit)
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise ValidationError("invalid_json", f"the request body is not valid JSON: {exc}",
                              field="body") from None
    # Each level opens a bracket: only a body with that many can be too deep (a count is
    # about 0.2 us on a small body; the dump runs only then).
    if body.count(b"[") + body.count(b"{") > JSON_DEPTH_MAX - JSON_DEPTH_ROOM:
        try:
            orjson.dumps([[data]])
        except orjson.JSONEncodeError:
            raise ValidationError(
                "invalid_json", "the request body is nested more than "
                f"{JSON_DEPTH_MAX - JSON_DEPTH_ROOM} levels deep: flatten the input",
                field="body") from None
    return data


async def read_body(request: Request, model: type[M], example: str) -> M:
    """The body validated by ``model``; a 422 naming the first wrong field and its fix, whose
    message shows ``example`` when the body is not a JSON object."""
    data = await read_json(request)
    try:
        return model.model_validate(data)
    except PydanticValidationError as exc:
        raise request_error(exc.errors(), model, example) from None


def _too_large(size: int, limit: int) -> PayloadTooLargeError:
    return PayloadTooLargeError(
        "payload_too_large", f"the request body is {size} bytes, over the limit of {limit}: "
        "send a smaller input, pass large data by path or URL, or raise max_input_bytes",
        field="input")
