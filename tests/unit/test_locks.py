"""One owner per data dir and per GPU: a second lock names the holder's pid; a lock file is
never followed through a symlink, never truncated by a node that does not hold it, never kept
in a folder another user could tamper with; every refusal is one line naming path and fix."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner

from gpulane.cli.server import serve
from gpulane.config import GPU_LOCK_DIRS, Settings
from gpulane.devices import DeviceSnapshot
from gpulane.errors import ConfigError
from gpulane.locks import FileLock, gpu_lock_dir
from gpulane.node import Node

NOBODY = 65534
"""The unprivileged user a root test run drops to, so that permissions really bite."""


def one_line_refusal(fn: Callable[[], None], *needles: str) -> str:
    """Run ``fn``; it must refuse with one ConfigError line that holds every needle."""
    with pytest.raises(ConfigError) as info:
        fn()
    message = str(info.value)
    assert "\n" not in message, message
    for needle in needles:
        assert needle in message, message
    return message


def test_second_lock_is_refused_naming_the_pid(tmp_path: Path) -> None:
    a = FileLock(tmp_path / "x.lock", "thing")
    a.acquire()
    one_line_refusal(FileLock(tmp_path / "x.lock", "thing").acquire, f"pid {os.getpid()}",
                     str(tmp_path / "x.lock"))
    a.release()
    FileLock(tmp_path / "x.lock", "thing").acquire()  # free again


def test_a_refused_node_leaves_the_holders_pid_in_place(tmp_path: Path) -> None:
    code = ("from gpulane.locks import FileLock; import sys; "
            f"FileLock({str(tmp_path / 'z.lock')!r}, 'z').acquire(); "
            "print('held', flush=True); sys.stdin.read()")
    holder = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        one_line_refusal(FileLock(tmp_path / "z.lock", "z").acquire, f"pid {holder.pid}")
        assert (tmp_path / "z.lock").read_text() == str(holder.pid)  # not truncated
    finally:
        holder.communicate("")
    FileLock(tmp_path / "z.lock", "z").acquire()
    assert (tmp_path / "z.lock").read_text() == str(os.getpid())


def test_a_dead_holder_leaves_no_stale_lock(tmp_path: Path) -> None:
    code = ("from gpulane.locks import FileLock; import os; "
            f"FileLock({str(tmp_path / 'y.lock')!r}, 'y').acquire(); os._exit(0)")
    subprocess.run([sys.executable, "-c", code], check=True)
    FileLock(tmp_path / "y.lock", "y").acquire()


def test_a_symlink_planted_at_the_lock_path_is_never_followed(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious")
    (tmp_path / "locks").mkdir()
    (tmp_path / "locks" / "gpu.lock").symlink_to(victim)
    one_line_refusal(FileLock(tmp_path / "locks" / "gpu.lock", "GPU 0").acquire, "symlink",
                     str(tmp_path / "locks" / "gpu.lock"), "remove it")
    assert victim.read_text() == "precious"


def test_a_dangling_symlink_creates_nothing(tmp_path: Path) -> None:
    target = tmp_path / "made-by-us"
    (tmp_path / "node.lock").symlink_to(target)
    one_line_refusal(FileLock(tmp_path / "node.lock", "data dir").acquire, "symlink")
    assert not target.exists()


def test_a_lock_that_is_not_a_plain_file_is_refused(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "fifo.lock")
    one_line_refusal(FileLock(tmp_path / "fifo.lock", "GPU 0").acquire, "not a plain file")


def test_a_world_writable_folder_without_the_sticky_bit_is_refused(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    one_line_refusal(FileLock(shared / "gpu.lock", "GPU 0").acquire, str(shared),
                     "writable by every user", f"chmod o-w {shared}")
    assert not (shared / "gpu.lock").exists()
    shared.chmod(0o1777)  # sticky: only a file's owner may remove or rename it
    FileLock(shared / "gpu.lock", "GPU 0").acquire()


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can give a folder to another user")
def test_a_folder_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    os.chown(theirs, NOBODY, NOBODY)
    one_line_refusal(FileLock(theirs / "gpu.lock", "GPU 0").acquire, "owned by another user",
                     f"uid {NOBODY}")


def unprivileged(fn: Callable[[], None]) -> str:
    """Run ``fn`` in a forked child that drops root (if it has it) and answer what it raised;
    a root test run would otherwise write anywhere."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            os.close(read_end)
            if os.geteuid() == 0:
                os.setgid(NOBODY)
                os.setuid(NOBODY)
            try:
                fn()
                answer = "acquired"
            except ConfigError as exc:
                answer = f"ConfigError: {exc}"
            except BaseException as exc:  # reported to the parent as text
                answer = f"{type(exc).__name__}: {exc}"
            os.write(write_end, answer.encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        answer = pipe.read().decode()
    os.waitpid(pid, 0)
    return answer


def test_a_folder_it_cannot_write_is_a_one_line_refusal(tmp_path: Path) -> None:
    locked = tmp_path / "ro"
    locked.mkdir()
    locked.chmod(0o555)
    answer = unprivileged(FileLock(locked / "gpu.lock", "GPU 0").acquire)
    # Dropped from root, the child may not even reach ro/ (pytest's folders are private):
    # that too is a folder it cannot write, refused in one line.
    assert answer.startswith("ConfigError: "), answer
    assert "\n" not in answer and "permission denied" in answer.lower(), answer
    assert str(locked) in answer and "gpu_lock_dir" in answer, answer


def test_a_folder_it_cannot_create_is_a_one_line_refusal(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    one_line_refusal(FileLock(tmp_path / "file" / "sub" / "x.lock", "data dir").acquire,
                     "cannot create lock folder", str(tmp_path / "file" / "sub"))


def test_gpu_locks_never_default_to_tmp() -> None:
    assert Settings().gpu_lock_dir is None
    assert GPU_LOCK_DIRS and not any(d == "/tmp" or d.startswith("/tmp/") for d in GPU_LOCK_DIRS)


def test_gpu_lock_dir_takes_the_first_host_folder_it_can_write(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("")
    host = tmp_path / "run" / "gpulane" / "gpu-locks"
    chosen = gpu_lock_dir(None, [str(tmp_path / "a-file" / "locks"), str(host)],
                          tmp_path / "data")
    assert chosen == host and host.is_dir()
    assert gpu_lock_dir(str(tmp_path / "mine"), [str(host)], tmp_path / "data") == \
        tmp_path / "mine"


def test_gpu_lock_dir_falls_back_to_the_data_dir_and_says_so(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "a-file").write_text("")
    with caplog.at_level(logging.WARNING, logger="gpulane.locks"):
        chosen = gpu_lock_dir(None, [str(tmp_path / "a-file" / "locks")], tmp_path / "data")
    assert chosen == tmp_path / "data" / "gpu-locks"
    assert "only nodes that share this data dir" in caplog.text


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


def test_a_refused_gpu_lock_gives_the_data_dir_back(tmp_path: Path) -> None:
    (tmp_path / "gpu-locks").mkdir()
    (tmp_path / "gpu-locks" / "GPU-test-uuid.lock").symlink_to(tmp_path / "elsewhere")
    s = Settings.model_validate({"data_dir": tmp_path / "a",
                                 "gpu_lock_dir": str(tmp_path / "gpu-locks")})
    node = Node(s, provider=_RealGpus())
    one_line_refusal(node.lock, "symlink")
    FileLock(tmp_path / "a" / "node.lock", "data dir").acquire()  # released on the refusal


def test_serve_prints_one_line_and_exits_2_on_a_planted_symlink(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "node.lock").symlink_to(tmp_path / "elsewhere")
    result = CliRunner().invoke(serve, ["--data-dir", str(data), "--simulate-gpus", "1x8GiB"])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpulane serve: lock "), result.output
    assert "symlink" in lines[0] and str(data / "node.lock") in lines[0]
