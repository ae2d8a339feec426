"""The sync Client's pipelined submitter against a scripted server: how enqueued and
concurrent run()/submit() calls are gathered into bulks, and how each caller still gets its own
answer (its task, its TaskFailedError, its 4xx, its timeout)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Any

import httpx
import pytest

from gpulane.client import Client
from gpulane.client.pipeline_collect import TaskFuture
from gpulane.errors import APIError, ClientError, TaskFailedError, TransportError

JSON = dict[str, Any]


def until(check: Callable[[], object], timeout: float = 10.0) -> None:
    """Poll a condition another thread makes true, or fail at the deadline."""
    done = threading.Event()
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        done.wait(0.005)


class FakeNode:
    """A scripted gpulane: submits (single and bulk) and results polls, all in memory.

    A task's state is set by ``ends`` (input n -> final state) once it is "run" by
    :meth:`finish`; ``hold`` makes single submits wait until released (so others queue)."""

    def __init__(self, ends: Callable[[int], str | None] = lambda n: "succeeded") -> None:
        self.ends = ends
        self.sent: list[str] = []
        self.bulks: list[list[int]] = []
        self.tasks: dict[str, JSON] = {}
        self.keys: dict[str, str] = {}
        self.lock = threading.Lock()
        self.hold = threading.Event()
        self.hold.set()
        self.held = threading.Event()  # a held single submit has arrived
        self.changed = threading.Condition(self.lock)

    def client(self, **kwargs: Any) -> Client:
        return Client("http://gl.test", transport=httpx.MockTransport(self.handle), retry=None,
                      breaker=None, budget=None, **kwargs)

    def make(self, body: JSON, key: str) -> JSON:
        with self.lock:
            if key in self.keys:
                return self.tasks[self.keys[key]]
            n = int(body["input"]["n"])
            state = self.ends(n)
            task: JSON = {"id": f"t{n}", "state": state or "queued", "output": n,
                    "error": None if state != "failed" else {"message": "boom"}}
            self.tasks[task["id"]] = task
            self.keys[key] = task["id"]
            return task

    def finish(self, n: int, state: str = "succeeded") -> None:
        with self.changed:
            self.tasks[f"t{n}"]["state"] = state
            self.changed.notify_all()

    @staticmethod
    def refuse(n: int, i: int | None) -> httpx.Response:
        field = "input.n" if i is None else f"tasks[{i}].input.n"
        return httpx.Response(422, json={"error": {"code": "bad_input", "field": field,
                                                   "message": f"n={n} is refused"}})

    def handle(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        self.sent.append(f"{request.method} {path}")
        if request.method == "GET" and path.startswith("/v1/tasks/"):
            return httpx.Response(200, json=self.tasks[path.rsplit("/", 1)[1]])
        body = json.loads(request.content)
        if path == "/v1/tasks":
            self.held.set()
            self.hold.wait(5)
            if body["input"]["n"] < 0:
                return self.refuse(body["input"]["n"], None)
            return httpx.Response(202, json=self.make(body, request.headers["Idempotency-Key"]))
        if path == "/v1/tasks/bulk":
            ns = [int(t["input"]["n"]) for t in body["tasks"]]
            self.bulks.append(ns)
            for i, n in enumerate(ns):
                if n < 0:
                    return self.refuse(n, i)
            made = [self.make(t, t["idempotency_key"]) for t in body["tasks"]]
            return httpx.Response(202, json={"tasks": made})
        if path == "/v1/tasks/results":
            with self.changed:  # held until one ends, as the real route (briefly here)
                if not any(self.tasks[i]["state"] in ("succeeded", "failed")
                           for i in body["ids"] if i in self.tasks):
                    self.changed.wait(0.05)
                done = [self.tasks[i] for i in body["ids"]
                        if i in self.tasks and self.tasks[i]["state"] != "queued"]
                return httpx.Response(200, json={
                    "tasks": done, "missing": [i for i in body["ids"] if i not in self.tasks],
                    "pending": [i for i in body["ids"]
                                if i in self.tasks and self.tasks[i]["state"] == "queued"]})
        return httpx.Response(404, json={"error": {"code": "not_found", "message": path}})


def test_enqueued_calls_share_a_bulk_in_order_and_end_in_shared_polls() -> None:
    node = FakeNode(lambda n: "failed" if n == 3 else "succeeded")
    with node.client() as client:
        futures = [client.enqueue("sleep", {"n": n}) for n in range(10)]
        assert client.flush(timeout=5)
        assert all(f.acknowledged() for f in futures)
        assert [f.id for f in futures] == [f"t{n}" for n in range(10)]
        assert [n for bulk in node.bulks for n in bulk] == list(range(10))
        assert len(node.bulks) < 10 and "POST /v1/tasks" not in node.sent
        assert [f.result(5)["output"] for f in futures if f.id != "t3"] == [
            n for n in range(10) if n != 3]
        with pytest.raises(TaskFailedError):
            futures[3].result(5)
        assert isinstance(futures[0], TaskFuture) and not futures[0].cancel()


def test_queued_tasks_are_collected_by_results_polls_and_task_shows_them_as_they_stand() -> None:
    node = FakeNode(lambda n: None)  # every task stays queued until finished here
    with node.client() as client:
        futures = [client.enqueue("sleep", {"n": n}) for n in range(3)]
        assert futures[1].task(5)["state"] == "queued"
        with pytest.raises(TimeoutError):
            futures[1].result(timeout=0.01)
        node.finish(1)
        assert futures[1].result(5)["state"] == "succeeded"
        assert futures[1].task()["state"] == "succeeded"
        node.finish(0, "cancelled")
        node.finish(2)
        with pytest.raises(TaskFailedError):
            futures[0].result(5)
        assert futures[2].result(5)["output"] == 2
        assert "POST /v1/tasks/results" in node.sent


def test_one_bad_item_gets_its_own_error_and_the_others_their_tasks() -> None:
    node = FakeNode()
    with node.client() as client:
        futures = [client.enqueue("sleep", {"n": n}) for n in (0, 1, -2, 3)]
        client.flush(timeout=5)
        with pytest.raises(APIError) as refused:
            _ = futures[2].id
        assert refused.value.status == 422 and refused.value.field == "input.n"
        assert "n=-2" in str(refused.value) and not futures[2].acknowledged()
        with pytest.raises(APIError):
            futures[2].result(5)
        assert [futures[i].result(5)["output"] for i in (0, 1, 3)] == [0, 1, 3]
        # The bulk was refused once; no task was made twice (one key per item).
        assert sorted(node.tasks) == ["t0", "t1", "t3"]


def test_a_bulk_with_no_answer_fails_each_future_with_the_transport_error() -> None:
    def down(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    with Client("http://gl.test", transport=httpx.MockTransport(down), retry=None,
                breaker=None, budget=None) as client:
        futures = [client.enqueue("sleep", {"n": n}) for n in range(3)]
        assert client.flush(timeout=5)
        for future in futures:
            assert not future.acknowledged()
            with pytest.raises(TransportError):
                future.result(5)


def test_a_future_is_awaited_from_another_thread() -> None:
    node = FakeNode()
    with node.client() as client, ThreadPoolExecutor(4) as pool:
        futures = list(pool.map(lambda n: client.enqueue("sleep", {"n": n}), range(20)))
        done, _ = wait(futures, timeout=5)
        assert len(done) == 20
        assert sorted(f.result()["output"] for f in futures) == list(range(20))


def test_close_while_pending_flushes_then_ends_what_is_left_with_an_error() -> None:
    node = FakeNode(lambda n: None)
    client = node.client()
    futures = [client.enqueue("sleep", {"n": n}) for n in range(5)]
    client.close()
    assert all(f.acknowledged() for f in futures)  # close flushed them
    for future in futures:
        with pytest.raises(ClientError, match="closed"):
            future.result(5)
    with pytest.raises(ClientError, match="closed"):
        _ = client.enqueue("sleep", {"n": 9}).id
    until(lambda: not [t for t in threading.enumerate()
                            if t.name.startswith("gpulane-") and t.is_alive()])


def test_a_lone_caller_goes_out_alone_and_concurrent_ones_share_a_bulk() -> None:
    node = FakeNode(lambda n: "failed" if n == 5 else "succeeded")
    with node.client() as client:
        for n in range(3):  # a sequential loop: plain submits, never a bulk
            assert client.run("sleep", {"n": n})["output"] == n
        assert node.sent.count("POST /v1/tasks") == 3 and not node.bulks
        node.hold.clear()
        node.held.clear()
        with ThreadPoolExecutor(9) as pool:
            first = pool.submit(client.run, "sleep", {"n": 10})
            assert node.held.wait(5)  # the first caller is in flight: the rest queue

            def one(n: int) -> JSON | ClientError:
                try:
                    return client.run("sleep", {"n": n}) if n % 2 else client.submit(
                        "sleep", {"n": n})
                except ClientError as exc:
                    return exc

            rest = [pool.submit(one, n) for n in (11, 12, 13, 14, 5, -6, 17)]
            until(lambda: sum(len(b) for b in node.bulks) >= 1)
            node.hold.set()
            answers = [f.result(5) for f in rest]
        assert first.result()["output"] == 10
        for n, answer in zip((11, 12, 13, 14, 5, -6, 17), answers, strict=True):
            if n == 5:
                assert isinstance(answer, TaskFailedError)
            elif n == -6:
                assert isinstance(answer, APIError) and answer.field == "input.n"
            else:
                assert isinstance(answer, dict) and answer["output"] == n
        assert node.bulks and all(len(set(b)) == len(b) for b in node.bulks)


def test_a_queued_run_past_its_timeout_gets_its_task_as_it_stands() -> None:
    node = FakeNode(lambda n: None if n == 2 else "succeeded")
    with node.client() as client:
        node.hold.clear()
        node.held.clear()
        with ThreadPoolExecutor(3) as pool:
            first = pool.submit(client.run, "sleep", {"n": 1})
            assert node.held.wait(5)
            late = pool.submit(client.run, "sleep", {"n": 2}, timeout=0.05)
            until(lambda: node.sent.count("POST /v1/tasks") >= 2)
            node.hold.set()
            assert late.result(5)["state"] == "queued"
            assert first.result(5)["state"] == "succeeded"


def test_coalesce_false_sends_every_call_alone() -> None:
    node = FakeNode()
    with node.client(coalesce=False) as client, ThreadPoolExecutor(8) as pool:
        outs = list(pool.map(lambda n: client.run("sleep", {"n": n}), range(16)))
    assert [o["output"] for o in outs] == list(range(16)) and not node.bulks


def test_a_future_not_yet_acknowledged_times_out_and_then_gets_its_id() -> None:
    node = FakeNode()
    with node.client() as client:
        node.hold.clear()
        node.held.clear()
        future = client.enqueue("sleep", {"n": 1})  # alone: sent as one plain submit
        assert node.held.wait(5)
        with pytest.raises(TimeoutError):
            future.task(timeout=0.01)
        with pytest.raises(TimeoutError):
            future.result(timeout=0.01)
        assert not future.acknowledged() and not client.flush(timeout=0.01)
        node.hold.set()
        assert future.id == "t1" and client.flush(timeout=5)
        assert future.result(5)["output"] == 1
