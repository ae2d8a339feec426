"""``gpulane serve`` as a real process: restart with queued work, the CLI, one owner per dir."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import free_port

REPO = Path(__file__).resolve().parents[2]
SLOW_PRESET = """
presets:
  - name: slow
    argv: [python, {worker}]
    devices: [cpu]
    timeout_s: 30
"""


def _gpulane(*args: str, env: dict[str, str] | None = None,
             input_text: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gpulane", *args], capture_output=True,
                          text=True, timeout=60, env={**os.environ, **(env or {})},
                          input=input_text)


class Server:
    def __init__(self, data_dir: Path, *extra: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.args = ["--data-dir", str(data_dir), "--port", str(self.port),
                     "--simulate-gpus", "2x24GiB", "--cpu-concurrency", "1", *extra]
        self.proc: subprocess.Popen[str] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "gpulane", "serve", *self.args],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, start_new_session=True)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"serve exited: {self.proc.stdout.read()}")  # type: ignore[union-attr]
            try:
                if httpx.get(f"{self.url}/readyz", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise AssertionError("serve did not become ready in 30s")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            self.proc.wait(15)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    s = Server(tmp_path / "data")
    s.start()
    yield s
    s.kill(signal.SIGTERM)


def test_restart_with_queued_tasks_runs_them(tmp_path: Path) -> None:
    worker = REPO / "tests" / "integration" / "workers" / "behave.py"
    presets = tmp_path / "slow.yaml"
    presets.write_text(SLOW_PRESET.format(worker=worker))
    srv = Server(tmp_path / "data", "--presets", str(presets))
    srv.start()
    try:
        body = {"tasks": [{"preset": "slow", "input": {"action": "slow", "s": 0.5}}
                          for _ in range(4)]}
        ids = [t["id"] for t in httpx.post(f"{srv.url}/v1/tasks/bulk", json=body).json()["tasks"]]
        deadline = time.monotonic() + 10
        while httpx.get(f"{srv.url}/v1/tasks/{ids[0]}").json()["state"] != "running":
            assert time.monotonic() < deadline
            time.sleep(0.02)
        srv.kill(signal.SIGKILL)  # a crash: one task running, three queued
        # Workers die with their node (PR_SET_PDEATHSIG); the restart requeues the running one.
        srv.start()
        for tid in ids:
            task = httpx.get(f"{srv.url}/v1/tasks/{tid}/result", params={"wait": 20},
                             timeout=30).json()
            assert task["state"] == "succeeded", task
        first = httpx.get(f"{srv.url}/v1/tasks/{ids[0]}").json()
        # It was running when the node died: it ran twice, but the restart gave back the
        # attempt it held (a restart is not the task's fault).
        assert first["attempts"] == 1
        events = httpx.get(f"{srv.url}/v1/tasks/{ids[0]}/events", timeout=10).text
        assert events.count('"state":"running"') == 2
    finally:
        srv.kill(signal.SIGTERM)


def test_second_node_on_the_same_data_dir_refuses_to_start(server: Server,
                                                           tmp_path: Path) -> None:
    other = _gpulane("serve", "--data-dir", str(tmp_path / "data"), "--port",
                     str(free_port()))
    assert other.returncode != 0
    assert server.proc is not None
    assert f"pid {server.proc.pid}" in other.stdout + other.stderr


def test_cli_run_streams_and_exits_zero(server: Server) -> None:
    r = _gpulane("run", "echo-stream", "--input", '{"text": "hello cli world"}',
                 env={"GPULANE_URL": server.url})
    assert r.returncode == 0, r.stderr
    assert "hello cli world" in r.stdout


def test_cli_run_failure_exits_non_zero(server: Server) -> None:
    r = _gpulane("run", "sleep", "--input", '{"ms": "x"}', "--url", server.url)
    assert r.returncode == 1
    assert "bad_input" in r.stderr


def test_cli_run_input_from_file_and_no_wait(server: Server, tmp_path: Path) -> None:
    f = tmp_path / "in.json"
    f.write_text(json.dumps({"ms": 1}))
    r = _gpulane("run", "sleep", "--input", f"@{f}", "--no-wait", "--url", server.url)
    assert r.returncode == 0 and len(r.stdout.strip()) == 24


def test_cli_tasks_and_gpus(server: Server) -> None:
    _gpulane("run", "sleep", "--input", '{"ms": 0}', "--url", server.url)
    tasks = _gpulane("tasks", "--json", "--url", server.url)
    assert tasks.returncode == 0 and "sleep" in tasks.stdout
    gpus = _gpulane("gpus", "--url", server.url)
    assert gpus.returncode == 0 and "simulated" in gpus.stdout.lower()


def test_cli_unreachable_server_exits_3() -> None:
    r = _gpulane("tasks", "--url", f"http://127.0.0.1:{free_port()}")
    assert r.returncode == 3 and "cannot reach gpulane" in r.stderr


def test_presets_check_reports_file_and_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("presets:\n  - name: x\n    argv: [python, w.py]\n    vram_mb: -5\n"
                   "    moed: session\n")
    r = _gpulane("presets", "check", str(bad))
    assert r.returncode == 1
    assert f"{bad}:4:" in r.stderr and f"{bad}:5:" in r.stderr
    assert "mode" in r.stderr  # the did-you-mean for 'moed'
    ok = _gpulane("presets", "check", str(REPO / "examples" / "presets"))
    # One preset each, but routes.yaml: it holds only the example content-type routes.
    shipped = len([f for f in (REPO / "examples" / "presets").glob("*.yaml")
                   if f.name != "routes.yaml"])
    assert ok.returncode == 0 and f"{shipped} preset(s)" in ok.stdout


def test_presets_check_routes_with_and_without_the_examples(tmp_path: Path) -> None:
    """A user's image/* route overrides the examples' (no duplicate), and --no-examples checks
    the routes as serve --no-examples loads them: faces is then unknown."""
    mine = tmp_path / "mine.yaml"
    mine.write_text("presets:\n  - {name: pics, argv: [x], accepts: [image/*]}\n"
                    "routes:\n  image/*: pics\n  image/gif: faces\n")
    r = _gpulane("presets", "check", str(mine))
    assert r.returncode == 0, r.stderr
    r = _gpulane("presets", "check", "--no-examples", str(mine))
    assert r.returncode == 1 and f"{mine}:5: route 'image/gif': preset 'faces' is not known" \
        in r.stderr


def test_exec_runs_the_command_under_a_lease(server: Server) -> None:
    code = "import os, sys; print('cvd=' + os.environ['CUDA_VISIBLE_DEVICES']); sys.exit(7)"
    r = _gpulane("exec", "--vram", "1GiB", "--url", server.url, "--", sys.executable, "-c",
                 code)
    assert r.returncode == 7, r.stderr
    assert "cvd=0" in r.stdout or "cvd=1" in r.stdout
    leases = httpx.get(f"{server.url}/v1/leases").json()["leases"]
    assert leases == []  # released on exit


def test_exec_stops_the_command_when_preempted(server: Server) -> None:
    code = "import time\nwhile True: time.sleep(0.05)"
    proc = subprocess.Popen(
        [sys.executable, "-m", "gpulane", "exec", "--gpus", "2", "--priority", "background",
         "--grace-s", "0.5", "--url", server.url, "--", sys.executable, "-c", code],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 20
    while not httpx.get(f"{server.url}/v1/leases").json()["leases"]:
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.05)
    urgent = httpx.post(f"{server.url}/v1/leases", timeout=30, json={
        "holder": "urgent", "vram_mb": 1024, "priority": "immediate", "wait_s": 20})
    assert urgent.status_code == 201, urgent.text
    proc.wait(20)
    assert proc.returncode != 0  # the command was terminated
    assert "preempted" in proc.stderr.read()  # type: ignore[union-attr]


def test_exec_without_a_size_is_a_usage_error() -> None:
    r = _gpulane("exec", "--", "true")
    assert r.returncode == 2 and "--vram" in r.stderr
