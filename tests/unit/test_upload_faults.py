"""Uploads that go wrong on the node's side of the wire: a sender that stalls mid-body (a
slow-loris) is cut off with a 408, a full disk is a 507 naming the fix, and neither leaves a
file behind."""

from __future__ import annotations

import asyncio
import errno
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

import gpulane.files
from gpulane.files import Files, StorageFullError, UploadStalledError


def files(tmp_path: Path, **kw: float) -> Files:
    return Files((), tmp_path / "uploads", max_bytes=1 << 20, retain_s=60.0, **kw)


async def test_a_stalled_upload_is_408_and_leaves_nothing(tmp_path: Path) -> None:
    f = files(tmp_path, idle_s=0.05)

    async def stalls() -> AsyncIterator[bytes]:
        yield b"the first bytes"
        await asyncio.Event().wait()  # then nothing, forever
        yield b""

    with pytest.raises(UploadStalledError) as info:
        await f.save(stalls())
    err = info.value
    assert (err.status, err.code, err.field) == (408, "upload_stalled", "body")
    assert err.headers == {"Connection": "close"} and "send the file again" in err.message
    assert os.listdir(f.dir) == []


async def test_a_slow_but_steady_upload_is_kept(tmp_path: Path) -> None:
    f = files(tmp_path, idle_s=0.5)

    async def steady() -> AsyncIterator[bytes]:
        for _ in range(3):
            await asyncio.sleep(0.01)
            yield b"abc"

    up = await f.save(steady())
    assert up.bytes == 9 and sorted(os.listdir(f.dir)) == [up.id, f"{up.id}.json"]


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
async def test_a_full_disk_is_507_and_leaves_nothing(tmp_path: Path, code: int,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    f = files(tmp_path)

    def full(*_: object) -> None:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(gpulane.files, "_finish", full)

    async def one() -> AsyncIterator[bytes]:
        yield b"abc"

    with pytest.raises(StorageFullError) as info:
        await f.save(one())
    err = info.value
    assert (err.status, err.code, err.field) == (507, "storage_full", "body")
    assert "files_dir" in err.message and "allowed root" in err.message
    assert os.listdir(f.dir) == []


async def test_another_os_error_is_not_taken_for_a_full_disk(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = files(tmp_path)

    def broken(*_: object) -> None:
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(gpulane.files, "_finish", broken)

    async def one() -> AsyncIterator[bytes]:
        yield b"abc"

    with pytest.raises(OSError) as info:
        await f.save(one())
    assert not isinstance(info.value, StorageFullError) and os.listdir(f.dir) == []


async def test_an_upload_never_takes_the_disk_s_reserve(tmp_path: Path) -> None:
    """The store may share the disk: an upload that would leave less than the reserve free is
    a 507 before a byte is written, by its Content-Length, else by the largest it may be."""
    free = os.statvfs(tmp_path).f_bavail * os.statvfs(tmp_path).f_frsize

    async def one() -> AsyncIterator[bytes]:
        yield b"abc"

    full = files(tmp_path, reserve_bytes=free + (1 << 30))  # more than the disk has free
    with pytest.raises(StorageFullError) as info:
        await full.save(one(), declared=3)
    assert info.value.status == 507 and info.value.headers == {"Connection": "close"}
    # Room for a small file but not for the largest upload, which a body without a length
    # may be (margins of GiBs: other work on this disk moves its free space meanwhile).
    f = Files((), tmp_path / "uploads", max_bytes=8 << 30, retain_s=60.0,
              reserve_bytes=free - (4 << 30))
    with pytest.raises(StorageFullError):
        await f.save(one())
    assert os.listdir(f.dir) == []
    assert (await f.save(one(), declared=3)).bytes == 3
