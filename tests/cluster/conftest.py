"""A fleet on loopback: a redis-server of its own and N real ``gpulane serve`` processes.

Each node is ``gpulane serve --store redis://127.0.0.1:PORT/0 --node-name nX --simulate-gpus
1x24GiB --data-dir DIR --port FREE --advertise-url URL`` with the presets of
tests/cluster/presets and a short node TTL (GPULANE_NODE_TTL_S), so that a killed node is
taken over in seconds. Every process
runs in a session of its own; teardown ends each node's process group and then, by pid, the
workers it had started (they run in process groups of their own), and the redis-server,
however the test ended.

The redis-server writes an append-only file with ``appendfsync always`` into the cluster's
folder, so a test may kill it with -9 and start it again on the same port without losing an
acknowledged write.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any, TypeVar

import httpx
import pytest

from tests.conftest import RedisProcess, free_port

T = TypeVar("T")

PRESETS = Path(__file__).resolve().parent / "presets"
"""The cluster's test presets (csleep, cstream), added to the examples on every node."""
READY_TIMEOUT_S = 60.0
"""How long a node (or the redis-server) may take to answer; several start at once on a
small, shared machine."""
NODE_TTL_S = 2.0
"""The nodes' heartbeat TTL: a killed node is dead for the others after this long."""
STOP_GRACE_S = 10.0
"""How long a node has to exit after SIGTERM at teardown before it is killed."""



def poll(check: Callable[[], T | None], timeout: float, what: str,
         interval: float = 0.05) -> T:
    """Call ``check`` until it returns something truthy, or fail at the deadline. A transport
    error counts as "not yet" (a node or the store may be restarting)."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            last = check()
            if last:
                return last
        except httpx.TransportError as exc:
            last = exc
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what}: not within {timeout}s; last: {last!r}")
        time.sleep(interval)


def _descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (workers run in process groups of their own, so a
    group kill misses them)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


BIND_FAILED = "address already in use"
"""What uvicorn logs when the node's port was taken before it could bind it."""


class NodeExited(Exception):
    """The node process ended before it was ready."""


class Node:
    """One ``gpulane serve`` of the fleet, with its own data dir, port and log."""

    def __init__(self, name: str, store_url: str, workdir: Path, *extra: str,
                 env: dict[str, str] | None = None) -> None:
        self.name = name
        self.log_path = workdir / f"{name}.log"
        self.argv = [sys.executable, "-m", "gpulane", "serve", "--store", store_url,
                     "--node-name", name, "--data-dir", str(workdir / name),
                     "--simulate-gpus", "1x24GiB", "--presets", str(PRESETS),
                     "--log-level", "warning", *extra]
        # The node's TTL from the environment: a setting with no flag.
        self.env = {**os.environ, "GPULANE_NODE_TTL_S": str(NODE_TTL_S), **(env or {})}
        self.port = 0
        self.url = ""
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._workers: set[int] = set()
        self._bind_failures = 0

    def spawn(self) -> None:
        """Start the node on a free port (picked now: a restart gets a fresh one)."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        if self._log is None:
            self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self._bind_failures = self.log_path.read_text(errors="replace").count(BIND_FAILED)
        self.proc = subprocess.Popen(
            [*self.argv, "--port", str(self.port), "--advertise-url", self.url], env=self.env,
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
            start_new_session=True)

    def wait_ready(self, tries: int = 3) -> None:
        """Until /readyz answers 200. A free port taken by another process between its pick
        and the bind (other test runs share the machine) is picked again."""
        def ready() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise NodeExited(self.name)
            return httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200

        try:
            poll(ready, READY_TIMEOUT_S, f"node {self.name} /readyz")
        except NodeExited:
            log = self.log_path.read_text(errors="replace")
            if tries > 1 and log.count(BIND_FAILED) > self._bind_failures:
                self.spawn()
                self.wait_ready(tries - 1)
                return
            raise AssertionError(f"node {self.name} exited:\n{self.log_tail()}") from None
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.log_tail()}") from None

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def note_workers(self) -> None:
        """Remember the node's worker pids, so that teardown can end them by pid even when
        the node is gone (they die with it, PR_SET_PDEATHSIG; this is the belt to that)."""
        if self.proc is not None:
            self._workers.update(_descendants(self.proc.pid))

    def kill(self) -> None:
        """kill -9 the node process alone: its workers must die with it on their own."""
        self.note_workers()
        if self.alive:
            assert self.proc is not None
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(15)

    def stop(self) -> None:
        """SIGTERM the node's group, SIGKILL it after a grace, then any worker left."""
        self.note_workers()
        if self.proc is not None:
            if self.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(STOP_GRACE_S)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(5)
        for pid in self._workers:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        self._workers.clear()
        if self._log is not None:
            self._log.close()
            self._log = None

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return f"(no log for {self.name})"
        return f"--- {self.name} log ---\n" + "\n".join(text.splitlines()[-lines:])

    def client(self, timeout: float = 30.0) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=timeout)


class Cluster:
    """A redis-server and the fleet's nodes, each reachable by name."""

    def __init__(self, workdir: Path, env: dict[str, str] | None = None) -> None:
        self.workdir = workdir
        self.env = env or {}
        """Settings every node gets from its environment (GPULANE_...)."""
        (workdir / "redis").mkdir(parents=True, exist_ok=True)
        self.redis = RedisProcess(workdir / "redis")
        self.nodes: dict[str, Node] = {}

    def start(self, count: int, *extra: str) -> Cluster:
        self.redis.start(READY_TIMEOUT_S)
        self.add(*(f"n{i + 1}" for i in range(count)), extra=extra)
        return self

    def add(self, *names: str, extra: tuple[str, ...] = ()) -> list[Node]:
        """Start nodes (all at once, then wait for each) and wait until every live node is
        in the fleet's registry."""
        fresh = [Node(name, self.redis.url, self.workdir, *extra, env=self.env)
                 for name in names]
        for node in fresh:
            self.nodes[node.name] = node
            node.spawn()
        for node in fresh:
            node.wait_ready()
        self.wait_fleet()
        return fresh

    def live(self) -> list[Node]:
        return [n for n in self.nodes.values() if n.alive]

    def names_in_fleet(self, via: Node) -> set[str]:
        with via.client(5) as http:
            return {n["name"] for n in http.get("/v1/nodes").json()["nodes"]}

    def wait_fleet(self) -> None:
        """Until every live node lists every live node (a dead one has left after its TTL)."""
        want = {n.name for n in self.live()}
        for node in self.live():
            poll(lambda node=node: self.names_in_fleet(node) == want,  # type: ignore[misc]
                 READY_TIMEOUT_S, f"{node.name} to see the fleet {sorted(want)}")

    def __getitem__(self, name: str) -> Node:
        return self.nodes[name]

    def stop(self) -> None:
        for node in self.nodes.values():
            try:
                node.stop()
            except Exception as exc:  # keep stopping the others
                print(f"stopping {node.name} failed: {exc!r}", file=sys.stderr)
        self.redis.kill()

    def logs(self) -> str:
        return "\n".join(n.log_tail() for n in self.nodes.values())


@contextlib.contextmanager
def running_cluster(workdir: Path, count: int, *extra: str,
                    env: dict[str, str] | None = None) -> Iterator[Cluster]:
    cluster = Cluster(workdir, env)
    try:
        yield cluster.start(count, *extra)
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """Three nodes, n1 to n3, shared by the tests of one module."""
    with running_cluster(tmp_path_factory.mktemp("cluster"), 3) as c:
        yield c


# --- what the tests do through the API -----------------------------------------------------


FINAL = frozenset({"succeeded", "failed", "cancelled"})
"""A task in one of these states is done."""


def submit_acked(http: httpx.Client, body: dict[str, Any], key: str,
                 give_up_s: float = 60.0) -> dict[str, Any]:
    """POST /v1/tasks until a 202 (a retry carries the same Idempotency-Key, so it is safe):
    503s (the store is unreachable) and transport errors are retried after a short pause."""
    deadline = time.monotonic() + give_up_s
    while True:
        try:
            r = http.post("/v1/tasks", json=body, headers={"Idempotency-Key": key})
            if r.status_code == 202:
                task: dict[str, Any] = r.json()
                return task
            assert r.status_code in (429, 503), r.text
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, f"submit {key} not acknowledged in {give_up_s}s"
        time.sleep(0.05)


def final_task(http: httpx.Client, task_id: str, timeout: float = 60.0) -> dict[str, Any]:
    """The task once it is final (long-polls; retried across a restarting store)."""
    def final() -> dict[str, Any] | None:
        r = http.get(f"/v1/tasks/{task_id}/result", params={"wait": 10}, timeout=20)
        if r.status_code != 200:
            return None
        task: dict[str, Any] = r.json()
        return task if task["state"] in FINAL else None

    return poll(final, timeout, f"task {task_id} final")


def tasks_in(http: httpx.Client, state: str, preset: str | None = None) -> list[dict[str, Any]]:
    params: dict[str, Any] = {"state": state, "limit": 1000}
    if preset is not None:
        params["preset"] = preset
    tasks: list[dict[str, Any]] = http.get("/v1/tasks", params=params).json()["tasks"]
    return tasks
