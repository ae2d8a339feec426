"""Dispatch benchmark: gpulane against Celery, Huey and Dramatiq on no-op tasks, in one run.

    .venv/bin/python bench/dispatch.py [--tasks 5000] [--rtt 500] [--warmup 50] [--threads 64]
                                       [--peers celery,huey,dramatiq] [--baseline dff7ec6]
                                       [--no-baseline] [--store URL] [--gpulane-only]
                                       [--out bench/results/dispatch.json]

Every system runs its no-op ``sleep(ms=0)`` on two worker processes, one system on the machine
at a time, driven by this one client process, measured by the same code
(bench/dispatch_methods.py) through the calls its users make:

* A: ``--tasks`` submits one call at a time, then every result in submission order. gpulane:
  ``Client.submit`` + ``Client.result(id, wait=30)``, and ``Client.enqueue`` futures (where the
  SDK has it); the peers: Celery ``delay``/``get``, Huey ``enqueue``/``get(blocking=True)``,
  Dramatiq ``send``/``get_result(block=True)``.
* B: ``--rtt`` sequential submit-and-wait round trips after ``--warmup`` (gpulane
  ``Client.run``): p50/p99/mean.
* T: ``--threads`` threads sharing ``--tasks`` blocking calls (gpulane ``Client.run`` on one
  shared Client): tasks/s.
* and the bulk methods of earlier issues: gpulane ``bulk+list`` / ``bulk+longpoll``, Celery's
  ``group``.

gpulane runs as ``gpulane serve`` (embedded SQLite store or ``--store``, 2 simulated GPUs, one
session worker per GPU) on its durable ``sleep`` preset and on ``sleep-online``
(``durable: false``), where that preset exists. Peers: bench/dispatch_peers.py. Around every
method the server side's CPU is read from /proc: the gpulane node process alone (its workers
apart), the peers' worker processes and redis-server. "Today" is ``--baseline`` (a commit): its
own server and SDK, from ``git archive`` in a temporary folder, run by this script in a child
process with that tree first on ``PYTHONPATH`` (as bench/compare.py runs each side), measured
with A, B and T. Goals (printed and in the JSON, met or MISSED): A >= 1.5x the best peer;
B p50 <= 1.0 ms and p99 below every peer's; T >= 2x the baseline's; node CPU per online
request <= 0.3 ms. Every subprocess is stopped however the run ends.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._util import (
    REPO,
    Proc,
    Procs,
    bulk_then_longpoll,
    child_env,
    chunks,
    latency_summary,
    run_record,
    start_gpulane,
    start_proc,
    stop_on_signals,
    wait_until,
    write_json,
)
from bench.dispatch_methods import (
    EXPECTED_OUTPUT,
    ServerCpu,
    measured,
    method_a,
    method_b,
    method_t,
)
from bench.dispatch_peers import PEERS, bench_peer
from bench.dispatch_report import median_round, report

READY_TIMEOUT_S = 60.0
RESULT_WAIT_S = 30.0
FINAL = frozenset({"succeeded", "failed", "cancelled"})
PRESETS = ("sleep", "sleep-online")
"""gpulane's durable no-op preset and its online twin (durable: false)."""
BASELINE_REV = "dff7ec6"
""""Today" for the T goal: the commit before the hot-path issue (issue 15)."""
BASELINE_TIMEOUT_S = 300.0
"""How long the baseline's child run may take."""

METHODS = {
    "A submit+result": "Client.submit(preset, {'ms': 0}) x N (one POST /v1/tasks each), then "
                       "Client.result(id, wait=30) on each in order",
    "A enqueue": "Client.enqueue(preset, {'ms': 0}) x N (futures; the SDK coalesces them into "
                 "bulk submits), then future.result() on each in order",
    "B": "Client.run(preset, {'ms': 0}), sequential",
    "T": "Client.run(preset, {'ms': 0}) from each of the threads, one shared Client",
    "bulk+list": "Client (sync): POST /v1/tasks/bulk in chunks of {chunk} (submit_many), then "
                 "result(last_id, wait=30), then list(limit=1000) pages until every id is seen; "
                 "any not final is long-polled",
    "bulk+longpoll": "AsyncClient: one coroutine submits chunks of {chunk} with submit_many "
                     "while {concurrency} coroutines await result(id, wait=30) for each id",
    "requests": "server CPU per request: per SDK call a user makes for one task (submit, "
                "result, run); where the SDK coalesces calls (enqueue, threads) fewer HTTP "
                "requests carry them",
}


# --- gpulane -------------------------------------------------------------------------------


def sleep_workers(client: Any, preset: str = "sleep") -> list[dict[str, Any]]:
    return [w for w in client.workers()["workers"] if w["preset"] == preset]


def warm_gpulane(url: str, proc: Proc, warmup: int, preset: str = "sleep") -> list[dict[str, Any]]:
    """Bring up both session workers of ``preset`` (a backlog makes the scheduler start the
    second one), then run ``warmup`` round trips. Returns the workers."""
    from gpulane.client import Client

    with Client(url) as client:
        def both_ready() -> list[dict[str, Any]] | None:
            ids = [t["id"] for t in client.submit_many(
                [{"preset": preset, "input": {"ms": 2}} for _ in range(200)])]
            for tid in ids:
                client.result(tid, wait=RESULT_WAIT_S)
            workers = [w for w in sleep_workers(client, preset)
                       if w["state"] in ("ready", "busy")]
            return workers if len(workers) >= 2 else None

        workers = wait_until(both_ready, timeout=READY_TIMEOUT_S, interval=0.2,
                             what=f"two ready {preset} workers", proc=proc)
        for _ in range(warmup):
            client.run(preset, {"ms": 0})
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


def output_of(task: dict[str, Any]) -> Any:
    """A final task's output; the task's state in its place when it did not succeed."""
    return task.get("output") if task.get("state") == "succeeded" else {"state": task["state"]}


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
        want = set(ids)
        got: dict[str, dict[str, Any]] = {}
        cursor: str | None = None
        pages = 0
        while len(got) < len(want):
            page = client.list(limit=1000, cursor=cursor)
            pages += 1
            got.update((t["id"], t) for t in page["tasks"] if t["id"] in want)
            cursor = page["next_cursor"]
            if cursor is None:
                break
        stragglers = [tid for tid in ids if got.get(tid, {}).get("state") not in FINAL]
        for tid in stragglers:
            got[tid] = client.result(tid, wait=RESULT_WAIT_S)
        elapsed = time.perf_counter() - t0
    return {"elapsed_s": elapsed, "tasks_per_s": n / elapsed, "submit_s": t_submitted - t0,
            "list_pages": pages, "stragglers_long_polled": len(stragglers),
            "check": check_tasks(list(got.values()), n)}


def gpulane_bulk_longpoll(url: str, n: int, chunk: int, concurrency: int) -> dict[str, Any]:
    from gpulane.client import AsyncClient

    async def main() -> dict[str, Any]:
        bodies = [{"preset": "sleep", "input": {"ms": 0}} for _ in range(n)]
        async with AsyncClient(url) as client:
            results, elapsed, _ = await bulk_then_longpoll(client, bodies, chunk, concurrency,
                                                           RESULT_WAIT_S)
        return {"elapsed_s": elapsed, "tasks_per_s": n / elapsed,
                "check": check_tasks(results, n)}

    return asyncio.run(main())


def gpulane_round_trip(url: str, rtt: int, preset: str = "sleep") -> dict[str, Any]:
    from gpulane.client import Client

    samples: list[float] = []
    bad = 0
    with Client(url) as client:
        for _ in range(rtt):
            t0 = time.perf_counter()
            task = client.run(preset, {"ms": 0})
            samples.append(time.perf_counter() - t0)
            bad += task.get("output") != EXPECTED_OUTPUT
    return {**latency_summary(samples), "bad_output": bad}


def gpulane_preset(url: str, node_pid: int, preset: str, args: argparse.Namespace,
                   methods: tuple[str, ...] = ("A", "B", "T")) -> dict[str, Any]:
    """The single-call methods on one preset, with the node's CPU (and its workers')."""
    from gpulane.client import Client

    def worker_pids() -> list[int]:
        with Client(url) as c:
            return [int(w["pid"]) for w in c.workers()["workers"] if w.get("pid")]

    # Workers first: listing them is a request to the node, made before its CPU is read.
    cpu = ServerCpu({"workers": worker_pids, "node": lambda: [node_pid]})
    n, out = args.tasks, {"preset": preset}
    if "A" in methods:
        with Client(url) as client:
            out["A submit+result"] = measured(
                f"gpulane {preset} A submit+result",
                lambda: method_a(lambda: client.submit(preset, {"ms": 0})["id"],
                                 lambda tid: output_of(client.result(tid, wait=RESULT_WAIT_S)),
                                 n), cpu, tasks=n, requests=2 * n)
        if hasattr(Client, "enqueue"):
            with Client(url) as client:
                out["A enqueue"] = measured(
                    f"gpulane {preset} A enqueue",
                    lambda: method_a(lambda: client.enqueue(preset, {"ms": 0}),
                                     lambda fut: output_of(fut.result(timeout=120)), n),
                    cpu, tasks=n)
        else:
            out["A enqueue"] = {"skipped": "n/a: this SDK has no enqueue"}
    if "B" in methods:
        with Client(url) as client:
            out["B"] = measured(f"gpulane {preset} B",
                                lambda: method_b(lambda: output_of(client.run(preset, {"ms": 0})),
                                                 args.rtt), cpu, tasks=args.rtt,
                                requests=args.rtt)
    if "T" in methods:
        with Client(url) as client:
            out["T"] = measured(f"gpulane {preset} T ({args.threads} threads)",
                                lambda: method_t(lambda: output_of(client.run(preset, {"ms": 0})),
                                                 n, args.threads), cpu, tasks=n, requests=n)
    return out


def presets_served(url: str) -> set[str]:
    from gpulane.client import Client
    with Client(url) as client:
        return {p["name"] for p in client.presets()["presets"]}


def bench_gpulane(args: argparse.Namespace, procs: Procs, tmp: Path,
                  log_dir: Path) -> dict[str, dict[str, Any]]:
    """gpulane now: ``{"gpulane": sleep's figures, "gpulane-online": sleep-online's}``."""
    from gpulane.client import Client

    store = ("--store", args.store) if args.store else ()
    proc, url = start_gpulane(procs, tmp / "gpulane-data", log_dir, *store)
    served = presets_served(url)
    presets = [p for p in PRESETS if p in served]
    print(f"gpulane: serving at {url} (pid {proc.pid}); warming up {', '.join(presets)}",
          flush=True)
    workers = {p: warm_gpulane(url, proc, args.warmup, p) for p in presets}
    out: dict[str, dict[str, Any]] = {}
    for preset in presets:
        res = gpulane_preset(url, proc.pid, preset, args)
        res["workers_after_warmup"] = workers[preset]
        out["gpulane" if preset == "sleep" else "gpulane-online"] = res
    if "sleep-online" not in served:
        out["gpulane-online"] = {"skipped": "n/a: this server has no sleep-online preset"}
    g = out["gpulane"]
    g.update(url=url, store=args.store or "sqlite (the node's own)", throughput={})
    g["round_trip"] = g["B"]  # the key bench/compare.py reads
    cpu = ServerCpu({"node": lambda: [proc.pid]})
    g["throughput"]["bulk+list"] = measured(
        "gpulane bulk+list", lambda: gpulane_bulk_list(url, args.tasks, args.chunk), cpu,
        tasks=args.tasks)
    if not args.skip_slow:
        g["throughput"]["bulk+longpoll"] = measured(
            "gpulane bulk+longpoll",
            lambda: gpulane_bulk_longpoll(url, args.tasks, args.chunk, args.concurrency), cpu,
            tasks=args.tasks)
    with Client(url) as client:
        g["workers_at_end"] = sleep_workers(client)
    return out


# --- today: the baseline commit, its own server and SDK ---------------------------------------


def bench_baseline(args: argparse.Namespace, procs: Procs, tmp: Path,
                   log_dir: Path) -> dict[str, Any]:
    """A, B and T on ``--baseline``'s own server and SDK, run in a child process."""
    commit = args.baseline_commit
    tree = tmp / "baseline"
    tree.mkdir()
    archive = subprocess.run(["git", "-C", str(REPO), "archive", commit, "src", "examples"],
                             check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    out_json = tmp / "baseline.json"
    argv = [sys.executable, str(Path(__file__).resolve()), "--baseline-child",
            "--out", str(out_json), "--tasks", str(args.tasks), "--rtt", str(args.rtt),
            "--warmup", str(args.warmup), "--threads", str(args.threads)]
    # Always its own SQLite: an old node on --store's Redis would meet this run's keys there.
    env = child_env()
    env["PYTHONPATH"] = os.pathsep.join([str(tree / "src"), env["PYTHONPATH"]])
    print(f"gpulane @ {commit[:7]} (today's baseline): its own server and SDK", flush=True)
    child = procs.add(start_proc("baseline", argv, log_dir=log_dir, env=env, cwd=tree))
    try:
        child.popen.wait(BASELINE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        child.stop()
    print(child.tail(), flush=True)
    if child.popen.returncode != 0 or not out_json.exists():
        return {"commit": commit, "error": f"exit {child.popen.returncode}: {child.tail(8)}"}
    data: dict[str, Any] = json.loads(out_json.read_text())
    return {"commit": commit, **data}


def baseline_child(args: argparse.Namespace) -> int:
    """In the child: whatever gpulane PYTHONPATH gives (the baseline's), served and driven."""
    import httpx

    import gpulane

    tmp = Path(tempfile.mkdtemp(prefix="gpulane-baseline-"))
    (tmp / "logs").mkdir()
    with Procs() as procs:
        proc, url = start_gpulane(procs, tmp / "data", tmp / "logs")
        # Proof this is the old server: it has no POST /v1/tasks/results (issue 15).
        probe = httpx.post(f"{url}/v1/tasks/results", json={"ids": ["x"]}).status_code
        warm_gpulane(url, proc, args.warmup)
        res = gpulane_preset(url, proc.pid, "sleep", args)
    shutil.rmtree(tmp, ignore_errors=True)
    write_json(args.out, {"sdk_module": gpulane.__file__, "results_route_status": probe,
                          "store": "sqlite (the node's own)", **res})
    return 0


# --- the run -------------------------------------------------------------------------------


def run_round(args: argparse.Namespace, order: list[str], procs: Procs, tmp: Path,
              log_dir: Path) -> dict[str, Any]:
    """Every system once, one at a time on the machine, each started fresh."""
    tmp.mkdir()
    results: dict[str, Any] = {}
    for system in order:
        if system == "gpulane":
            results.update(bench_gpulane(args, procs, tmp, log_dir))
        elif system == "baseline":
            results["baseline"] = bench_baseline(args, procs, tmp, log_dir)
        else:
            results[system] = res = bench_peer(
                PEERS[system](), procs, log_dir, tasks=args.tasks, rtt=args.rtt,
                warmup=args.warmup, threads=args.threads)
            res["round_trip"] = res["B"]  # the key bench/compare.py reads
        procs.stop_all()  # one system at a time on the machine
    return results


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--tasks", type=int, default=5000, help="tasks per throughput run (A, T)")
    p.add_argument("--rtt", type=int, default=500, help="measured round trips (B)")
    p.add_argument("--warmup", type=int, default=50, help="unmeasured round trips first")
    p.add_argument("--threads", type=int, default=64, help="threads calling run() (T)")
    p.add_argument("--chunk", type=int, default=500, help="gpulane tasks per bulk submit")
    p.add_argument("--concurrency", type=int, default=8,
                   help="gpulane long-polls in flight (bulk+longpoll method)")
    p.add_argument("--skip-slow", action="store_true",
                   help="skip gpulane's per-task long-poll method (bulk+longpoll)")
    p.add_argument("--rounds", type=int, default=1,
                   help="runs of every system, the order flipping each round; each figure is "
                        "the median round's")
    p.add_argument("--peers", default=",".join(PEERS),
                   help="comma-separated peers to measure, of: " + ", ".join(PEERS))
    p.add_argument("--baseline", default=BASELINE_REV, metavar="REV",
                   help="the commit measured as today's (A, B, T: its own server and SDK)")
    p.add_argument("--no-baseline", action="store_true", help="skip the baseline commit")
    p.add_argument("--store", default=None, metavar="URL",
                   help="the gpulane node's store, e.g. redis://127.0.0.1:6379/0 "
                        "[its own SQLite]")
    p.add_argument("--gpulane-only", action="store_true",
                   help="measure this gpulane alone: no peers, no baseline, no goals")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "dispatch.json",
                   help="where to write the JSON (and the markdown table beside it, .md)")
    p.add_argument("--keep-logs", action="store_true", help="keep the servers' logs")
    p.add_argument("--check-goals", action="store_true",
                   help="exit with status 1 when a goal is missed")
    p.add_argument("--baseline-child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if min(args.tasks, args.rtt, args.chunk, args.concurrency, args.threads,
           args.rounds) < 1 or args.warmup < 0:
        p.error("--tasks, --rtt, --threads, --rounds, --chunk and --concurrency must be >= 1, "
                "--warmup >= 0")
    args.peer_names = [] if args.gpulane_only else [x for x in args.peers.split(",") if x]
    args.baseline_commit = None
    if not (args.gpulane_only or args.no_baseline or args.baseline_child):
        found = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--verify", "--quiet",
                                f"{args.baseline}^{{commit}}"], capture_output=True, text=True)
        if found.returncode != 0:
            p.error(f"--baseline {args.baseline!r}: no such commit in {REPO}; give a commit "
                    "(e.g. dff7ec6) or --no-baseline")
        args.baseline_commit = found.stdout.strip()
    unknown = set(args.peer_names) - set(PEERS)
    if unknown:
        p.error(f"--peers: unknown {', '.join(sorted(unknown))}; known: {', '.join(PEERS)}")
    return args


def _exit_code(exc: BaseException) -> int:
    if isinstance(exc, SystemExit):
        return exc.code if isinstance(exc.code, int) else 1
    return 130 if isinstance(exc, KeyboardInterrupt) else 1


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    stop_on_signals()
    if args.baseline_child:
        return baseline_child(args)
    tmp = Path(tempfile.mkdtemp(prefix="gpulane-bench-"))
    log_dir = tmp / "logs"
    log_dir.mkdir()
    started = time.time()
    load_start = list(os.getloadavg())
    systems = ["gpulane", *([] if args.gpulane_only or args.no_baseline else ["baseline"]),
               *args.peer_names]
    rounds: list[dict[str, Any]] = []
    try:
        with Procs() as procs:  # every server is stopped here, however the block ends
            for i in range(args.rounds):
                # The order flips each round, so a drift of the machine weighs on all alike.
                order = systems if i % 2 == 0 else systems[::-1]
                if args.rounds > 1:
                    print(f"round {i + 1}/{args.rounds}: {', '.join(order)}", flush=True)
                rounds.append(run_round(args, order, procs, tmp / f"round{i}", log_dir))
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
    results = median_round(rounds)
    summary = report(results, args)
    data = {
        **run_record("dispatch", "bench/dispatch.py", argv, started, load_start),
        "parameters": {"tasks": args.tasks, "rtt": args.rtt, "warmup": args.warmup,
                       "rounds": args.rounds,
                       "threads": args.threads, "chunk": args.chunk,
                       "concurrency": args.concurrency, "peers": args.peer_names,
                       "baseline": None if args.no_baseline or args.gpulane_only
                       else args.baseline,
                       "task": "sleep(ms=0): a no-op returning {'slept_ms': 0}",
                       "gpulane_node": "gpulane serve --simulate-gpus 2x24GiB, "
                                       f"{args.store or 'SQLite'} store, 2 session workers "
                                       "per preset (batch max 64)"},
        "methods": {k: v.replace("{chunk}", str(args.chunk)).replace(
            "{concurrency}", str(args.concurrency)) for k, v in METHODS.items()},
        **summary,
        "results": results,
    }
    write_json(args.out, data)
    args.out.with_suffix(".md").write_text(summary["markdown"] + "\n")
    print(f"\nwrote {args.out} and {args.out.with_suffix('.md')}")
    return 1 if args.check_goals and not summary["all_goals_met"] else 0


if __name__ == "__main__":
    sys.exit(main())
