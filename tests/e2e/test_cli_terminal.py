"""`gpulane top` and `gpulane run`'s progress bar on a real pseudo-terminal, against a real
`gpulane serve`: top draws its screen, shows the server going away, and exits 0 on Ctrl-C
with the terminal given back; run draws a bar from a worker's progress events."""

from __future__ import annotations

import fcntl
import os
import pty
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.test_serve_cli import Server

STEPS_PRESET = """
presets:
  - name: steps
    argv: [python, {worker}]
    devices: [cpu]
    timeout_s: 30
"""
STEPS_WORKER = """
import json, sys
def emit(obj):
    sys.stdout.write(json.dumps(obj) + "\\n"); sys.stdout.flush()
emit({"event": "connection", "status": "connected", "protocol": 1})
emit({"event": "worker", "status": "ready"})
for line in sys.stdin:
    op = json.loads(line)
    for item in op.get("tasks") or []:
        n = item["input"]["n"]
        for i in range(n):
            emit({"event": "progress", "task": item["task"], "done": i + 1, "total": n,
                  "message": "counting"})
        emit({"event": "result", "task": item["task"], "output": {"steps": n}})
        emit({"event": "finish", "task": item["task"], "status": "completed"})
"""


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Terminal:
    """A gpulane command on a 120x40 pseudo-terminal, its output read as it comes."""

    def __init__(self, *args: str) -> None:
        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
        env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": "120", "LINES": "40"}
        env.pop("GPULANE_TOKEN", None)
        # Ctrl-C as a terminal's user gives it: a test run started in the background (nohup,
        # `cmd &` in a script) ignores SIGINT, the child inherits that, and Python then never
        # turns SIGINT into KeyboardInterrupt.
        self.proc = subprocess.Popen([sys.executable, "-m", "gpulane", *args], stdin=slave,
                                     stdout=slave, stderr=slave, env=env, close_fds=True,
                                     preexec_fn=_default_sigint)
        os.close(slave)
        self.master = master
        self.output = ""

    def read_until(self, marker: str, timeout: float = 30) -> None:
        """Read until ``marker`` has been written, or fail with what was."""
        deadline = time.monotonic() + timeout
        while marker not in self.output:
            left = deadline - time.monotonic()
            assert left > 0, f"no {marker!r} in {self.output[-2000:]!r}"
            if select.select([self.master], [], [], min(left, 0.5))[0]:
                try:
                    chunk = os.read(self.master, 65536)
                except OSError:  # the command exited and closed the terminal
                    chunk = b""
                if not chunk and self.proc.poll() is not None:
                    assert marker in self.output, f"exited; no {marker!r} in {self.output!r}"
                self.output += chunk.decode(errors="replace")

    def finish(self, timeout: float = 30) -> int:
        """Wait for the exit, reading what is left; the exit code."""
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None or select.select([self.master], [], [], 0)[0]:
            assert time.monotonic() < deadline, self.output[-2000:]
            if select.select([self.master], [], [], 0.2)[0]:
                try:
                    chunk = os.read(self.master, 65536)
                except OSError:
                    break
                if not chunk:
                    break
                self.output += chunk.decode(errors="replace")
        return self.proc.wait(timeout)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        os.close(self.master)


@pytest.fixture
def steps_server(tmp_path: Path) -> Iterator[Server]:
    worker = tmp_path / "steps.py"
    worker.write_text(STEPS_WORKER)
    (tmp_path / "steps.yaml").write_text(STEPS_PRESET.format(worker=worker))
    s = Server(tmp_path / "data", "--presets", str(tmp_path / "steps.yaml"))
    s.start()
    yield s
    s.kill(signal.SIGTERM)


def test_top_draws_a_screen_sees_the_server_go_and_quits_on_ctrl_c(
        steps_server: Server) -> None:
    term = Terminal("top", "--interval", "0.2", "--url", steps_server.url)
    try:
        term.read_until("\x1b[?1049h")  # the alternate screen, as nvitop and htop use
        term.read_until("Simulated GPU")
        term.read_until("taking tasks")
        steps_server.kill()
        term.read_until("server gone")
        term.proc.send_signal(signal.SIGINT)
        assert term.finish() == 0
        assert term.output.rstrip().endswith("\x1b[?1049l")  # the terminal given back
        assert "Traceback" not in term.output
    finally:
        term.close()


def test_run_draws_a_progress_bar_on_a_terminal(steps_server: Server) -> None:
    term = Terminal("run", "steps", "--input", '{"n": 5}', "--url", steps_server.url)
    try:
        term.read_until('"steps": 5')
        assert term.finish() == 0
        assert "━" in term.output and "100%" in term.output and "5/5" in term.output
        assert "counting" in term.output
        assert "· progress" not in term.output  # the bar, not plain lines
    finally:
        term.close()
