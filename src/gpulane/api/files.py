"""Upload endpoints: ``POST /v1/files`` (the raw body is the file), ``GET`` and ``DELETE
/v1/files/{id}``.

An upload is streamed to disk as it arrives (gpulane/files.py), never held whole; its answer's
``id`` is what a task's input names it by (``{"file": "file-..."}``). The body may be of any
Content-Type (recorded as the upload's ``content_type``); ``?name=`` keeps an original name.
Over ``upload_max_bytes`` it is 413 upload_too_large, at once when its Content-Length says
so, else as soon as the bytes pass the limit; a sender that stalls is 408 upload_stalled, a
full disk 507 storage_full; nothing is left on disk in any case.

Scopes come from the guard's table (api/auth.py): these routes need ``tasks``. With API keys
an upload belongs to the key that sent it: to another key it does not exist (404), as a task
input too; an admin key sees every upload.
"""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Query, Request
from starlette.requests import ClientDisconnect

from gpulane.api.auth import caller
from gpulane.api.bodies import discard_body
from gpulane.api.responses import JSON
from gpulane.api.schemas import ErrorView
from gpulane.errors import PayloadTooLargeError, RequestError
from gpulane.files import NAME_MAX_CHARS, Files, StorageFullError, Upload
from gpulane.node import Node

router = APIRouter(prefix="/v1/files", tags=["files"])

NAME_QUERY_MAX_CHARS = 4 * NAME_MAX_CHARS
"""Longest ``?name=`` taken (422 above); what is kept is cut to NAME_MAX_CHARS."""


NameQuery = Annotated[str | None, Query(
    max_length=NAME_QUERY_MAX_CHARS,
    description="the file's original name, kept (sanitised) in its record")]

UPLOAD_BODY = {"requestBody": {"required": True, "description": "the file itself, any type",
                               "content": {"*/*": {"schema": {"type": "string",
                                                              "format": "binary"}}}}}
"""openapi_extra of the upload: the raw body is the file."""


def _files(request: Request) -> Files:
    node: Node = request.app.state.node
    return node.files


def _viewer(request: Request) -> str | None:
    """Whose uploads the caller sees: its key's name; None (every upload) with no keys on
    the node, or for an admin key."""
    who = caller(request)
    return None if who is None or who.is_admin else who.name


def _errors(*statuses: int) -> dict[int | str, dict[str, object]]:
    return {s: {"model": ErrorView} for s in statuses}


@router.post("", status_code=201, response_model=Upload, openapi_extra=UPLOAD_BODY,
             responses=_errors(400, 408, 413, 422, 507))
async def upload(request: Request, name: NameQuery = None) -> JSON:
    """Store the request body as a file that task inputs may name by its ``id``."""
    files = _files(request)
    who = caller(request)
    declared = request.headers.get("content-length", "")
    size = int(declared) if declared.isdigit() else None
    chunks = request.stream()
    try:
        saved = await files.save(chunks, declared=size,
                                 content_type=request.headers.get("content-type"), name=name,
                                 owner=who.name if who is not None else None)
    except (PayloadTooLargeError, StorageFullError):
        # Read what is left (within bounds) so that a client that sends its whole body
        # before reading gets the 413 (507) rather than a reset; a longer body is cut off.
        await discard_body(request, size, chunks)
        raise
    except ClientDisconnect:
        raise RequestError("upload_incomplete", "the client left before the whole file "
                           "arrived; nothing was kept: upload it again", field="body") from None
    return JSON(saved.to_json(), status_code=201)


@router.get("/{file_id}", response_model=Upload, responses=_errors(404))
async def get_file(request: Request, file_id: str) -> JSON:
    """An upload's record: size, SHA-256, type, name, when it expires."""
    # On a worker thread, as every file operation here: files_dir may be shared storage.
    found = await asyncio.to_thread(_files(request).find, file_id, _viewer(request))
    return JSON(found.to_json())


@router.delete("/{file_id}", response_model=Upload, responses=_errors(404))
async def delete_file(request: Request, file_id: str) -> JSON:
    """Remove an upload now (tasks that name it and have not run yet will not find it);
    answers its record."""
    gone = await asyncio.to_thread(_files(request).delete, file_id, _viewer(request))
    return JSON(gone.to_json())
