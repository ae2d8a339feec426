"""OS file locks that make a node the one owner of its data dir (and, later, of its GPUs).

flock locks vanish with the process that holds them, so a crash never leaves a stale lock that
blocks the next start; the holder writes its pid into the file so a refusal can name it.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from gpulane.errors import ConfigError


class FileLock:
    """An exclusive, non-blocking flock on one file."""

    def __init__(self, path: str | Path, what: str) -> None:
        self.path = Path(path)
        self.what = what
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise ConfigError(
                f"{self.what} is already owned by another gpulane node (pid {holder}, lock "
                f"{self.path}): stop that node first, or give this one its own --data-dir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
