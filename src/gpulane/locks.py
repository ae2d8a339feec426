"""OS file locks that make a node the one owner of its data dir and of its GPUs.

flock locks vanish with the process that holds them, so a crash never leaves a stale lock that
blocks the next start; the holder writes its pid into the file so a refusal can name it.

A lock file is a place another user could tamper with, so it is opened the careful way: never
through a symlink (``O_NOFOLLOW``), never in a folder that anyone may write to without the
sticky bit or that another user owns, never truncated before it is held, and only if it is a
plain file. Every refusal, a permission error included, is one ``ConfigError`` line that names
the path and the fix, which ``gpulane serve`` prints before it exits 2.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import stat
from collections.abc import Sequence
from pathlib import Path

from gpulane.errors import ConfigError

log = logging.getLogger(__name__)

LOCK_FILE_MODE = 0o644
"""Lock files: only their owner writes them; anyone may read the holder's pid."""
LOCK_DIR_MODE = 0o755
"""Folders made for lock files: only their owner adds or removes locks."""
OPEN_FLAGS = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
"""Create if missing, never follow a symlink planted at the lock's path, never leak to workers."""


def check_lock_dir(path: Path) -> None:
    """Refuse a folder where another user could swap or hold our lock files: one writable by
    everyone without the sticky bit, or one owned by someone other than us or root."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise ConfigError(f"lock folder {path} cannot be read ({exc.strerror}): create it, or "
                          "point --data-dir / gpu_lock_dir at a folder this user owns") from None
    if not stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"lock folder {path} is not a folder: point --data-dir / gpu_lock_dir "
                          "at a folder this user owns")
    if st.st_mode & stat.S_IWOTH and not st.st_mode & stat.S_ISVTX:
        raise ConfigError(f"lock folder {path} is writable by every user (mode "
                          f"{stat.S_IMODE(st.st_mode):o}): run chmod o-w {path}, or point "
                          "--data-dir / gpu_lock_dir at a folder only this user can write")
    if st.st_uid not in (os.geteuid(), 0):
        raise ConfigError(f"lock folder {path} is owned by another user (uid {st.st_uid}): "
                          "point --data-dir / gpu_lock_dir at a folder this user owns")


def gpu_lock_dir(configured: str | Path | None, host_dirs: Sequence[str],
                 data_dir: Path) -> Path:
    """Where the per-GPU lock files go: the configured folder, else the first host-wide one
    that can be made and written, else the data dir's ``gpu-locks``, which only keeps apart
    nodes that share this data dir (logged, since two data dirs could then share a GPU)."""
    if configured is not None:
        return Path(configured)
    for candidate in map(Path, host_dirs):
        try:
            candidate.mkdir(mode=LOCK_DIR_MODE, parents=True, exist_ok=True)
        except OSError:
            continue
        if os.access(candidate, os.W_OK | os.X_OK):
            return candidate
    fallback = data_dir / "gpu-locks"
    log.warning("GPU locks in %s (none of %s can be written): they keep apart only nodes that "
                "share this data dir; set gpu_lock_dir to a host-wide folder to guard every "
                "node on this host", fallback, ", ".join(host_dirs) or "no host folder")
    return fallback


class FileLock:
    """An exclusive, non-blocking flock on one file."""

    def __init__(self, path: str | Path, what: str) -> None:
        self.path = Path(path)
        self.what = what
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = self._open()
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise ConfigError(f"lock {self.path} is not a plain file: remove it, or point "
                                  "--data-dir / gpu_lock_dir elsewhere")
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
                raise ConfigError(
                    f"{self.what} is already owned by another gpulane node (pid {holder}, lock "
                    f"{self.path}): stop that node first, or give this one its own --data-dir"
                ) from None
            # Held now: only the holder rewrites the pid (a refused node leaves it as it was).
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    def _open(self) -> int:
        folder = self.path.parent
        try:
            folder.mkdir(mode=LOCK_DIR_MODE, parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"cannot create lock folder {folder} ({exc.strerror}): create it "
                              "for this user, or point --data-dir / gpu_lock_dir at a folder "
                              "this user can write") from None
        check_lock_dir(folder)
        try:
            return os.open(self.path, OPEN_FLAGS, LOCK_FILE_MODE)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise ConfigError(f"lock {self.path} is a symlink, which gpulane never follows: "
                                  "remove it and start again") from None
            if exc.errno in (errno.EACCES, errno.EPERM):
                raise ConfigError(f"lock {self.path} cannot be opened (permission denied): make "
                                  "it writable by this user, or point --data-dir / gpu_lock_dir "
                                  "at a folder this user owns") from None
            raise ConfigError(f"lock {self.path} cannot be opened ({exc.strerror}): point "
                              "--data-dir / gpu_lock_dir at a folder this user can write") from None

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
