"""Workers die with their node without preexec_fn (runtime/spawn.py): both ways of arming
the parent-death signal (setpriv, and the exec shim) kill the worker when the process that
spawned it is killed -9, the worker keeps the pid that was spawned, and the shim refuses to
start a worker whose node is already gone."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gpulane.runtime import spawn
from gpulane.runtime.die_with_parent import EXIT_ORPHANED, EXIT_USAGE
from gpulane.runtime.spawn import SHIM, die_with_parent

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="PR_SET_PDEATHSIG is Linux's")

WAIT_S = 20.0
"""How long a test waits for a process to go before it fails."""

# A stand-in node: spawns the wrapped command (NODE_PID: its own pid), says the child's pid,
# then waits to be killed.
NODE = """
import os, subprocess, sys, time
argv = [str(os.getpid()) if a == "NODE_PID" else a for a in sys.argv[1:]]
child = subprocess.Popen(argv, start_new_session=True)
print(child.pid, flush=True)
time.sleep(3600)
"""


def _gone(pid: int) -> bool:
    """Exited (a zombie nobody reaped counts: it holds no memory)."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            return any(line.startswith("State:") and "Z" in line for line in fh)
    except FileNotFoundError:
        return True


def _dies_with_its_node(argv: list[str]) -> None:
    node = subprocess.Popen([sys.executable, "-c", NODE, *argv], stdout=subprocess.PIPE,
                            text=True)
    assert node.stdout is not None
    worker = int(node.stdout.readline())
    try:
        # The wrapper has exec'd the worker in place: the pid spawned is the worker's.
        deadline = time.monotonic() + WAIT_S
        while Path(f"/proc/{worker}/cmdline").read_bytes().split(b"\0")[0] != b"sleep":
            assert time.monotonic() < deadline, "the wrapper never exec'd the worker"
            time.sleep(0.01)
        node.kill()
        node.wait()
        deadline = time.monotonic() + WAIT_S
        while not _gone(worker):
            assert time.monotonic() < deadline, "the worker outlived its node"
            time.sleep(0.01)
    finally:
        if not _gone(worker):
            os.kill(worker, signal.SIGKILL)


@pytest.mark.skipif(spawn.setpriv_path() is None, reason="no setpriv --pdeathsig here")
def test_through_setpriv_the_worker_dies_with_its_node() -> None:
    argv = die_with_parent(["sleep", "3600"])
    assert argv[0] == spawn.setpriv_path() and argv[1:4] == ["--pdeathsig", "KILL", "--"]
    _dies_with_its_node(argv)


def test_through_the_shim_the_worker_dies_with_its_node() -> None:
    argv = die_with_parent(["sleep", "3600"], use_setpriv=False)
    assert argv[:3] == [sys.executable, "-I", str(SHIM)] and argv[3] == str(os.getpid())
    # The shim checks its parent is the node that built the argv: here, the stand-in.
    _dies_with_its_node([*argv[:3], "NODE_PID", *argv[4:]])


def test_the_shim_starts_nothing_when_its_node_is_already_gone(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    # Its parent is this test, not pid 1: as if the node died and the shim was reparented.
    r = subprocess.run([sys.executable, "-I", str(SHIM), "1", "--", "touch", str(marker)],
                       capture_output=True, text=True, check=False)
    assert r.returncode == EXIT_ORPHANED and not marker.exists()
    assert "exited before the worker started" in r.stderr


def test_the_shim_refuses_a_malformed_command_line() -> None:
    r = subprocess.run([sys.executable, "-I", str(SHIM), "sleep", "1"], capture_output=True,
                       text=True, check=False)
    assert r.returncode == EXIT_USAGE and "usage" in r.stderr
