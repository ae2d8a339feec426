"""Dispatch benchmark: gpulane against Celery 5 on no-op tasks, on this machine, in one run.

    .venv/bin/python bench/dispatch.py [--tasks 5000] [--rtt 500] [--warmup 50]
                                       [--store URL] [--gpulane-only]
                                       [--out bench/results/dispatch.json]

Both systems run their no-op ``sleep(ms=0)`` on two worker processes and are driven by one
client process (this one):

* gpulane: ``gpulane serve`` (embedded SQLite store, 2 simulated GPUs, so two session workers
  of the ``sleep`` preset, one per GPU), reached over HTTP through the SDK.
* Celery: a private ``redis-server`` (broker and result backend) and
  ``celery worker --pool prefork --concurrency 2``.

Throughput: from the first submit to the last result in hand, ``--tasks`` tasks. Each system
is measured with the ways its users get many results (described in the JSON); the fastest one
is the headline figure. Round trip: ``--rtt`` sequential submit-and-wait calls after
``--warmup`` unmeasured ones. Goals: gpulane throughput >= 2x Celery's, gpulane p50 round trip
<= 0.5x Celery's. Every subprocess is stopped however the run ends.

``--store redis://HOST:PORT/DB`` runs the gpulane node on that store instead of its embedded
SQLite (a fleet's store; bench/cluster.py compares the two in one sitting with these methods);
``--gpulane-only`` skips Celery and the comparison.
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import math
import os
import shutil
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._util import (
    REPO,
    CpuMeter,
    Proc,
    Procs,
    child_env,
    chunks,
    free_port,
    latency_summary,
    markdown_table,
    print_table,
    run_record,
    start_gpulane,
    start_proc,
    stop_on_signals,
    wait_until,
    write_json,
)

READY_TIMEOUT_S = 60.0
RESULT_WAIT_S = 30.0
DEFAULT_POOL = 100
"""httpx's default max_connections, which the SDK keeps."""
NOISY_CORES = 0.1
"""CPU used by processes outside the benchmark, in cores, above which a figure is flagged."""
FINAL = frozenset({"succeeded", "failed", "cancelled"})
EXPECTED_OUTPUT = {"slept_ms": 0}

METHODS = {
    "gpulane": {
        "bulk+list": (
            "Client (sync, one keep-alive connection): POST /v1/tasks/bulk in chunks of "
            "{chunk} (submit_many), then result(last_id, wait=30) long-polls the last task "
            "submitted (queues are FIFO), then list(limit=1000) pages (GET /v1/tasks, newest "
            "first) until every submitted id is seen; any of them not final yet is long-polled "
            "with result(id, wait=30). Every task's final state and output are checked."),
        "bulk+longpoll": (
            "AsyncClient: one coroutine submits chunks of {chunk} with submit_many while "
            "{concurrency} coroutines await result(id, wait=30) for each id in submission "
            "order (one GET /v1/tasks/{{id}}/result?wait=30 per task, pipelined with the "
            "submits). More long-polls in flight is slower here: httpx's async pool costs "
            "client CPU per open connection."),
        "round_trip": (
            "Client.run('sleep', {{'ms': 0}}): one POST /v1/tasks?wait=30 answered when the task "
            "is final (long-poll follow-up only if it is not)."),
    },
    "celery": {
        "delay+get": (
            "sleep.delay(0) x N, then AsyncResult.get() on each in order (Redis result "
            "backend, pub/sub result consumer)."),
        "group": "group(sleep.s(0) x N).apply_async().get() (Redis native join).",
        "round_trip": "sleep.apply_async((0,)).get()",
    },
}


# --- gpulane -------------------------------------------------------------------------------


def sleep_workers(client: Any) -> list[dict[str, Any]]:
    return [w for w in client.workers()["workers"] if w["preset"] == "sleep"]


def warm_gpulane(url: str, proc: Proc, warmup: int) -> list[dict[str, Any]]:
    """Bring up both ``sleep`` session workers (a backlog makes the scheduler start the
    second one), then run ``warmup`` round trips. Returns the workers."""
    from gpulane.client import Client

    with Client(url) as client:
        def both_ready() -> list[dict[str, Any]] | None:
            ids = [t["id"] for t in client.submit_many(
                [{"preset": "sleep", "input": {"ms": 2}} for _ in range(200)])]
            for tid in ids:
                client.result(tid, wait=RESULT_WAIT_S)
            workers = [w for w in sleep_workers(client) if w["state"] in ("ready", "busy")]
            return workers if len(workers) >= 2 else None

        workers = wait_until(both_ready, timeout=READY_TIMEOUT_S, interval=0.2,
                             what="two ready sleep workers", proc=proc)
        for _ in range(warmup):
            client.run("sleep", {"ms": 0})
        # Workers hold the pids of their own process groups: stop them too if the node dies.
        proc.extra_pids.extend((int(w["pid"]), "sleep_worker") for w in workers
                               if w.get("pid"))
        return workers


def check_tasks(tasks: list[dict[str, Any]], n: int) -> dict[str, Any]:
    states = Counter(t.get("state") for t in tasks)
    bad_output = sum(1 for t in tasks
                     if t.get("state") == "succeeded" and t.get("output") != EXPECTED_OUTPUT)
    return {"count": len(tasks), "expected": n, "states": dict(states),
            "bad_output": bad_output,
            "ok": len(tasks) == n and states.get("succeeded", 0) == n and not bad_output}


def gpulane_bulk_list(url: str, n: int, chunk: int) -> dict[str, Any]:
    from gpulane.client import Client

    bodies = [{"preset": "sleep", "input": {"ms": 0}} for _ in range(n)]
    with Client(url) as client:
        t0 = time.perf_counter()
        ids: list[str] = []
        for part in chunks(bodies, chunk):
            ids.extend(t["id"] for t in client.submit_many(list(part)))
        t_submitted = time.perf_counter()
        client.result(ids[-1], wait=RESULT_WAIT_S)
        t_last = time.perf_counter()
        want = set(ids)
        got: dict[str, dict[str, Any]] = {}
        cursor: str | None = None
        pages = 0
        while len(got) < len(want):
            page = client.list(limit=1000, cursor=cursor)
            pages += 1
            for t in page["tasks"]:
                if t["id"] in want:
                    got[t["id"]] = t
            cursor = page["next_cursor"]
            if cursor is None:
                break
        stragglers = [tid for tid in ids if got.get(tid, {}).get("state") not in FINAL]
        for tid in stragglers:
            got[tid] = client.result(tid, wait=RESULT_WAIT_S)
        elapsed = time.perf_counter() - t0
    return {"elapsed_s": elapsed, "tasks_per_s": n / elapsed,
            "submit_s": t_submitted - t0, "last_result_s": t_last - t0,
            "list_pages": pages, "stragglers_long_polled": len(stragglers),
            "check": check_tasks(list(got.values()), n)}


def gpulane_bulk_longpoll(url: str, n: int, chunk: int, concurrency: int) -> dict[str, Any]:
    from gpulane.client import AsyncClient

    async def main() -> dict[str, Any]:
        bodies = [{"preset": "sleep", "input": {"ms": 0}} for _ in range(n)]
        results: list[dict[str, Any]] = []
        queue: asyncio.Queue[str | None] = asyncio.Queue()
        kwargs: dict[str, Any] = {}
        if concurrency + 4 > DEFAULT_POOL:  # more long-polls than the default pool holds
            if "limits" not in inspect.signature(AsyncClient).parameters:
                raise SystemExit(f"--concurrency above {DEFAULT_POOL - 4} needs an "
                                 "AsyncClient that takes limits=")
            kwargs["limits"] = httpx.Limits(max_connections=concurrency + 4)
        async with AsyncClient(url, **kwargs) as client:

            async def submitter() -> None:
                for part in chunks(bodies, chunk):
                    for t in await client.submit_many(list(part)):
                        queue.put_nowait(t["id"])
                for _ in range(concurrency):
                    queue.put_nowait(None)

            async def collector() -> None:
                while (tid := await queue.get()) is not None:
                    results.append(await client.result(tid, wait=RESULT_WAIT_S))

            t0 = time.perf_counter()
            await asyncio.gather(submitter(), *(collector() for _ in range(concurrency)))
            elapsed = time.perf_counter() - t0
        return {"elapsed_s": elapsed, "tasks_per_s": n / elapsed,
                "check": check_tasks(results, n)}

    return asyncio.run(main())


def gpulane_round_trip(url: str, rtt: int) -> dict[str, Any]:
    from gpulane.client import Client

    samples: list[float] = []
    bad = 0
    with Client(url) as client:
        for _ in range(rtt):
            t0 = time.perf_counter()
            task = client.run("sleep", {"ms": 0})
            samples.append(time.perf_counter() - t0)
            bad += task.get("output") != EXPECTED_OUTPUT
    return {**latency_summary(samples), "bad_output": bad}


def bench_gpulane(args: argparse.Namespace, procs: Procs, tmp: Path,
                  log_dir: Path) -> dict[str, Any]:
    from gpulane.client import Client

    store = ("--store", args.store) if args.store else ()
    proc, url = start_gpulane(procs, tmp / "gpulane-data", log_dir, *store)
    print(f"gpulane: serving at {url} (pid {proc.pid}); warming up", flush=True)
    workers = warm_gpulane(url, proc, args.warmup)
    print(f"gpulane: {len(workers)} sleep workers up: "
          f"{', '.join(w['id'] + '@' + w['device'] for w in workers)}", flush=True)
    out: dict[str, Any] = {"url": url, "store": args.store or "sqlite (the node's own)",
                           "workers_after_warmup": workers, "throughput": {}}
    out["throughput"]["bulk+list"] = _timed(
        "gpulane bulk+list", lambda: gpulane_bulk_list(url, args.tasks, args.chunk))
    if not args.skip_slow:
        out["throughput"]["bulk+longpoll"] = _timed(
            "gpulane bulk+longpoll",
            lambda: gpulane_bulk_longpoll(url, args.tasks, args.chunk, args.concurrency))
    out["round_trip"] = _timed("gpulane round trip", lambda: gpulane_round_trip(url, args.rtt))
    with Client(url) as client:
        out["workers_at_end"] = sleep_workers(client)
    if len(out["workers_at_end"]) != 2:
        print(f"warning: {len(out['workers_at_end'])} sleep workers at the end, not 2",
              file=sys.stderr)
    return out


# --- Celery --------------------------------------------------------------------------------


def start_celery(procs: Procs, log_dir: Path) -> tuple[Any, str]:
    import redis

    port = free_port()
    redis_proc = procs.add(start_proc(
        "redis", ["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                  "--save", "", "--appendonly", "no"], log_dir=log_dir))
    redis_url = f"redis://127.0.0.1:{port}/0"
    def pong() -> bool:
        with redis.Redis.from_url(redis_url, socket_timeout=1) as r:
            return bool(r.ping())

    wait_until(pong, timeout=READY_TIMEOUT_S, what="redis-server PING", proc=redis_proc)
    os.environ["BENCH_REDIS_URL"] = redis_url  # before bench.celery_app is imported
    worker = procs.add(start_proc(
        "celery-worker",
        [sys.executable, "-m", "celery", "-A", "bench.celery_app", "worker", "--pool",
         "prefork", "--concurrency", "2", "--loglevel", "warning"],
        log_dir=log_dir, env=child_env(BENCH_REDIS_URL=redis_url)))
    from bench import celery_app

    if redis_url != celery_app.REDIS_URL:
        raise RuntimeError("bench.celery_app was imported before BENCH_REDIS_URL was set")
    app = celery_app.app
    wait_until(lambda: app.control.ping(timeout=0.5) or None, timeout=READY_TIMEOUT_S,
               what="a Celery worker to answer ping", interval=0.1, proc=worker)
    return app, redis_url


def celery_delay_get(n: int) -> dict[str, Any]:
    from bench.celery_app import sleep

    t0 = time.perf_counter()
    pending = [sleep.delay(0) for _ in range(n)]
    t_submitted = time.perf_counter()
    outputs = [r.get(timeout=120) for r in pending]
    elapsed = time.perf_counter() - t0
    return {"elapsed_s": elapsed, "tasks_per_s": n / elapsed, "submit_s": t_submitted - t0,
            "check": _check_outputs(outputs, n)}


def celery_group(n: int) -> dict[str, Any]:
    from bench.celery_app import sleep
    from celery import group

    t0 = time.perf_counter()
    result = group(sleep.s(0) for _ in range(n)).apply_async()
    t_submitted = time.perf_counter()
    outputs = result.get(timeout=120)
    elapsed = time.perf_counter() - t0
    return {"elapsed_s": elapsed, "tasks_per_s": n / elapsed, "submit_s": t_submitted - t0,
            "check": _check_outputs(outputs, n)}


def _check_outputs(outputs: list[Any], n: int) -> dict[str, Any]:
    good = sum(1 for o in outputs if o == EXPECTED_OUTPUT)
    return {"count": len(outputs), "expected": n, "good": good,
            "ok": len(outputs) == n and good == n}


def celery_round_trip(count: int) -> dict[str, Any]:
    from bench.celery_app import sleep

    samples: list[float] = []
    bad = 0
    for _ in range(count):
        t0 = time.perf_counter()
        out = sleep.apply_async((0,)).get(timeout=30)
        samples.append(time.perf_counter() - t0)
        bad += out != EXPECTED_OUTPUT
    return {**latency_summary(samples), "bad_output": bad}


def bench_celery(args: argparse.Namespace, procs: Procs, log_dir: Path) -> dict[str, Any]:
    import celery

    app, redis_url = start_celery(procs, log_dir)
    print(f"celery {celery.__version__}: worker up, broker/backend {redis_url}; warming up",
          flush=True)
    celery_round_trip(args.warmup)
    celery_group(min(200, args.tasks))  # both pool processes busy once before measuring
    out: dict[str, Any] = {"version": celery.__version__, "redis_url": redis_url,
                           "throughput": {}}
    out["throughput"]["delay+get"] = _timed("celery delay+get", lambda: celery_delay_get(
        args.tasks))
    out["throughput"]["group"] = _timed("celery group", lambda: celery_group(args.tasks))
    out["round_trip"] = _timed("celery round trip", lambda: celery_round_trip(args.rtt))
    app.close()
    return out


# --- report --------------------------------------------------------------------------------


def _timed(label: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    print(f"  {label} ...", end=" ", flush=True)
    meter = CpuMeter()
    result = fn()
    result["noise"] = noise = meter.stop()
    if "tasks_per_s" in result:
        print(f"{result['tasks_per_s']:,.0f} tasks/s ({result['elapsed_s']:.2f} s)", flush=True)
        if not result["check"]["ok"]:
            raise RuntimeError(f"{label}: wrong results: {result['check']}")
    else:
        print(f"p50 {result['p50_ms']:.2f} ms, p99 {result['p99_ms']:.2f} ms", flush=True)
        if result["bad_output"]:
            raise RuntimeError(f"{label}: {result['bad_output']} wrong outputs")
    if (noise["other_cores"] or 0) > NOISY_CORES:
        print(f"    note: other processes used {noise['other_cores']:.2f} cores meanwhile; "
              "this figure is noisy", flush=True)
    return result


def best(throughput: dict[str, dict[str, Any]]) -> tuple[str, dict[str, Any]]:
    name = max(throughput, key=lambda k: throughput[k]["tasks_per_s"])
    return name, throughput[name]


def report(g: dict[str, Any], c: dict[str, Any]) -> dict[str, Any]:
    g_name, g_best = best(g["throughput"])
    c_name, c_best = best(c["throughput"])
    g_rt, c_rt = g["round_trip"], c["round_trip"]
    throughput_ratio = g_best["tasks_per_s"] / c_best["tasks_per_s"]
    p50_ratio = c_rt["p50_ms"] / g_rt["p50_ms"]
    headers = ["system", "throughput method", "tasks/s", "p50 ms", "p99 ms", "mean ms"]
    rows = [["gpulane", g_name, g_best["tasks_per_s"], g_rt["p50_ms"], g_rt["p99_ms"],
             g_rt["mean_ms"]],
            ["celery", c_name, c_best["tasks_per_s"], c_rt["p50_ms"], c_rt["p99_ms"],
             c_rt["mean_ms"]]]
    print()
    table = print_table(headers, rows)
    others = [[system, name, r["tasks_per_s"]]
              for system, res, top in (("gpulane", g, g_name), ("celery", c, c_name))
              for name, r in res["throughput"].items() if name != top]
    if others:
        print()
        print_table(["system", "other throughput method", "tasks/s"], others)
    goals = {
        "throughput": {"goal": "gpulane tasks/s >= 2x celery", "ratio": throughput_ratio,
                       "met": throughput_ratio >= 2.0},
        "p50": {"goal": "gpulane p50 <= 0.5x celery (celery/gpulane >= 2)",
                "ratio": p50_ratio, "met": g_rt["p50_ms"] <= 0.5 * c_rt["p50_ms"]},
    }
    print()
    for key, goal in goals.items():
        label = "gpulane/celery throughput" if key == "throughput" else "celery/gpulane p50"
        print(f"{label}: {goal['ratio']:.2f}x  (goal >= 2x: "
              f"{'met' if goal['met'] else 'MISSED'})")
    return {"table": table, "markdown": markdown_table(headers, rows),
            "headline": {"gpulane": {"throughput_method": g_name, **_row(g_best, g_rt)},
                         "celery": {"throughput_method": c_name, **_row(c_best, c_rt)}},
            "ratios": {"throughput_gpulane_over_celery": throughput_ratio,
                       "p50_celery_over_gpulane": p50_ratio},
            "goals": goals, "all_goals_met": all(gl["met"] for gl in goals.values())}


def gpulane_report(g: dict[str, Any]) -> dict[str, Any]:
    """gpulane's figures alone (``--gpulane-only``): every method, no goals."""
    headers = ["method", "tasks/s", "p50 ms", "p99 ms"]
    rt = g["round_trip"]
    rows = [[name, r["tasks_per_s"], math.nan, math.nan] for name, r in g["throughput"].items()]
    rows.append(["round_trip", math.nan, rt["p50_ms"], rt["p99_ms"]])
    print()
    table = print_table(headers, rows)
    name, top = best(g["throughput"])
    return {"table": table, "markdown": markdown_table(headers, rows),
            "headline": {"gpulane": {"throughput_method": name, **_row(top, rt)}}}


def _row(tp: dict[str, Any], rt: dict[str, Any]) -> dict[str, Any]:
    return {"tasks_per_s": tp["tasks_per_s"], "p50_ms": rt["p50_ms"], "p99_ms": rt["p99_ms"],
            "mean_ms": rt["mean_ms"]}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--tasks", type=int, default=5000, help="tasks per throughput run")
    p.add_argument("--rtt", type=int, default=500, help="measured round trips")
    p.add_argument("--warmup", type=int, default=50, help="unmeasured round trips first")
    p.add_argument("--chunk", type=int, default=500, help="gpulane tasks per bulk submit")
    p.add_argument("--concurrency", type=int, default=8,
                   help="gpulane long-polls in flight (bulk+longpoll method)")
    p.add_argument("--skip-slow", action="store_true",
                   help="skip gpulane's per-task long-poll method (slowest here)")
    p.add_argument("--store", default=None, metavar="URL",
                   help="the gpulane node's store, e.g. redis://127.0.0.1:6379/0 "
                        "[its own SQLite]")
    p.add_argument("--gpulane-only", action="store_true",
                   help="measure gpulane alone: no Celery, no comparison")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "dispatch.json",
                   help="where to write the JSON")
    p.add_argument("--keep-logs", action="store_true", help="keep the servers' logs")
    p.add_argument("--check-goals", action="store_true",
                   help="exit with status 1 when a goal is missed")
    args = p.parse_args(argv)
    if min(args.tasks, args.rtt, args.chunk, args.concurrency) < 1 or args.warmup < 0:
        p.error("--tasks, --rtt, --chunk and --concurrency must be >= 1, --warmup >= 0")
    return args


def _exit_code(exc: BaseException) -> int:
    if isinstance(exc, SystemExit):
        return exc.code if isinstance(exc.code, int) else 1
    return 130 if isinstance(exc, KeyboardInterrupt) else 1


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    stop_on_signals()
    tmp = Path(tempfile.mkdtemp(prefix="gpulane-bench-"))
    log_dir = tmp / "logs"
    log_dir.mkdir()
    started = time.time()
    load_start = list(os.getloadavg())
    results: dict[str, Any] = {}
    try:
        with Procs() as procs:  # every server is stopped here, however the block ends
            results["gpulane"] = bench_gpulane(args, procs, tmp, log_dir)
            procs.stop_all()  # one system at a time on the machine
            if not args.gpulane_only:
                results["celery"] = bench_celery(args, procs, log_dir)
    except BaseException as exc:
        traceback.print_exc()
        print(f"\nthe run failed; the servers' logs are in {log_dir}", file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        # Not a normal exit: Celery AsyncResult finalizers still referenced from the traceback
        # would retry the (now stopped) Redis forever at interpreter shutdown.
        os._exit(_exit_code(exc))
    if args.keep_logs:
        print(f"logs: {log_dir}", file=sys.stderr)
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    summary = (gpulane_report(results["gpulane"]) if args.gpulane_only
               else report(results["gpulane"], results["celery"]))
    methods = {system: {k: v.format(chunk=args.chunk, concurrency=args.concurrency)
                        for k, v in m.items()} for system, m in METHODS.items()}
    data = {
        **run_record("dispatch", "bench/dispatch.py", argv, started, load_start),
        "parameters": {"tasks": args.tasks, "rtt": args.rtt, "warmup": args.warmup,
                       "chunk": args.chunk, "concurrency": args.concurrency,
                       "task": "sleep(ms=0): a no-op returning {'slept_ms': 0}",
                       "gpulane_node": "gpulane serve --simulate-gpus 2x24GiB, "
                                       f"{args.store or 'SQLite'} store, 2 session workers "
                                       "of preset 'sleep' (batch max 64)",
                       "celery_node": "redis-server (broker+backend, no persistence), celery "
                                      "worker --pool prefork --concurrency 2"},
        "methods": methods,
        **summary,
        "results": results,
    }
    write_json(args.out, data)
    print(f"\nwrote {args.out}")
    return 1 if args.check_goals and not summary["all_goals_met"] else 0


if __name__ == "__main__":
    sys.exit(main())
