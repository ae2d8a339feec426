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
    """A file's first ``size`` bytes (its Content-Length), chunk by chunk, for the blocking
    client: a file that grew since is cut there (more than the length said is a protocol
    error), one that shrank raises OSError rather than leave the node waiting."""

    def __init__(self, path: Path, size: int) -> None:
        self.path = path
        self.size = size

    def __iter__(self) -> Iterator[bytes]:
        with open(self.path, "rb") as fh:
            left = self.size
            while left > 0:
                data = _piece(self.path, fh.read(min(left, UPLOAD_CHUNK_BYTES)))
                left -= len(data)
                yield data


class AsyncFileChunks:
    """The same, read off the event loop, for the asyncio client (no ``__iter__``: httpx
    would take the blocking one first)."""

    def __init__(self, path: Path, size: int) -> None:
        self.path = path
        self.size = size

    async def __aiter__(self) -> AsyncIterator[bytes]:
        fh = await asyncio.to_thread(open, self.path, "rb")
        try:
            left = self.size
            while left > 0:
                data = _piece(self.path, await asyncio.to_thread(
                    fh.read, min(left, UPLOAD_CHUNK_BYTES)))
                left -= len(data)
                yield data
        finally:
            fh.close()


def _piece(path: Path, data: bytes) -> bytes:
    if not data:
        raise OSError(f"{path} shrank while it was being uploaded: upload it again once it "
                      "is complete")
    return data


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
        body = AsyncFileChunks(path, size) if asynchronous else FileChunks(path, size)
        name = path.name if name is None else name
        content_type = content_type or mimetypes.guess_type(path.name)[0]
    headers["Content-Type"] = content_type or DEFAULT_CONTENT_TYPE
    return Request("POST", "/v1/files", params={"name": name} if name else {},
                   headers=headers, content=body, idempotent=False)
