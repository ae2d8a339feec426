"""A node that leaves the fleet under load, killed -9 or drained: no acknowledged task is lost,
and what it held runs on the nodes that stay."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.cluster.conftest import (
    Cluster,
    final_task,
    poll,
    running_cluster,
    submit_acked,
    tasks_in,
)

TASKS = 24
"""csleep tasks in each backlog: more than the fleet runs at once (2 per node)."""


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with running_cluster(tmp_path_factory.mktemp("loss"), 3) as c:
        yield c


def _backlog(http: httpx.Client, tag: str, ms: int) -> list[str]:
    """Submit TASKS csleep tasks one by one (each acknowledged by a 202); their ids."""
    return [submit_acked(http, {"preset": "csleep", "input": {"ms": ms}}, f"{tag}-{i}")["id"]
            for i in range(TASKS)]


def _running_on(http: httpx.Client, node: str) -> list[dict[str, Any]]:
    return [t for t in tasks_in(http, "running", "csleep") if t["placement"]["node"] == node]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    try:  # a zombie is dead for this purpose
        return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_a_node_killed_mid_load_loses_nothing(cluster: Cluster) -> None:
    n1, victim = cluster["n1"], cluster["n3"]
    with n1.client() as http:
        r = http.post("/v1/leases", json={"holder": "svc", "vram_mb": 1024, "node": victim.name,
                                          "ttl_s": 600})
        assert r.status_code == 201, r.text
        lease = r.json()
        ids = _backlog(http, "kill", 400)
        held = poll(lambda: _running_on(http, victim.name), 60, "n3 running a task")
        victim.note_workers()
        workers = set(victim._workers)
        victim.kill()
        # After its TTL another node requeues what it ran; everything acknowledged finishes.
        done = {task_id: final_task(http, task_id, timeout=90) for task_id in ids}
        assert all(t["state"] == "succeeded" for t in done.values()), cluster.logs()
        for t in held:
            again = done[t["id"]]
            assert again["placement"]["node"] != victim.name, again
        poll(lambda: victim.name not in cluster.names_in_fleet(n1), 30, "n3 to leave the fleet")
        # Its lease ends with it, long before its own TTL would have run out.
        poll(lambda: http.get(f"/v1/leases/{lease['id']}").json()["state"] == "expired", 30,
             "the lease on n3 to end")
    # Its workers died with it (PR_SET_PDEATHSIG): none is left running for nobody.
    poll(lambda: not [p for p in workers if _alive(p)], 15, "n3's workers to exit")


def test_a_drained_node_exits_0_and_its_share_runs_elsewhere(cluster: Cluster) -> None:
    entry, leaving = cluster["n1"], cluster["n2"]
    with entry.client() as http:
        ids = _backlog(http, "drain", 300)
        poll(lambda: _running_on(http, leaving.name), 60, "n2 running a task")
        drain = subprocess.run([sys.executable, "-m", "gpulane", "drain", leaving.name,
                                "--exit", "--url", entry.url], capture_output=True, text=True,
                               timeout=60)
        assert drain.returncode == 0, drain.stdout + drain.stderr
        assert leaving.proc is not None
        code = leaving.proc.wait(60)  # within its drain grace
        exited_at = time.time()
        assert code == 0, leaving.log_tail()
        done = [final_task(http, task_id) for task_id in ids]
    assert all(t["state"] == "succeeded" for t in done), done
    # What it had not started went back to the queue without spending an attempt.
    assert all(t["attempts"] == 1 for t in done), [t for t in done if t["attempts"] != 1]
    # Nothing is recorded as run by the drained node after it exited.
    late = [t for t in done if t["placement"]["node"] == leaving.name
            and t["finished_at"] > exited_at]
    assert not late, late
    poll(lambda: leaving.name not in cluster.names_in_fleet(entry), 30, "n2 to leave")
