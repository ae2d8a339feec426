"""``gpulane serve`` on a Redis store as a real process: SIGTERM drains it and it exits 0 with
its running task requeued unspent and its name gone from the fleet; a Redis that does not
answer, or a malformed --store, is one line and exit code 2."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import httpx
import pytest

from gpulane.fleet import open_fleet
from gpulane.model import TaskState
from gpulane.store import open_store
from tests.conftest import free_port
from tests.e2e.test_serve_cli import Server, _gpulane


def _wait_state(url: str, task_id: str, state: str) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if httpx.get(f"{url}/v1/tasks/{task_id}", timeout=5).json()["state"] == state:
            return
        time.sleep(0.05)
    raise AssertionError(f"task {task_id} did not become {state} within 30 s")


def test_sigterm_drains_requeues_and_exits_0(tmp_path: Path, redis_url: str,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPULANE_DRAIN_GRACE_S", "0.5")  # the task below outlives it
    monkeypatch.setenv("GPULANE_WORKER_STOP_GRACE_S", "0.5")
    srv = Server(tmp_path / "data", "--store", redis_url, "--node-name", "term-a",
                 "--advertise-url", "http://term-a.example:1")
    srv.start()
    try:
        nodes = httpx.get(f"{srv.url}/v1/nodes", timeout=5).json()["nodes"]
        assert [(n["name"], n["url"]) for n in nodes] == [("term-a", "http://term-a.example:1")]
        r = httpx.post(f"{srv.url}/v1/tasks", json={"preset": "sleep", "input": {"ms": 60_000}},
                       timeout=5)
        task_id = r.json()["id"]
        _wait_state(srv.url, task_id, "running")
        assert srv.proc is not None
        srv.proc.send_signal(signal.SIGTERM)
        assert srv.proc.wait(30) == 0, srv.proc.stdout.read()  # type: ignore[union-attr]
    finally:
        srv.kill()
    task, names = asyncio.run(_after(redis_url, task_id))
    assert task is not None and task.state is TaskState.QUEUED and task.attempts == 0
    assert names == []


async def _after(redis_url: str, task_id: str) -> tuple[object, list[str]]:
    store = open_store(redis_url)
    fleet = open_fleet(redis_url, "reader")
    await store.open()
    await fleet.open()
    try:
        return await store.get(task_id), [n.name for n in await fleet.nodes()]
    finally:
        await fleet.close()
        await store.close()


@pytest.mark.parametrize(("store", "says"), [
    ("redis://127.0.0.1:{port}/0", "does not answer"),
    ("redis://127.0.0.1:notaport/0", "is not a Redis URL"),
    ("redis://127.0.0.1:6379/zero", "must be a number"),
])
def test_a_store_that_cannot_serve_is_one_line_and_exit_2(tmp_path: Path, store: str,
                                                           says: str) -> None:
    url = store.format(port=free_port())
    r = _gpulane("serve", "--data-dir", str(tmp_path / "d"), "--port", str(free_port()),
                 "--store", url)
    assert r.returncode == 2, r.stderr
    [line] = r.stderr.strip().splitlines()
    assert line.startswith("gpulane serve: --store") and says in line, line
