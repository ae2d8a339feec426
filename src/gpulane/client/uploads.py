"""Uploads for ``Client.upload`` and ``AsyncClient.upload``: ``POST /v1/files`` with the file
as the raw body.

A file on disk is streamed in chunks, never read whole; its size goes in Content-Length, so
a node whose upload_max_bytes it passes refuses it before a byte is sent past the headers.
Each iteration opens the file afresh, so a retried upload sends it from the start.
"""

from __future__ import annotations

import asyncio
import mimetypes
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

from gpulane.client._core import Request

UPLOAD_CHUNK_BYTES = 1 << 20
"""Bytes read from disk at a time."""
DEFAULT_CONTENT_TYPE = "application/octet-stream"
"""What an upload is sent as when neither the caller nor the file's suffix says."""

Source = str | os.PathLike[str] | bytes | bytearray | memoryview


class FileChunks:
    """A file's bytes, chunk by chunk, for the blocking client."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __iter__(self) -> Iterator[bytes]:
        with open(self.path, "rb") as fh:
            while chunk := fh.read(UPLOAD_CHUNK_BYTES):
                yield chunk


class AsyncFileChunks:
    """A file's bytes, chunk by chunk, read off the event loop, for the asyncio client."""

    def __init__(self, path: Path) -> None:
        self.path = path

    async def __aiter__(self) -> AsyncIterator[bytes]:
        fh = await asyncio.to_thread(open, self.path, "rb")
        try:
            while chunk := await asyncio.to_thread(fh.read, UPLOAD_CHUNK_BYTES):
                yield chunk
        finally:
            fh.close()


def upload_request(source: Source, content_type: str | None, name: str | None, *,
                   asynchronous: bool = False) -> Request:
    """``POST /v1/files`` for bytes or a file path; the name and type default to the file's."""
    headers: dict[str, str] = {}
    if isinstance(source, bytes | bytearray | memoryview):
        body: object = bytes(source)
    else:
        path = Path(source)
        size = path.stat().st_size  # FileNotFoundError here, before anything is sent
        headers["Content-Length"] = str(size)
        body = AsyncFileChunks(path) if asynchronous else FileChunks(path)
        name = path.name if name is None else name
        content_type = content_type or mimetypes.guess_type(path.name)[0]
    headers["Content-Type"] = content_type or DEFAULT_CONTENT_TYPE
    return Request("POST", "/v1/files", params={"name": name} if name else {},
                   headers=headers, content=body, idempotent=False)
