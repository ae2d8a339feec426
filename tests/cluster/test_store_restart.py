"""Redis killed -9 and started again under load, with ``appendfsync always``: the nodes answer
503 while it is away, clients retry, and every task a 202 acknowledged finishes."""

from __future__ import annotations

import threading
import time
from collections import Counter
from pathlib import Path

import httpx

from tests.cluster.conftest import (
    FINAL,
    READY_TIMEOUT_S,
    Node,
    final_task,
    poll,
    running_cluster,
)

SUBMITS = 40
"""Tasks each submitter sends (one per node), one at a time."""
CLAIM_TTL_S = "3"
"""The nodes' claim TTL. A claim that Redis applied as it died, its answer lost, leaves its
tasks running for nobody until the reaper takes them back after this long (30 s by default)."""


class Submitter(threading.Thread):
    """Submits SUBMITS csleep tasks through one node, each with its own idempotency key,
    retrying 503s and dropped connections until a 202; records what was acknowledged."""

    def __init__(self, node: Node, tag: str) -> None:
        super().__init__(daemon=True)
        self.node, self.tag = node, tag
        self.acked: dict[str, str] = {}
        self.answers: Counter[str] = Counter()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with self.node.client(10) as http:
                for i in range(SUBMITS):
                    key = f"{self.tag}-{i}"
                    self.acked[key] = self._submit(http, key)
        except BaseException as exc:  # reported by the test
            self.error = exc

    def _submit(self, http: httpx.Client, key: str) -> str:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                r = http.post("/v1/tasks", json={"preset": "csleep", "input": {"ms": 50}},
                              headers={"Idempotency-Key": key})
                self.answers[str(r.status_code)] += 1
                if r.status_code == 202:
                    task_id: str = r.json()["id"]
                    return task_id
                assert r.status_code == 503, r.text
                assert r.headers.get("retry-after"), r.headers
                assert r.json()["error"]["code"] == "store_unavailable", r.text
            except httpx.TransportError as exc:
                self.answers[type(exc).__name__] += 1
            time.sleep(0.05)  # the pause between retries (the SDK honours Retry-After)
        raise AssertionError(f"{key} never acknowledged")


def test_redis_killed_and_restarted_under_load_loses_no_acknowledged_task(
        tmp_path: Path) -> None:
    with running_cluster(tmp_path, 2, env={"GPULANE_CLAIM_TTL_S": CLAIM_TTL_S}) as cluster:
        subs = [Submitter(node, f"s{i}") for i, node in enumerate(cluster.live())]
        for s in subs:
            s.start()
        poll(lambda: sum(len(s.acked) for s in subs) >= SUBMITS // 2, 60,
             "the first acknowledgements")
        cluster.redis.kill()
        poll(lambda: sum(s.answers["503"] for s in subs) >= 1, 30,
             "a node to answer 503 while its store is away")
        cluster.redis.start(READY_TIMEOUT_S)
        for s in subs:
            s.join(90)
            assert s.error is None, f"{s.error!r}\n{cluster.logs()}"
        acked = {k: v for s in subs for k, v in s.acked.items()}
        assert len(acked) == 2 * SUBMITS
        with cluster["n1"].client() as http:
            done = {task_id: final_task(http, task_id, timeout=90)
                    for task_id in set(acked.values())}
        lost = [k for k, task_id in acked.items() if done[task_id]["state"] not in FINAL]
        assert not lost, lost
        assert all(t["state"] == "succeeded" for t in done.values()), cluster.logs()
        # One task per key: a submit retried across the outage was not taken twice.
        assert len(set(acked.values())) == len(acked)
        for node in cluster.live():
            poll(lambda node=node: httpx.get(f"{node.url}/readyz", timeout=2).status_code
                 == 200, 30, f"{node.name} ready again")
