"""Metrics benchmark: what a Prometheus scrape of a node costs as finished tasks pile up.

    .venv/bin/python bench/metrics.py [--tasks 100000] [--chunk 5000] [--scrapes 200]
                                      [--out bench/results/metrics.json]

One ``gpulane serve`` (2 simulated 24 GiB GPUs, SQLite, as a user starts it) runs no-op tasks
(the ``sleep`` preset with ``ms: 0``, bulk submits of ``--chunk``) up to each checkpoint of
finished tasks (0, 1%, 10% and 100% of ``--tasks``; all kept in the store, retention is 7
days). At each checkpoint, with the node idle, ``--scrapes`` sequential ``GET /metrics`` over
one keep-alive connection are timed twice: by the client (the HTTP round trip on loopback
included) and by the node (its ``Server-Timing`` header: reading the queues from the store and
writing every series). The scrape's size in bytes and in samples (parsed with
prometheus_client's parser) is recorded.

Then the hot path, in this process: what the meters add to each task's end
(``Meters.task_ended``), each batch sent (``batch_sent``) and each timed store call (an
awaited no-op, wrapped and bare), in microseconds, the median of 5 runs of ``--calls``.

Goals (issue 14): a scrape with 100,000 finished tasks behind it takes under 10 ms on the node
(p99), and its size does not grow with the number of tasks.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._util import (
    REPO,
    Procs,
    chunks,
    percentile,
    print_table,
    run_record,
    start_gpulane,
    stop_on_signals,
    write_json,
)

from gpulane.metrics import Meters

GOAL_MS = 10.0
"""A scrape's goal time on the node, at the last checkpoint (p99)."""
SUCCESS = "gpulane_inference_request_success_total"
"""The counter a checkpoint waits on: tasks of the preset that succeeded."""
WAIT_S = 900.0
"""Longest wait for one checkpoint's tasks to finish."""


def succeeded(text: str) -> float:
    return sum(s.value for fam in text_string_to_metric_families(text) for s in fam.samples
               if s.name == SUCCESS and s.labels.get("preset") == "sleep")


def run_tasks(client: httpx.Client, n: int, chunk: int, done_before: float) -> float:
    """Submit ``n`` no-op tasks in bulks, wait until the node counts them all succeeded;
    seconds it took."""
    t0 = time.perf_counter()
    for part in chunks(range(n), chunk):
        body = {"tasks": [{"preset": "sleep", "input": {"ms": 0}} for _ in part]}
        r = client.post("/v1/tasks/bulk", json=body)
        r.raise_for_status()
    deadline = time.monotonic() + WAIT_S
    while succeeded(client.get("/metrics").text) < done_before + n:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{n} tasks not finished within {WAIT_S} s")
        time.sleep(0.25)
    return time.perf_counter() - t0


def time_scrapes(client: httpx.Client, scrapes: int) -> dict[str, Any]:
    """Round trips timed by the client, and the node's own time (its Server-Timing)."""
    ms, node_ms = [], []
    body = ""
    for _ in range(scrapes):
        t0 = time.perf_counter()
        r = client.get("/metrics")
        ms.append((time.perf_counter() - t0) * 1000)
        r.raise_for_status()
        node_ms.append(float(r.headers["server-timing"].split("dur=")[1]))
        body = r.text
    families = list(text_string_to_metric_families(body))
    return {"p50_ms": round(statistics.median(ms), 3), "p99_ms": round(percentile(ms, 99), 3),
            "max_ms": round(max(ms), 3), "node_p50_ms": round(statistics.median(node_ms), 3),
            "node_p99_ms": round(percentile(node_ms, 99), 3), "bytes": len(body.encode()),
            "samples": sum(len(f.samples) for f in families), "families": len(families)}


class Ended:
    """A task as the meters read it at its end (model.Task's fields)."""

    preset, lane = "sleep", "gpu"

    def __init__(self) -> None:
        self.created_at = time.time()
        self.started_at = self.created_at


class NoopStore:
    async def claim(self) -> None:
        return None


def hot_path(calls: int) -> dict[str, float]:
    """Microseconds each meter adds, the median of 5 runs of ``calls``."""
    def median_us(run: Callable[[], float]) -> float:
        return round(statistics.median(run() for _ in range(5)) / calls * 1e6, 3)

    meters, task = Meters("bench"), Ended()

    def ends() -> float:
        t0 = time.perf_counter()
        for _ in range(calls):
            meters.task_ended(task, "succeeded")
        return time.perf_counter() - t0

    def batches() -> float:
        t0 = time.perf_counter()
        for _ in range(calls):
            meters.batch_sent("sleep", "gpu", 64)
        return time.perf_counter() - t0

    store = NoopStore()
    bare = store.claim
    meters.timed_store(store)

    async def awaited(call: Callable[[], Awaitable[None]]) -> float:
        t0 = time.perf_counter()
        for _ in range(calls):
            await call()
        return time.perf_counter() - t0

    def timed_extra() -> float:
        return asyncio.run(awaited(store.claim)) - asyncio.run(awaited(bare))

    return {"task_ended_us": median_us(ends), "batch_sent_us": median_us(batches),
            "timed_store_call_extra_us": median_us(timed_extra)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", type=int, default=100_000)
    p.add_argument("--chunk", type=int, default=5000, help="tasks per bulk submit")
    p.add_argument("--scrapes", type=int, default=200, help="timed scrapes per checkpoint")
    p.add_argument("--calls", type=int, default=100_000, help="calls per hot-path run")
    p.add_argument("--out", type=Path, default=REPO / "bench/results/metrics.json")
    args = p.parse_args(argv)
    stop_on_signals()
    started, load_start = time.time(), list(os.getloadavg())
    checkpoints = sorted({0, args.tasks // 100, args.tasks // 10, args.tasks})
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="gpulane-bench-metrics-") as tmp, Procs() as procs:
        (Path(tmp) / "logs").mkdir()
        _, url = start_gpulane(procs, Path(tmp) / "data", Path(tmp) / "logs")
        with httpx.Client(base_url=url, timeout=120) as client:
            done = 0
            for target in checkpoints:
                run_s = run_tasks(client, target - done, args.chunk, done) if target > done \
                    else 0.0
                done = target
                rows.append({"finished_tasks": done, "run_s": round(run_s, 1),
                             **time_scrapes(client, args.scrapes)})
    headers = ["finished tasks", "round trip p50 ms", "p99 ms", "node p50 ms", "node p99 ms",
               "bytes", "samples"]
    table = print_table(headers, [[r["finished_tasks"], r["p50_ms"], r["p99_ms"],
                                   r["node_p50_ms"], r["node_p99_ms"], r["bytes"], r["samples"]]
                                  for r in rows])
    last = rows[-1]
    goals = {"node_p99_under_10ms_at_last": last["node_p99_ms"] < GOAL_MS,
             "round_trip_p50_under_10ms_at_last": last["p50_ms"] < GOAL_MS,
             "samples_constant": len({r["samples"] for r in rows[1:]}) == 1,
             "bytes_spread": max(r["bytes"] for r in rows[1:]) - min(r["bytes"]
                                                                    for r in rows[1:])}
    hot = hot_path(args.calls)
    print_table(["hot path", "us per call"], [[k, v] for k, v in hot.items()])
    print(f"goals: {goals}")
    write_json(args.out, {**run_record("metrics", "bench/metrics.py", argv, started,
                                       load_start),
                          "params": vars(args) | {"out": str(args.out)},
                          "results": rows, "hot_path": hot, "goals": goals, "table": table})
    print(f"wrote {args.out}")
    return 0 if goals["node_p99_under_10ms_at_last"] and goals["samples_constant"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
