"""Request bodies: JSON only, read within the node's size limit, parsed, validated.

A body must say ``Content-Type: application/json`` (415 otherwise): a web page may send any
other site a ``text/plain`` POST without asking first, and this refuses it before it acts.
The body is read chunk by chunk as it arrives and never held past the limit, whether it came
with a Content-Length or chunked. Past the limit the rest is read and thrown away (within a
bound) before the 413 goes out with ``Connection: close``: a client that sends its whole body
before reading (Python's urllib, ``requests``) then reads the 413 instead of a reset, which
is what closing a socket with unread data in it sends.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any, TypeVar

import orjson
from pydantic import BaseModel
from pydantic import ValidationError as PydanticValidationError
from starlette.requests import ClientDisconnect, Request

from gpulane.api.validation import request_error
from gpulane.errors import PayloadTooLargeError, UnsupportedMediaTypeError, ValidationError
from gpulane.node import Node

M = TypeVar("M", bound=BaseModel)

JSON_DEPTH_MAX = 254
"""Deepest JSON orjson writes (a TypeError past it; it reads up to 1024 levels). A body is
refused up front when it would not fit with two levels to spare: a task's input is written
at most two levels deeper than a single submit carries it (a page of tasks, {"tasks":
[{"input": ...}]}), so a deeper one would fail as a 500 on every list that shows it."""
JSON_DEPTH_ROOM = 2
"""Levels a body's content may be written below where it sits in the body (see above)."""

DISCARD_MAX_BYTES = 64 * 1024 * 1024
"""Most bytes of an oversized body read and thrown away so that its sender reads the 413:
several times the default limit, so the usual mistake (a file a few times too big) gets its
answer; past it a sender is cut off (a reset) rather than served for free."""
DISCARD_MAX_S = 10.0
"""Longest an oversized body is read and thrown away: a slow sender is cut off then."""


async def read_json(request: Request) -> Any:
    """The request body as JSON: 415 unless it says application/json, 413 over the node's
    size limit."""
    _check_media_type(request.headers.get("content-type"))
    node: Node = request.app.state.node
    body = await _read_within(request, node.settings.max_input_bytes)
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


def _check_media_type(header: str | None) -> None:
    """415 unless the Content-Type is application/json or application/*+json (parameters
    such as charset allowed, any case)."""
    kind = (header or "").partition(";")[0].strip().lower()
    if kind == "application/json" or (kind.startswith("application/") and
                                      kind.endswith("+json")):
        return
    raise UnsupportedMediaTypeError(
        "unsupported_media_type", f"Content-Type {header!r} is not JSON: send the body as "
        "JSON with 'Content-Type: application/json' (curl: -H 'Content-Type: "
        "application/json'; httpx/requests: json=...)", field="Content-Type")


async def _read_within(request: Request, limit: int) -> bytes:
    """The body, read as it arrives; a 413 once it passes ``limit`` bytes (at once when its
    Content-Length says it will), the rest thrown away first (see the module's docstring)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        await discard_body(request, int(declared))
        raise _too_large(f"{int(declared)} bytes", limit)
    chunks: list[bytes] = []
    size = 0
    stream = request.stream()
    async for chunk in stream:
        size += len(chunk)
        if size > limit:
            chunks.clear()
            await discard_body(request, None, stream)
            raise _too_large(f"over {limit} bytes", limit)
        chunks.append(chunk)
    return b"".join(chunks)


async def discard_body(request: Request, declared: int | None,
                   stream: AsyncIterator[bytes] | None = None) -> None:
    """Read and drop what is left of the body within DISCARD_MAX_BYTES and DISCARD_MAX_S;
    nothing when its Content-Length already says it is longer than that."""
    if declared is not None and declared > DISCARD_MAX_BYTES:
        return
    chunks = stream if stream is not None else request.stream()
    thrown = 0
    with contextlib.suppress(TimeoutError, ClientDisconnect):
        async with asyncio.timeout(DISCARD_MAX_S):
            async for chunk in chunks:
                thrown += len(chunk)
                if thrown > DISCARD_MAX_BYTES:
                    return


def _too_large(size: str, limit: int) -> PayloadTooLargeError:
    # Connection: close: whatever of the body was not read must not be taken for the next
    # request on this connection.
    return PayloadTooLargeError(
        "payload_too_large", f"the request body is {size}, over the limit of {limit}: "
        "send a smaller input, pass large data by path or URL, or raise max_input_bytes",
        field="input", headers={"Connection": "close"})
