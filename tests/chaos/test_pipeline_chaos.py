"""The sync Client's pipelined submitter through a lossy link and a node killed -9 and
restarted: enqueue() futures and 64 threads calling run(), all at once.

What must hold: every future that was acknowledged has its task in the store afterwards and
ends (its result is the task's final state); every run() that returned a task names a task in
the store; and no input was made into two tasks (each item's Idempotency-Key survives the
retries of its bulk, the resends of a refused bulk and the restart). Calls made while the node
was down may fail (a TransportError or an open circuit): they were never acknowledged.
"""

from __future__ import annotations

import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from gpulane.client import Client
from gpulane.client.pipeline_collect import TaskFuture
from gpulane.errors import ClientError, TaskFailedError
from tests.chaos.conftest import ServerProcess
from tests.chaos.proxy import FaultProxy
from tests.chaos.test_chaos import server_tasks

PER_ROUND = 50
KILL_AFTER_ROUND = 4
ROUNDS_AFTER = 4
"""Enqueue rounds acknowledged whole after the restart before the producer stops."""
MAX_ROUNDS = 200
THREADS = 64
RUNS_AFTER = 3
"""run() calls each thread gets answered after the restart before it stops."""
MAX_RUNS_PER_THREAD = 40


def test_nothing_acknowledged_is_lost_or_made_twice_across_a_kill_and_a_lossy_link(
        server: ServerProcess) -> None:
    futures: list[TaskFuture] = []
    runs: list[dict[str, Any] | ClientError] = []
    killed = threading.Event()
    half_way = threading.Event()

    with (FaultProxy(server.port, reset_rate=0.03, spike_rate=0.03, spike_s=0.1,
                     seed=15) as proxy,
          Client(proxy.url) as client):

        def pause() -> None:
            """After a refused call: on once the node is back and the breaker lets calls by
            (as an app would back off), not in a tight loop against an open circuit."""
            killed.wait(60)
            breaker = client.breaker
            threading.Event().wait(max(0.05, breaker.retry_in() if breaker else 0.0))

        def produce() -> None:
            after = 0  # rounds acknowledged whole after the restart
            for r in range(MAX_ROUNDS):
                batch = [client.enqueue("sleep", {"ms": 0, "n": f"e{r}-{i}"})
                         for i in range(PER_ROUND)]
                futures.extend(batch)
                client.flush()
                if r == KILL_AFTER_ROUND:
                    half_way.set()  # and go on: the kill meets enqueues in flight
                acked = sum(f.acknowledged() for f in batch)
                if killed.is_set() and acked == PER_ROUND:
                    after += 1
                    if after == ROUNDS_AFTER:
                        return
                elif not acked:
                    pause()

        def run(t: int) -> list[dict[str, Any] | ClientError]:
            got: list[dict[str, Any] | ClientError] = []
            after = 0  # runs that succeeded after the restart
            for i in range(MAX_RUNS_PER_THREAD):
                try:
                    got.append(client.run("sleep", {"ms": 0, "n": f"r{t}-{i}"}, timeout=60))
                    after += killed.is_set()
                except ClientError as exc:
                    got.append(exc)
                    pause()
                if i == 1:
                    half_way.wait(60)
                if after == RUNS_AFTER:
                    break
            return got

        producer = threading.Thread(target=produce)
        producer.start()
        with ThreadPoolExecutor(THREADS) as pool:
            running = [pool.submit(run, t) for t in range(THREADS)]
            assert half_way.wait(120)
            server.kill()  # SIGKILL, mid-stream: bulks, held runs and polls all cut
            server.start()
            killed.set()
            for f in running:
                runs.extend(f.result(300))
        producer.join(300)

        acknowledged = [f for f in futures if f.acknowledged()]
        ends: dict[str, dict[str, Any]] = {}
        for future in acknowledged:
            try:
                ends[future.id] = future.result(120)
            except TaskFailedError as exc:
                ends[future.id] = exc.task
        resets = proxy.stats.total_resets

    stored = {t["id"]: t for t in server_tasks(server.url)}
    # Every acknowledged future's task is in the store and ended as its future says.
    assert len(acknowledged) >= PER_ROUND * (KILL_AFTER_ROUND + 1 + ROUNDS_AFTER)
    for task_id, end in ends.items():
        assert task_id in stored, f"acknowledged task {task_id} is not in the store"
        assert stored[task_id]["state"] == end["state"] and end["state"] in (
            "succeeded", "failed", "cancelled")
    ran = [r for r in runs if isinstance(r, dict)]
    assert sum(isinstance(r, ClientError) for r in runs) < len(runs) // 2
    assert len(ran) >= THREADS * RUNS_AFTER
    assert all(r["id"] in stored and r["state"] == "succeeded" for r in ran)
    # Nothing was submitted twice: one task per input, whatever was retried or resent.
    made = Counter(t["input"]["n"] for t in stored.values() if "n" in (t["input"] or {}))
    assert not [n for n, count in made.items() if count > 1]
    assert len({f.id for f in acknowledged}) == len(acknowledged)
    assert resets > 0  # the link really was lossy
