"""``gpulane upload FILE`` and the SDK's upload, against an httpx.MockTransport server: the
file goes as the raw body with its length, type and name, and the id is printed."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner

from gpulane.cli import main
from gpulane.client import Client
from gpulane.errors import APIError
from tests.unit.test_cli_client import invoke

RECORD = {"id": "file-" + "a" * 32, "bytes": 6, "sha256": "x", "content_type": "image/png",
          "name": "face.png", "created_at": 1.0, "expires_at": 2.0, "uploaded_by": None}


def test_upload_prints_the_id_and_streams_the_file(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "face.png").write_bytes(b"\x89PNG..")
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        request.read()
        seen.append(request)
        return httpx.Response(201, json=RECORD)

    result = invoke(handler, monkeypatch, "upload", str(tmp_path / "face.png"))
    assert result.exit_code == 0, result.output
    assert result.output.strip() == RECORD["id"]
    sent = seen[0]
    assert (sent.method, sent.url.path, sent.url.params["name"]) == ("POST", "/v1/files",
                                                                     "face.png")
    assert sent.content == b"\x89PNG.." and sent.headers["content-length"] == "6"
    assert sent.headers["content-type"] == "image/png"
    assert "transfer-encoding" not in sent.headers
    whole = invoke(handler, monkeypatch, "upload", "--json", "--content-type", "x/y",
                   "--name", "n", str(tmp_path / "face.png"))
    assert json.loads(whole.output) == RECORD
    assert seen[1].headers["content-type"] == "x/y" and seen[1].url.params["name"] == "n"


def test_upload_refused_is_one_line_and_exit_2(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "big.bin").write_bytes(b"x" * 10)

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(413, json={"error": {
            "code": "upload_too_large", "message": "over the limit", "field": "body"}})

    result = invoke(handler, monkeypatch, "upload", str(tmp_path / "big.bin"))
    assert result.exit_code == 2 and "upload_too_large" in result.output
    assert invoke(handler, monkeypatch, "upload", str(tmp_path / "nope")).exit_code == 2


def test_sdk_upload_of_bytes_has_no_name_and_a_default_type() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        request.read()
        seen.append(request)
        return httpx.Response(201, json=RECORD)

    with Client("http://t", transport=httpx.MockTransport(handler)) as client:
        assert client.upload(b"abc") == RECORD
        with pytest.raises(FileNotFoundError):
            client.upload(Path("/nonexistent/file.png"))
    assert seen[0].content == b"abc" and "name" not in seen[0].url.params
    assert seen[0].headers["content-type"] == "application/octet-stream"
    with pytest.raises(APIError), Client("http://t", transport=httpx.MockTransport(
            lambda r: httpx.Response(404, json={"error": {
                "code": "unknown_file", "message": "m", "field": "id"}}))) as client:
        client.upload(b"abc")


def test_serve_refuses_an_allowed_root_that_is_not_a_folder(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, [
        "serve", "--data-dir", str(tmp_path / "data"), "--simulate-gpus", "1x1GiB",
        "--allowed-root", str(tmp_path), "--allowed-root", str(tmp_path / "nope")])
    assert result.exit_code == 2
    assert "allowed_roots" in result.output and "nope" in result.output


def test_a_file_that_changes_size_while_it_uploads(tmp_path: Path) -> None:
    """Its Content-Length was its size at the start: a file that grew is sent up to it (more
    would break the request), one that shrank fails at once instead of leaving the node
    waiting for bytes that never come."""
    from gpulane.client.uploads import AsyncFileChunks, FileChunks

    path = tmp_path / "log.txt"
    path.write_bytes(b"0123456789")
    assert b"".join(FileChunks(path, 4)) == b"0123"
    assert b"".join(FileChunks(path, 0)) == b""
    with pytest.raises(OSError, match="shrank while it was being uploaded"):
        b"".join(FileChunks(path, 12))

    async def read(size: int) -> bytes:
        return b"".join([c async for c in AsyncFileChunks(path, size)])

    assert asyncio.run(read(7)) == b"0123456"
    with pytest.raises(OSError, match="shrank"):
        asyncio.run(read(11))


def test_async_sdk_upload_streams_a_file_from_disk(tmp_path: Path) -> None:
    """The asyncio client's file body has no blocking __iter__: httpx takes one first, and
    would read the file on the event loop (or refuse a sync stream on an async client)."""
    from gpulane.client import AsyncClient

    (tmp_path / "face.png").write_bytes(b"\x89PNG..")
    seen: list[httpx.Request] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        await request.aread()
        seen.append(request)
        return httpx.Response(201, json=RECORD)

    async def upload() -> object:
        async with AsyncClient("http://t", transport=httpx.MockTransport(handler)) as client:
            return await client.upload(tmp_path / "face.png")

    assert asyncio.run(upload()) == RECORD
    assert seen[0].content == b"\x89PNG.." and seen[0].headers["content-length"] == "6"
    assert seen[0].headers["content-type"] == "image/png"
