"""A worker that stops reading its stdin cannot make the node's buffer grow without bound
(runtime/worker_process.py): a big unread buffer is watched and the worker killed when it does
not drain in time, and a worker sent more while past the cap is killed at once. Real
processes (``sleep`` never reads), limits made small for the test."""

from __future__ import annotations

import asyncio

import pytest

from gpulane.runtime import worker_process
from gpulane.runtime.launchers import DeviceAssignment, LaunchSpec
from gpulane.runtime.worker_process import WorkerProcess

WAIT_S = 20.0
"""How long a test waits for the worker's exit before it fails."""


async def _nothing(*_: object) -> None:
    return None


async def _deaf_worker() -> WorkerProcess:
    """A session worker that never reads what it is sent."""
    proc = WorkerProcess("deaf-1", "deaf", DeviceAssignment("cpu"),
                         LaunchSpec(["sleep", "3600"], {"PATH": "/usr/bin:/bin"}, None),
                         session=True, stderr_tail_lines=5, on_messages=_nothing,
                         on_exit=_nothing)
    await proc.spawn()
    return proc


async def test_a_worker_that_leaves_a_big_buffer_unread_is_killed_as_stuck(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(worker_process, "STDIN_HIGH_WATER_BYTES", 256 * 1024)
    monkeypatch.setattr(worker_process, "STDIN_DRAIN_TIMEOUT_S", 0.2)
    proc = await _deaf_worker()
    try:
        assert proc.send(b"x" * (1024 * 1024))  # more than a pipe holds: it stays buffered
        await asyncio.wait_for(proc.wait_exited(), WAIT_S)
        assert proc.returncode is not None and proc.returncode < 0  # killed
    finally:
        proc.kill()


async def test_a_worker_sent_more_while_past_the_cap_is_killed_at_once(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(worker_process, "STDIN_CAP_BYTES", 512 * 1024)
    proc = await _deaf_worker()
    try:
        assert proc.send(b"x" * (1024 * 1024))  # the op itself may be big: it goes out
        assert not proc.send(b'{"op":"cancel","task":"t"}\n')  # but nothing after it
        await asyncio.wait_for(proc.wait_exited(), WAIT_S)
    finally:
        proc.kill()


async def test_a_worker_that_reads_its_stdin_is_left_alone(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(worker_process, "STDIN_HIGH_WATER_BYTES", 256 * 1024)
    proc = WorkerProcess("cat-1", "cat", DeviceAssignment("cpu"),
                         LaunchSpec(["sh", "-c", "cat > /dev/null"], {"PATH": "/usr/bin:/bin"},
                                    None),
                         session=True, stderr_tail_lines=5, on_messages=_nothing,
                         on_exit=_nothing)
    await proc.spawn()
    try:
        assert proc.send(b"x" * (4 * 1024 * 1024))
        drainer = proc._drainer
        assert drainer is not None  # over the high-water mark: watched
        await asyncio.wait_for(drainer, WAIT_S)
        assert proc._drainer is None and proc.returncode is None  # drained, still running
    finally:
        proc.kill()
        await asyncio.wait_for(proc.wait_exited(), WAIT_S)
