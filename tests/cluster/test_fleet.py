"""Three nodes on one Redis, served by real ``gpulane serve`` processes: work submitted to one
node spreads over all, a task's events stream through any node, and leases on one node's GPU
are asked, preempted and released through the others."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import httpx

from tests.cluster.conftest import (
    FINAL,
    Cluster,
    Node,
    final_task,
    poll,
    tasks_in,
)

WORKERS_PER_NODE = 2
"""csleep's replicas on each node's one simulated GPU (tests/cluster/presets)."""


def _ready_csleep_workers(node: Node) -> int:
    with node.client(5) as http:
        workers = http.get("/v1/workers").json()["workers"]
    return sum(w["preset"] == "csleep" and w["state"] in ("ready", "busy") for w in workers)


def _warm(cluster: Cluster, via: Node) -> None:
    """Until every node has its csleep workers up: the spread then measures placement, not
    worker start-ups (a cold node leaves work to warm ones for the warm window)."""
    def warm() -> bool:
        with via.client() as http:
            ids = [t["id"] for t in http.post("/v1/tasks/bulk", json={"tasks": [
                {"preset": "csleep", "input": {"ms": 200}}
                for _ in range(3 * WORKERS_PER_NODE * 2)]}).json()["tasks"]]
            for task_id in ids:
                final_task(http, task_id)
        return all(_ready_csleep_workers(n) == WORKERS_PER_NODE for n in cluster.live())

    poll(warm, 60, "every node with its csleep workers up", interval=0)


def test_a_backlog_submitted_to_one_node_spreads_over_all(cluster: Cluster) -> None:
    n1 = cluster["n1"]
    _warm(cluster, n1)
    count = 3 * WORKERS_PER_NODE * 6
    samples: list[tuple[int, Counter[str]]] = []
    with n1.client() as http:
        ids = [t["id"] for t in http.post("/v1/tasks/bulk", json={"tasks": [
            {"preset": "csleep", "input": {"ms": 300}} for _ in range(count)]}).json()["tasks"]]
        # While a backlog is left that any node could start, which nodes run something?
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            queued = len(tasks_in(http, "queued", "csleep"))
            running = Counter(t["placement"]["node"]
                              for t in tasks_in(http, "running", "csleep"))
            if queued < 3 * WORKERS_PER_NODE:
                break
            samples.append((queued, running))
        done = [final_task(http, task_id) for task_id in ids]
    assert all(t["state"] == "succeeded" for t in done), [t for t in done
                                                           if t["state"] != "succeeded"]
    ran = Counter(t["placement"]["node"] for t in done)
    assert set(ran) == {"n1", "n2", "n3"}, ran
    # An even share is a third each; a node that sat out part of the backlog would fall far
    # below it.
    assert min(ran.values()) >= count // 6, ran
    idle = [(q, dict(r)) for q, r in samples if set(r) != {"n1", "n2", "n3"}]
    assert len(idle) <= max(1, len(samples) // 10), (idle, len(samples))


SseEvent = tuple[int, str, dict[str, Any]]
"""One Server-Sent Event: its id, its type, its data."""


def _sse_events(http: httpx.Client, path: str,
                last_event_id: int | None = None) -> Iterator[SseEvent]:
    """An SSE stream's events as they come, until it closes (or the caller stops: the
    connection is then dropped, as a client that goes away drops it)."""
    headers = {"Last-Event-ID": str(last_event_id)} if last_event_id is not None else {}
    with http.stream("GET", path, headers=headers, timeout=30) as r:
        assert r.status_code == 200, r.read()
        event_id, kind = 0, ""
        for line in r.iter_lines():
            if line.startswith("id: "):
                event_id = int(line[4:])
            elif line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: "):
                yield event_id, kind, json.loads(line[6:])


def _sse(http: httpx.Client, path: str, last_event_id: int | None = None,
         stop_after: int | None = None) -> list[SseEvent]:
    """The first ``stop_after`` events of a stream, or all of them until it closes."""
    out: list[SseEvent] = []
    for event in _sse_events(http, path, last_event_id):
        out.append(event)
        if stop_after is not None and len(out) >= stop_after:
            break
    return out


def test_events_of_a_task_on_one_node_stream_through_another(cluster: Cluster) -> None:
    words = [f"w{i}" for i in range(24)]  # about 2.4 s of text_delta at 100 ms a word
    with cluster["n1"].client() as http:
        task = http.post("/v1/tasks", json={"preset": "cstream",
                                            "input": {"text": " ".join(words)}}).json()

        def started() -> dict[str, Any] | None:
            seen: dict[str, Any] = http.get(f"/v1/tasks/{task['id']}").json()
            return seen if seen["state"] == "running" else None

        running = poll(started, 30, "the stream task running")
    runs_on = running["placement"]["node"]
    reader, resumer = [n for n in cluster.live() if n.name != runs_on][:2]
    path = f"/v1/tasks/{task['id']}/events"
    with reader.client() as http:
        first = _sse(http, path, stop_after=6)  # queued, running and a few words, live
    assert first[-1][1] != "state" or first[-1][2]["state"] not in FINAL, first
    with resumer.client() as http:  # the client comes back through yet another node
        rest = _sse(http, path, last_event_id=first[-1][0])
    ids = [e[0] for e in first + rest]
    assert ids == sorted(set(ids)) and ids[0] == 1, ids  # nothing twice, nothing skipped
    assert ids == list(range(1, len(ids) + 1)), ids
    assert rest[-1][1] == "state" and rest[-1][2]["state"] == "succeeded", rest[-1]
    text = "".join(d["delta"] for _, kind, d in first + rest if kind == "text_delta")
    assert text == " ".join(words)
    assert any(kind == "state" and d.get("node") == runs_on for _, kind, d in first)


def test_a_lease_on_one_nodes_gpu_is_asked_through_another(cluster: Cluster) -> None:
    n1, n2, n3 = cluster["n1"], cluster["n2"], cluster["n3"]
    with n1.client() as http:
        r = http.post("/v1/leases", json={"holder": "svc", "vram_mb": 2048, "node": "n2",
                                          "device": 0, "wait_s": 20})
        assert r.status_code == 201, r.text
        lease = r.json()
    assert lease["node"] == "n2" and lease["device"] == 0, lease
    with n3.client() as http:
        seen = http.get(f"/v1/leases/{lease['id']}").json()
        assert seen["node"] == "n2" and seen["state"] == "granted", seen
        assert lease["id"] in {x["id"] for x in http.get("/v1/leases").json()["leases"]}
    with n2.client() as http:  # the node whose GPU it is counts it against that GPU
        gpus = http.get("/v1/gpus").json()
        assert lease["id"] in json.dumps(gpus), gpus
    with n3.client() as http:
        r = http.delete(f"/v1/leases/{lease['id']}", params={"token": lease["token"]})
        assert r.status_code == 200, r.text
        assert r.json()["state"] == "released"
    with n1.client() as http:
        assert http.get(f"/v1/leases/{lease['id']}").json()["state"] == "released"


def test_an_urgent_lease_preempts_a_holder_on_another_node(cluster: Cluster) -> None:
    n1, n2, n3 = cluster["n1"], cluster["n2"], cluster["n3"]
    share = {"vram_mb": "20GiB", "node": "n3", "device": 0}  # two of them cannot share it
    with n1.client() as http:
        r = http.post("/v1/leases", json={"holder": "batch", "priority": "background",
                                          "grace_s": 20, **share})
        assert r.status_code == 201, r.text
        held = r.json()
    events: list[SseEvent] = []

    def follow() -> None:  # the holder watches its lease through the node it asked
        with n1.client() as http:
            for e in _sse_events(http, f"/v1/leases/{held['id']}/events"):
                events.append(e)
                if e[1] in ("resume", "released", "expired", "revoked"):
                    return

    watcher = threading.Thread(target=follow, daemon=True)
    watcher.start()
    urgent: dict[str, Any] = {}

    def ask() -> None:  # an urgent request through a third node waits for the room
        with n2.client(60) as http:
            r = http.post("/v1/leases", json={"holder": "urgent", "priority": "immediate",
                                              "wait_s": 30, **share})
            urgent.update(r.json(), status=r.status_code)

    asker = threading.Thread(target=ask, daemon=True)
    asker.start()
    poll(lambda: any(kind == "preempt" for _, kind, _ in events), 30,
         "the holder on n3 to be asked to make room")
    with n1.client() as http:
        r = http.delete(f"/v1/leases/{held['id']}", params={"token": held["token"]})
        assert r.status_code == 200, r.text
    asker.join(40)
    assert urgent.get("status") == 201, urgent
    assert urgent["node"] == "n3", urgent
    preempt = next(d for _, kind, d in events if kind == "preempt")
    assert preempt["by"], preempt
    with n3.client() as http:
        r = http.delete(f"/v1/leases/{urgent['id']}", params={"token": urgent["token"]})
        assert r.status_code == 200, r.text
    watcher.join(10)
