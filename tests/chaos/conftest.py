"""A real ``gpulane serve`` process (killable, restartable) and the fault proxy before it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import httpx
import pytest

from gpulane.client.resilience import REGISTRY
from tests.chaos.proxy import FaultProxy
from tests.conftest import free_port

READY_TIMEOUT_S = 30.0


class ServerProcess:
    """``gpulane serve`` on a fixed port and data dir, in its own process group (so a kill
    takes its workers too), restartable on the same port and data dir."""

    def __init__(self, data_dir: Path, log_path: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.data_dir = data_dir
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def start(self) -> None:
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in kill()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gpulane", "serve", "--data-dir", str(self.data_dir),
             "--port", str(self.port), "--simulate-gpus", "2x24GiB", "--log-level", "warning"],
            stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True)
        self.wait_ready()

    def wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"gpulane serve exited:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"gpulane serve not ready in {READY_TIMEOUT_S}s:\n{self.log_tail()}")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                pass
            self.proc.wait(15)
        if self._log is not None:
            self._log.close()
            self._log = None

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    srv = ServerProcess(tmp_path / "data", tmp_path / "serve.log")
    srv.start()
    try:
        yield srv
    finally:
        srv.kill(signal.SIGTERM)
        srv.kill()


@pytest.fixture(autouse=True)
def _fresh_breakers() -> Iterator[None]:
    REGISTRY.clear()
    yield
    REGISTRY.clear()


def proxy_for(server: ServerProcess, **faults: float) -> FaultProxy:
    return FaultProxy(server.port, **faults)
