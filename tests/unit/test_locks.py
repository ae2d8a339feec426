"""One owner per data dir and per GPU: a second lock names the holder's pid."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from gpulane.config import Settings
from gpulane.devices import DeviceSnapshot
from gpulane.errors import ConfigError
from gpulane.locks import FileLock
from gpulane.node import Node


def test_second_lock_is_refused_naming_the_pid(tmp_path: Path) -> None:
    a = FileLock(tmp_path / "x.lock", "thing")
    a.acquire()
    with pytest.raises(ConfigError, match=f"pid {os.getpid()}"):
        FileLock(tmp_path / "x.lock", "thing").acquire()
    a.release()
    FileLock(tmp_path / "x.lock", "thing").acquire()  # free again


def test_a_dead_holder_leaves_no_stale_lock(tmp_path: Path) -> None:
    code = ("from gpulane.locks import FileLock; import os; "
            f"FileLock({str(tmp_path / 'y.lock')!r}, 'y').acquire(); os._exit(0)")
    subprocess.run([sys.executable, "-c", code], check=True)
    FileLock(tmp_path / "y.lock", "y").acquire()


class _RealGpus:
    """A provider that claims to be real hardware, for the per-GPU locks."""

    name = "fake-nvml"
    simulated = False

    def count(self) -> int:
        return 1

    def snapshot(self) -> list[DeviceSnapshot]:
        return [DeviceSnapshot(0, "GPU-test-uuid", "Fake", 1000, 0, 1000, 0.0, None, None,
                               None)]

    def close(self) -> None:
        pass


def test_two_nodes_never_own_the_same_real_gpu(tmp_path: Path) -> None:
    def node(name: str) -> Node:
        s = Settings.model_validate({"data_dir": tmp_path / name,
                                     "gpu_lock_dir": str(tmp_path / "gpu-locks")})
        return Node(s, provider=_RealGpus())
    a, b = node("a"), node("b")
    a.lock()
    with pytest.raises(ConfigError, match="GPU 0 \\(GPU-test-uuid\\)"):
        b.lock()
    a._unlock()
    b.lock()
    b._unlock()
