"""Files a task may name: paths under the node's allowed roots, and uploads.

A task's input names files by two top-level keys of an input object: ``file`` (a string) and
``files`` (a list of strings). Each is an absolute path, or the id of an upload
(``file-<32 hex>``, from ``POST /v1/files``). :meth:`Files.resolve_input` checks every one and
hands back the input with each replaced by its canonical absolute path (``..`` and symlinks
resolved), which is what the store keeps and the worker receives. A path must lie under one
of ``allowed_roots`` (by path components: /data2 is not under /data) and be a regular file;
anything else is a 400 naming the field, the value and the fix, and nothing is stored.

Uploads are streamed to ``files_dir`` under a temporary name, in chunks written off the event
loop, and renamed to their id once complete, so a crash never leaves half a file under a valid
id; each has a sidecar ``<id>.json`` with its size, digest, type, name, owner and expiry. With
API keys an upload belongs to the key that sent it: to any other key (admins aside) it does not
exist. :meth:`Files.purge` removes uploads past their expiry and a crashed upload's leftovers
(the housekeeper calls it).

An upload lives on the node that received it: in a fleet, a task naming it runs anywhere only
when ``files_dir`` is on storage that every node mounts at the same path.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import json
import os
import re
import stat
import time
import uuid
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

from gpulane.config import Settings
from gpulane.errors import ConfigError, NotFoundError, PayloadTooLargeError, RequestError
from gpulane.protocol import ENV_ALLOWED_ROOTS

UPLOAD_ID = re.compile(r"file-[0-9a-f]{32}")
"""What an upload's id looks like; nothing else is ever taken for one (nor joined to a path)."""
FILE_KEY = "file"
"""The input key that names one file."""
FILES_KEY = "files"
"""The input key that names a list of files."""
FILES_MAX = 256
"""Most files one input may name: each costs a few system calls at submit."""
PATH_MAX_CHARS = 4096
"""Longest path taken (Linux's PATH_MAX)."""
NAME_MAX_CHARS = 255
"""Longest original name an upload keeps."""
CONTENT_TYPE_MAX_CHARS = 255
"""Longest Content-Type an upload records."""
DEFAULT_CONTENT_TYPE = "application/octet-stream"
"""What an upload sent without a Content-Type is recorded as."""
WRITE_CHUNK_BYTES = 1 << 20
"""An upload is written to disk (off the event loop) in pieces of about this size."""
TEMP_SUFFIX = ".part"
"""Suffix of an upload being written (and of its sidecar being written)."""
UPLOAD_IDLE_S = 60.0
"""Longest an upload may send nothing: a sender that stalls mid-body (a slow-loris, each
holding an open file and a socket) is cut off with a 408 and its temporary file removed."""
DISK_RESERVE_BYTES = 1 << 30
"""Free space an upload never takes from the disk of files_dir: by default it is the data
dir's disk, where the store writes too, and uploads of many keys must not fill it (507)."""
TEMP_GRACE_S = 3600.0
"""A temporary file (or an upload without its sidecar) untouched for this long is a crashed
upload's leftover: an upload in progress touches its file with every piece it writes."""
_NAME_UNSAFE = re.compile(r"[^A-Za-z0-9._ -]+")
"""Characters an original name may not keep (replaced by '_')."""


class FileReferenceError(RequestError):
    """400: a task's input names a file it may not have (the field names which)."""

    status = 400


class UploadStalledError(RequestError):
    """408: an upload sent nothing for ``idle_s`` (Connection: close; nothing kept)."""

    status = 408


class StorageFullError(RequestError):
    """507: the uploads folder is out of space (or quota); nothing kept."""

    status = 507


@dataclass(frozen=True, slots=True)
class Upload:
    """An uploaded file as its sidecar records it."""

    id: str
    bytes: int
    sha256: str
    content_type: str
    name: str | None
    created_at: float
    expires_at: float
    uploaded_by: str | None  # the API key that sent it; None on a node without keys

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def canonical_roots(roots: Iterable[str | Path]) -> tuple[str, ...]:
    """Each root as an absolute canonical path; ConfigError naming one that is no folder."""
    out: list[str] = []
    for root in roots:
        text = str(root)
        if not text.strip():
            continue
        real = os.path.realpath(os.path.expanduser(text))
        if not os.path.isdir(real):
            raise ConfigError(f"allowed_roots: {text!r} is not an existing folder: create it, "
                              "or remove it from --allowed-root / GPULANE_ALLOWED_ROOTS")
        if real not in out:
            out.append(real)
    return tuple(out)


def names_files(input: Any) -> bool:
    """Whether a task's input names files (an object with a ``file`` or ``files`` key)."""
    return isinstance(input, dict) and (FILE_KEY in input or FILES_KEY in input)


def is_under(path: str, root: str) -> bool:
    """Whether canonical ``path`` is ``root`` or below it, by whole path components."""
    return os.path.commonpath([path, root]) == root


def clean_name(name: str | None) -> str | None:
    """An original file name safe to store and show: its last component, odd characters
    replaced, at most NAME_MAX_CHARS; None when nothing is left."""
    if name is None:
        return None
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    cleaned = _NAME_UNSAFE.sub("_", base).strip(" .")[:NAME_MAX_CHARS]
    return cleaned or None


class Files:
    """The node's allowed roots and uploads (see the module docstring)."""

    def __init__(self, roots: Iterable[str | Path], files_dir: str | Path, *, max_bytes: int,
                 retain_s: float, clock: Callable[[], float] = time.time,
                 idle_s: float = UPLOAD_IDLE_S, reserve_bytes: int = DISK_RESERVE_BYTES
                 ) -> None:
        self.roots = canonical_roots(roots)
        os.makedirs(files_dir, exist_ok=True)
        self.dir = os.path.realpath(files_dir)
        self.max_bytes = max_bytes
        self.retain_s = retain_s
        self.idle_s = idle_s
        self.reserve_bytes = reserve_bytes
        self.clock = clock
        self.admins: frozenset[str] = frozenset()
        """Key names that see every upload (the API sets its admin keys here)."""

    @classmethod
    def from_settings(cls, settings: Settings) -> Files:
        """The node's files: allowed_roots, files_dir (else <data_dir>/files), the limits."""
        return cls(settings.allowed_roots, settings.uploads_dir,
                   max_bytes=settings.upload_max_bytes, retain_s=settings.file_retain_s)

    @property
    def worker_roots(self) -> tuple[str, ...]:
        """The folders a worker may read task files from: the roots and the uploads."""
        return (*self.roots, self.dir)

    def worker_env(self) -> dict[str, str]:
        """What every worker is told of them (ENV_ALLOWED_ROOTS; docker mounts them)."""
        return {ENV_ALLOWED_ROOTS: os.pathsep.join(self.worker_roots)}

    # -- references in a task's input --------------------------------------------------------

    def resolve_input(self, input: Any, where: str = "", owner: str | None = None, *,
                      exists_checked: bool = True) -> Any:
        """``input`` with each file reference replaced by its canonical path (the same object
        when it names none); FileReferenceError (400) or NotFoundError (404, an upload
        unknown to ``owner``) for the first bad one. Walks the paths (realpath, stat): on
        shared storage call it off the event loop. ``exists_checked=False``: an upload id
        becomes its path, and a path under a root its canonical path, whether or not the file
        is still there (the input as a keyed submit stored it, for its repeat:
        api/task_inputs.py); a path outside the roots is refused all the same."""
        if not names_files(input):
            return input
        out = dict(input)
        if FILE_KEY in input:
            out[FILE_KEY] = self.resolve(input[FILE_KEY], f"{where}input.{FILE_KEY}", owner,
                                         exists_checked=exists_checked)
        if FILES_KEY in input:
            many = input[FILES_KEY]
            field = f"{where}input.{FILES_KEY}"
            if not isinstance(many, list):
                raise FileReferenceError(
                    "invalid_path", f"{field} must be a list of absolute paths or upload ids, "
                    f"not {type(many).__name__}", field=field)
            if len(many) > FILES_MAX:
                raise FileReferenceError(
                    "too_many_files", f"{field} names {len(many)} files, over {FILES_MAX}: "
                    "split the work into several tasks", field=field)
            out[FILES_KEY] = [self.resolve(v, f"{field}[{i}]", owner,
                                           exists_checked=exists_checked)
                              for i, v in enumerate(many)]
        return out

    def resolve(self, value: Any, field: str, owner: str | None = None, *,
                exists_checked: bool = True) -> str:
        """One reference as a canonical absolute path a worker may open."""
        if isinstance(value, str) and UPLOAD_ID.fullmatch(value):
            if not exists_checked:
                return self._data_path(value)
            return self._data_path(self.find(value, owner, field=field).id)
        if not isinstance(value, str) or not value:
            raise FileReferenceError(
                "invalid_path", f"{field} must be an absolute path or an upload id "
                f"(file-...), not {repr(value)[:80]}", field=field)
        if "\x00" in value or len(value) > PATH_MAX_CHARS:
            shown = value[:80] + ("..." if len(value) > 80 else "")
            raise FileReferenceError(
                "invalid_path", f"{field}={shown!r} is no usable path (a NUL byte, or over "
                f"{PATH_MAX_CHARS} characters): name a file under {self._roots_text()}",
                field=field)
        if not os.path.isabs(value):
            raise FileReferenceError(
                "relative_path", f"{field}={value!r} is a relative path: name the file by "
                f"its absolute path under {self._roots_text()}, or upload it (POST /v1/files) "
                "and send its id", field=field)
        real = os.path.realpath(value)
        if is_under(real, self.dir) or not any(is_under(real, r) for r in self.roots):
            raise FileReferenceError(
                "path_outside_roots", f"{field}={value!r} (resolved: {real!r}) is outside "
                f"the allowed roots {list(self.roots)}: " + (
                    "move the file under one of them, or upload it (POST /v1/files) and send "
                    "its id" if self.roots else
                    "this node has no allowed_roots; set them (--allowed-root DIR, "
                    "GPULANE_ALLOWED_ROOTS), or upload the file (POST /v1/files) and send its "
                    "id"), field=field, extra={"roots": list(self.roots)})
        if not exists_checked:
            return real
        try:
            st = os.stat(real)
        except FileNotFoundError:
            raise FileReferenceError(
                "file_not_found", f"{field}={value!r}: no such file (resolved: {real!r}): "
                "check the path", field=field) from None
        except OSError as exc:
            raise FileReferenceError(
                "invalid_path", f"{field}={value!r} cannot be read: {exc.strerror}",
                field=field) from None
        if not stat.S_ISREG(st.st_mode):
            raise FileReferenceError(
                "not_a_file", f"{field}={value!r} is not a regular file (a folder, a device "
                "or a pipe): name a file", field=field)
        return real

    def _roots_text(self) -> str:
        return (f"one of the allowed roots {list(self.roots)}" if self.roots
                else "an allowed root (this node has none: set allowed_roots)")

    # -- uploads ---------------------------------------------------------------------------

    def _data_path(self, upload_id: str) -> str:
        return os.path.join(self.dir, upload_id)

    def _meta_path(self, upload_id: str) -> str:
        return os.path.join(self.dir, f"{upload_id}.json")

    def visible(self, upload: Upload, owner: str | None) -> bool:
        """Whether ``owner`` (a key name; None: no keys, or an admin) may see the upload."""
        return (owner is None or upload.uploaded_by is None or upload.uploaded_by == owner
                or owner in self.admins)

    def find(self, upload_id: str, owner: str | None = None, *, field: str = "id") -> Upload:
        """The upload, unexpired and visible to ``owner``; NotFoundError otherwise (a foreign
        one is not told apart from a missing one)."""
        found = self._read(upload_id) if UPLOAD_ID.fullmatch(upload_id) else None
        if (found is None or not self.visible(found, owner) or found.expires_at <= self.clock()
                or not os.path.isfile(self._data_path(upload_id))):
            raise NotFoundError(
                "unknown_file", f"{field}={upload_id!r}: no such upload here (never made, "
                "expired, deleted, made by another key, or made on another node of the fleet): "
                "upload the file again (POST /v1/files)", field=field)
        return found

    def _read(self, upload_id: str) -> Upload | None:
        try:
            with open(self._meta_path(upload_id), "rb") as fh:
                record = json.load(fh)
            # Fields a later version may add are left out, not taken for a broken record.
            return Upload(**{f: record[f] for f in Upload.__dataclass_fields__})
        except (OSError, ValueError, TypeError, KeyError):
            return None

    def delete(self, upload_id: str, owner: str | None = None) -> Upload:
        """Remove an upload (NotFoundError as in :meth:`find`)."""
        found = self.find(upload_id, owner)
        self._remove(upload_id)
        return found

    def _remove(self, upload_id: str) -> None:
        # The sidecar first: without it the id is unknown at once, whatever is left behind.
        for path in (self._meta_path(upload_id), self._data_path(upload_id)):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    def too_large(self, size: str) -> PayloadTooLargeError:
        """The 413 for an upload of ``size`` (Connection: close: the rest is not read)."""
        return PayloadTooLargeError(
            "upload_too_large", f"the upload is {size}, over the limit of {self.max_bytes} "
            "bytes (upload_max_bytes): send a smaller file, put it under an allowed root and "
            "name its path, or raise upload_max_bytes", field="body",
            headers={"Connection": "close"})

    async def save(self, chunks: AsyncIterable[bytes], *, declared: int | None = None,
                   content_type: str | None = None, name: str | None = None,
                   owner: str | None = None) -> Upload:
        """Stream ``chunks`` to a new upload. PayloadTooLargeError (413) when ``declared``
        (a Content-Length) or the bytes received pass ``max_bytes``, UploadStalledError (408)
        when nothing arrives for ``idle_s``, StorageFullError (507) when the disk is full:
        nothing is left on disk in any case."""
        if declared is not None and declared > self.max_bytes:
            raise self.too_large(f"{declared} bytes")
        free = await asyncio.to_thread(_free_bytes, self.dir)
        if free - (self.max_bytes if declared is None else declared) < self.reserve_bytes:
            raise self.full(0)
        upload_id = f"file-{uuid.uuid4().hex}"
        temp = self._data_path(upload_id) + TEMP_SUFFIX
        digest = hashlib.sha256()
        size = 0
        fh: IO[bytes] = await asyncio.to_thread(open, temp, "xb")
        try:
            pending = bytearray()
            async for chunk in self._arriving(chunks):
                size += len(chunk)
                if size > self.max_bytes:
                    raise self.too_large(f"over {self.max_bytes} bytes")
                pending += chunk
                if len(pending) >= WRITE_CHUNK_BYTES:
                    await asyncio.to_thread(_write, fh, digest, bytes(pending))
                    pending.clear()
            await asyncio.to_thread(_finish, fh, digest, bytes(pending))
            now = self.clock()
            upload = Upload(upload_id, size, digest.hexdigest(),
                            (content_type or DEFAULT_CONTENT_TYPE)[:CONTENT_TYPE_MAX_CHARS],
                            clean_name(name), now, now + self.retain_s, owner)
            await asyncio.to_thread(os.rename, temp, self._data_path(upload_id))
            await asyncio.to_thread(self._write_meta, upload)
        except BaseException as exc:
            fh.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp)
            self._remove(upload_id)
            if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise self.full(size) from None
            raise
        return upload

    def full(self, received: int) -> StorageFullError:
        """The 507 for an upload the disk of files_dir cannot take (keeping its reserve)."""
        return StorageFullError(
            "storage_full", f"the node's uploads folder is out of space ({received} bytes of "
            f"this upload received, none kept; {self.reserve_bytes} bytes are kept free for "
            "the node): retry later, put the file under an allowed root and name its path, "
            "or free space in files_dir", field="body", headers={"Connection": "close"})

    async def _arriving(self, chunks: AsyncIterable[bytes]) -> AsyncIterator[bytes]:
        """``chunks`` as they arrive; UploadStalledError when none comes for ``idle_s``."""
        it = aiter(chunks)
        while True:
            try:
                async with asyncio.timeout(self.idle_s):
                    chunk = await anext(it)
            except StopAsyncIteration:
                return
            except TimeoutError:
                raise UploadStalledError(
                    "upload_stalled", f"the upload sent nothing for {self.idle_s:g} s; "
                    "nothing was kept: send the file again, at a steady pace", field="body",
                    headers={"Connection": "close"}) from None
            yield chunk

    def _write_meta(self, upload: Upload) -> None:
        path = self._meta_path(upload.id)
        with open(path + TEMP_SUFFIX, "w") as fh:
            json.dump(upload.to_json(), fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.rename(path + TEMP_SUFFIX, path)

    # -- retention -------------------------------------------------------------------------

    def purge(self, now: float | None = None) -> int:
        """Remove uploads past their expiry and crashed uploads' leftovers (a temporary file,
        or data without its sidecar, untouched for TEMP_GRACE_S); returns uploads removed.
        Runs on a worker thread."""
        now = self.clock() if now is None else now
        removed = 0
        names: dict[str, os.DirEntry[str]] = {}
        with contextlib.suppress(FileNotFoundError), os.scandir(self.dir) as entries:
            names = {e.name: e for e in entries if e.is_file(follow_symlinks=False)}
        for name, entry in names.items():
            stem = name.removesuffix(".json")
            if stem != name and UPLOAD_ID.fullmatch(stem):
                upload = self._read(stem)
                if upload is not None and upload.expires_at <= now:
                    self._remove(stem)
                    removed += 1
                elif upload is None and _stale(entry, now):  # a sidecar that does not read
                    self._remove(stem)
            elif _leftover(name, names) and _stale(entry, now):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)
        return removed


def _leftover(name: str, names: Mapping[str, object]) -> bool:
    """Whether ``name`` is what a crashed upload leaves: a temporary file, or data whose
    record was never written."""
    return name.startswith("file-") and (name.endswith(TEMP_SUFFIX) or (
        UPLOAD_ID.fullmatch(name) is not None and f"{name}.json" not in names))


def _stale(entry: os.DirEntry[str], now: float) -> bool:
    with contextlib.suppress(OSError):
        return entry.stat(follow_symlinks=False).st_mtime < now - TEMP_GRACE_S
    return False


def _free_bytes(folder: str) -> int:
    st = os.statvfs(folder)
    return st.f_bavail * st.f_frsize


def _write(fh: IO[bytes], digest: Any, data: bytes) -> None:
    digest.update(data)
    fh.write(data)


def _finish(fh: IO[bytes], digest: Any, data: bytes) -> None:
    """Write the last piece and make the file durable before it is renamed to its id."""
    _write(fh, digest, data)
    fh.flush()
    os.fsync(fh.fileno())
    fh.close()
