"""AsyncClient benchmark: the lean asyncio HTTP/1.1 pool against httpx, and coalesced run().

    .venv/bin/python bench/async_sdk.py [--calls 5000] [--tasks 5000] [--rounds 3]
                                        [--callers 64] [--out bench/results/async_sdk.json]

Against one fresh ``gpulane serve`` (embedded SQLite, 2 simulated GPUs, the ``sleep`` preset's
two session workers warmed up), this process being the only client:

* client CPU per call (``time.process_time`` of this process, which runs nothing else):
  ``--calls`` sequential ``await client.get(id)``, and ``--calls`` sequential
  ``await client.run("sleep", {"ms": 0})``; with the SDK as shipped (plain calls on the lean
  pool) and with httpx (``transport=httpx.AsyncHTTPTransport()``: every call through httpx,
  as before the pool);
* ``bulk+longpoll``: bench/dispatch.py's method (one coroutine submits chunks of 500
  with ``submit_many`` while 8 coroutines await ``result(id, wait=30)`` per id), tasks/s;
* ``run() x callers``: ``--callers`` coroutines each calling ``run()`` in a loop until
  ``--tasks`` tasks are done, tasks/s: each its own request (``coalesce=False``; httpx, and the
  lean pool) and coalesced into shared bulk submits and results polls (as shipped);
* ``enqueue then results``: method A through ``enqueue()``: ``--tasks`` enqueued one call at
  a time, then each future awaited in submission order.

Variants alternate within each round; the median round is reported (2 shared cores: noisy).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._util import (
    REPO,
    Procs,
    bulk_then_longpoll,
    markdown_table,
    print_table,
    run_record,
    start_gpulane,
    stop_on_signals,
    write_json,
)

from gpulane.client import AsyncClient, Client

RESULT_WAIT_S = 30.0
CHUNK = 500
LONG_POLLS = 8


VARIANTS = {
    "httpx": "every call through httpx (transport=httpx.AsyncHTTPTransport()), each its own "
             "request: the AsyncClient before the lean pool",
    "lean": "the lean pool, each call its own request (coalesce=False)",
    "lean+coalesce": "the SDK as shipped: the lean pool, concurrent calls coalesced",
}


def make_client(url: str, variant: str) -> AsyncClient:
    if variant == "httpx":
        limits = httpx.Limits(max_connections=100, max_keepalive_connections=32,
                              keepalive_expiry=4.0)
        return AsyncClient(url, transport=httpx.AsyncHTTPTransport(limits=limits),
                           **_no_coalesce())
    if variant == "lean":
        return AsyncClient(url, **_no_coalesce())
    return AsyncClient(url)


def _no_coalesce() -> dict[str, Any]:
    # An AsyncClient from before coalescing has no such argument (and never coalesces).
    return {"coalesce": False} if hasattr(AsyncClient, "enqueue") else {}


async def cpu_per_call(url: str, variant: str, calls: int, what: str) -> dict[str, float]:
    async with make_client(url, variant) as client:
        task = await client.run("sleep", {"ms": 0})
        call: Callable[[], Awaitable[Any]] = (
            (lambda: client.get(task["id"])) if what == "get"
            else (lambda: client.run("sleep", {"ms": 0})))
        for _ in range(50):
            await call()
        cpu0, wall0 = time.process_time(), time.perf_counter()
        for _ in range(calls):
            await call()
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    return {"cpu_us_per_call": cpu / calls * 1e6, "wall_us_per_call": wall / calls * 1e6}


async def bulk_longpoll(url: str, variant: str, n: int) -> dict[str, float]:
    bodies = [{"preset": "sleep", "input": {"ms": 0}} for _ in range(n)]
    async with make_client(url, variant) as client:
        results, elapsed, cpu = await bulk_then_longpoll(client, bodies, CHUNK, LONG_POLLS,
                                                         RESULT_WAIT_S)
    ok = sum(1 for t in results if t.get("state") == "succeeded")
    return {"tasks_per_s": n / elapsed, "client_cpu_us_per_task": cpu / n * 1e6,
            "succeeded": ok}


async def concurrent_run(url: str, variant: str, n: int, callers: int) -> dict[str, float]:
    left = n
    done = 0
    async with make_client(url, variant) as client:

        async def caller() -> None:
            nonlocal left, done
            while left > 0:
                left -= 1
                task = await client.run("sleep", {"ms": 0})
                done += task.get("state") == "succeeded"

        t0, cpu0 = time.perf_counter(), time.process_time()
        await asyncio.gather(*(caller() for _ in range(callers)))
        elapsed, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    return {"tasks_per_s": n / elapsed, "client_cpu_us_per_task": cpu / n * 1e6,
            "succeeded": done}


async def enqueue_then_results(url: str, variant: str, n: int) -> dict[str, float]:
    """Method A through enqueue(): n enqueued one call at a time, then each result awaited
    in submission order."""
    async with make_client(url, variant) as client:
        t0, cpu0 = time.perf_counter(), time.process_time()
        futures = [client.enqueue("sleep", {"ms": 0}) for _ in range(n)]
        tasks = [await f for f in futures]
        elapsed, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    ok = sum(1 for t in tasks if t.get("state") == "succeeded")
    return {"tasks_per_s": n / elapsed, "client_cpu_us_per_task": cpu / n * 1e6,
            "succeeded": ok}


def warm(url: str) -> None:
    with Client(url) as client:
        ids = [t["id"] for t in client.submit_many(
            [{"preset": "sleep", "input": {"ms": 2}} for _ in range(200)])]
        for tid in ids:
            client.result(tid, wait=RESULT_WAIT_S)


def median_of(rounds: list[dict[str, float]]) -> dict[str, float]:
    return {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--calls", type=int, default=5000)
    p.add_argument("--tasks", type=int, default=5000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--callers", type=int, default=64)
    p.add_argument("--out", type=Path, default=REPO / "bench/results/async_sdk.json")
    args = p.parse_args(argv)
    stop_on_signals()
    started, load_start = time.time(), list(os.getloadavg())
    Measure = Callable[[str, str], Coroutine[Any, Any, dict[str, float]]]
    measures: dict[str, tuple[Measure, tuple[str, ...]]] = {
        "get": (lambda url, v: cpu_per_call(url, v, args.calls, "get"), ("lean", "httpx")),
        "run": (lambda url, v: cpu_per_call(url, v, args.calls, "run"),
                ("lean+coalesce", "httpx")),
        "bulk+longpoll": (lambda url, v: bulk_longpoll(url, v, args.tasks), ("lean", "httpx")),
        f"run() x {args.callers}": (
            lambda url, v: concurrent_run(url, v, args.tasks, args.callers),
            ("lean+coalesce", "lean", "httpx")),
    }
    if hasattr(AsyncClient, "enqueue"):
        measures["enqueue then results"] = (
            lambda url, v: enqueue_then_results(url, v, args.tasks), ("lean+coalesce",))
    samples: dict[tuple[str, str], list[dict[str, float]]] = {}
    with Procs() as procs, tempfile.TemporaryDirectory(prefix="gl-async-sdk-") as tmp:
        (Path(tmp) / "logs").mkdir()
        _, url = start_gpulane(procs, Path(tmp) / "data", Path(tmp) / "logs")
        warm(url)
        for r in range(args.rounds):
            for name, (measure, variants) in measures.items():
                for variant in variants if r % 2 == 0 else variants[::-1]:
                    out = asyncio.run(measure(url, variant))
                    samples.setdefault((name, variant), []).append(out)
                    print(f"round {r + 1} {name} {variant}: {out}", flush=True)
    results = {f"{name} / {variant}": {"median": median_of(rounds), "rounds": rounds}
               for (name, variant), rounds in samples.items()}
    headers = ["measure", "client", "client CPU us", "wall us / call", "tasks/s"]
    rows = []
    for (name, variant), rounds in samples.items():
        m = median_of(rounds)
        cpu = m.get("cpu_us_per_call", m.get("client_cpu_us_per_task"))
        rows.append([name, variant, f"{cpu:.0f}",
                     f"{m['wall_us_per_call']:.0f}" if "wall_us_per_call" in m else "",
                     f"{m['tasks_per_s']:.0f}" if "tasks_per_s" in m else ""])
    print_table(headers, rows)
    write_json(args.out, {**run_record("async_sdk", "bench/async_sdk.py", argv, started,
                                       load_start),
                          "args": vars(args) | {"out": str(args.out)},
                          "variants": VARIANTS,
                          "results": results, "table": markdown_table(headers, rows)})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
