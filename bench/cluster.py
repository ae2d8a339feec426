"""Fleet benchmark: nodes on one Redis, on this machine, in one run.

    .venv/bin/python bench/cluster.py [--scenario scale|store|kill|all] [--workers 4]
        [--ms 20] [--tasks-per-node 400] [--tasks 3000] [--rtt 300] [--rounds 2]
        [--node-ttl 5] [--out bench/results/cluster.json]

Every node is ``gpulane serve --store redis://127.0.0.1:PORT/0 --node-name nX`` with its own
data dir and one simulated 24 GiB GPU, on a private ``redis-server`` without
persistence. The preset ``fleet-sleep`` is the example sleep worker with ``--workers``
replicas per node, one task per worker at a time (batch size 1): its work is sleeping, not
CPU, so a fleet's throughput is bounded by its workers, not by this machine's two cores.

* scale: ``--tasks-per-node`` x N tasks of ``--ms`` ms on 1, 2 and 3 nodes (fresh nodes and
  an emptied Redis each time, every node's workers warm first), from the first submit until
  none is queued or running, by three paths users take: ``bulk`` (submit_many in chunks of
  200 through each node), ``submit-loop`` (one submit() per task from a loop, a thread per
  node) and ``run-threads`` (2 x workers x N threads calling run(), each on one node). Goal:
  3 nodes >= 2.5x one node's tasks/s.
* store: one node on Redis against one on SQLite in the same sitting, with bench/dispatch.py's
  methods (bulk+list, bulk+longpoll, round trip of ``sleep`` ms 0), ``--rounds`` times each,
  alternating; the best round counts. Goals: Redis >= 0.8x SQLite's tasks/s, round-trip p50
  within 0.5 ms of SQLite's.
* kill: three nodes with ``--node-ttl``; long tasks spread over them while short ones keep
  coming; one node is killed -9 while it runs some of the long ones. Measured: the time from
  the kill until the last of its tasks is running on another node. Goal: node TTL + 1 s.

Prints a table per scenario and writes ``--out`` as JSON. Every process is stopped however
the run ends.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._util import (
    REPO,
    CpuMeter,
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
from bench.dispatch import (
    gpulane_bulk_list,
    gpulane_bulk_longpoll,
    gpulane_round_trip,
    warm_gpulane,
)

PRESET = "fleet-sleep"
"""The benchmark's preset (written into the run's folder: its replicas are --workers)."""
PRESET_YAML = """presets:
  - name: {name}
    argv: [python, {worker}]
    mode: session
    devices: [gpu]
    vram_mb: 256
    replicas: {workers}
    batch: {{max_size: 1, max_wait_ms: 0}}
    idle_unload_s: 600
    start_timeout_s: 30
    timeout_s: 120
"""
SLEEP_WORKER = REPO / "examples" / "presets" / "workers" / "sleep_worker.py"
READY_TIMEOUT_S = 60.0
"""How long a node (or redis-server) may take to answer after its start."""
DRAIN_TIMEOUT_S = 300.0
"""How long a measured run may take to empty its queues before it counts as failed."""
BULK_CHUNK = 200
"""Tasks per bulk submit in the scale scenario."""
KILL_LONG_MS = 10_000
"""The long tasks of the kill scenario: still running when they are taken over."""
KILL_LOAD_PER_S = 50.0
"""Short tasks a second submitted meanwhile in the kill scenario (the load)."""


# --- the fleet ------------------------------------------------------------------------------


class Fleet:
    """A private redis-server and the nodes started on it (names n1, n2, ...)."""

    def __init__(self, procs: Procs, tmp: Path, workers: int, node_ttl_s: float) -> None:
        self.procs, self.tmp, self.node_ttl_s = procs, tmp, node_ttl_s
        self.presets = tmp / "fleet-presets.yaml"
        self.presets.write_text(PRESET_YAML.format(name=PRESET, worker=SLEEP_WORKER,
                                                   workers=workers))
        self.workers = workers
        self.redis_url = ""
        self.nodes: dict[str, tuple[Any, str]] = {}
        self.starts = 0

    def start_redis(self) -> str:
        import redis

        port = free_port()
        proc = self.procs.add(start_proc(
            "redis", ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                      "--appendonly", "no"], log_dir=self.tmp))
        self.redis_url = f"redis://127.0.0.1:{port}/0"

        def pong() -> bool:
            with redis.Redis.from_url(self.redis_url, socket_timeout=1) as r:
                return bool(r.ping())

        wait_until(pong, timeout=READY_TIMEOUT_S, what="redis-server PING", proc=proc)
        return self.redis_url

    def flush(self) -> None:
        import redis

        with redis.Redis.from_url(self.redis_url, socket_timeout=5) as r:
            r.flushall()

    def used_memory(self) -> int:
        """Bytes Redis holds for data now (INFO memory: used_memory)."""
        import redis

        with redis.Redis.from_url(self.redis_url, socket_timeout=5) as r:
            return int(r.info("memory")["used_memory"])

    def start_nodes(self, count: int) -> list[str]:
        """Start ``count`` nodes at once; their URLs once every one is ready."""
        started = []
        for i in range(count):
            self.starts += 1
            name = f"n{i + 1}"
            port = free_port()
            argv = [sys.executable, "-m", "gpulane", "serve", "--store", self.redis_url,
                    "--node-name", name, "--advertise-url", f"http://127.0.0.1:{port}",
                    "--data-dir", str(self.tmp / f"{name}-{self.starts}"), "--port", str(port),
                    "--simulate-gpus", "1x24GiB", "--no-examples", "--presets",
                    str(self.presets), "--log-level", "warning"]
            env = child_env(GPULANE_NODE_TTL_S=str(self.node_ttl_s))
            proc = self.procs.add(start_proc(f"{name}-{self.starts}", argv, log_dir=self.tmp,
                                             env=env))
            self.nodes[name] = (proc, f"http://127.0.0.1:{port}")
            started.append(name)
        for name in started:
            proc, url = self.nodes[name]
            wait_until(lambda url=url: httpx.get(f"{url}/readyz", timeout=2).status_code == 200,
                       timeout=READY_TIMEOUT_S, what=f"{name} /readyz", proc=proc)
        return [self.nodes[n][1] for n in started]

    def stop_nodes(self) -> None:
        for proc, _ in self.nodes.values():
            proc.stop()
        self.nodes.clear()

    def warm(self, urls: list[str]) -> None:
        """Until every node has its --workers fleet-sleep workers up."""
        def ready_workers(url: str) -> int:
            workers = httpx.get(f"{url}/v1/workers", timeout=5).json()["workers"]
            return sum(w["preset"] == PRESET and w["state"] in ("ready", "busy")
                       for w in workers)

        def warm() -> bool:
            for url in urls:
                submit_bulk(url, 2 * self.workers * len(urls), 50)
            wait_drained(urls[0])
            return all(ready_workers(u) >= self.workers for u in urls)

        wait_until(warm, timeout=READY_TIMEOUT_S * 2, interval=0,
                   what="every node's workers up")


def submit_bulk(url: str, n: int, ms: int) -> list[str]:
    from gpulane.client import Client

    ids: list[str] = []
    with Client(url) as client:
        for part in chunks(range(n), BULK_CHUNK):
            ids += [t["id"] for t in client.submit_many(
                [{"preset": PRESET, "input": {"ms": ms}} for _ in part])]
    return ids


def wait_drained(url: str, interval: float = 0.02) -> None:
    """Until no fleet-sleep task is queued or running, fleet-wide."""
    with httpx.Client(base_url=url, timeout=10) as http:
        def empty() -> bool:
            return not any(http.get("/v1/tasks", params={"state": s, "preset": PRESET,
                                                         "limit": 1}).json()["tasks"]
                           for s in ("queued", "running"))

        wait_until(empty, timeout=DRAIN_TIMEOUT_S, interval=interval,
                   what="the queues to empty")


def count_states(url: str) -> dict[str, int]:
    """Tasks of the preset in each final state, read page by page (not timed)."""
    out: dict[str, int] = {}
    with httpx.Client(base_url=url, timeout=30) as http:
        for state in ("succeeded", "failed", "cancelled"):
            n, cursor = 0, None
            while True:
                params: dict[str, Any] = {"state": state, "preset": PRESET, "limit": 1000}
                if cursor:
                    params["cursor"] = cursor
                page = http.get("/v1/tasks", params=params).json()
                n += len(page["tasks"])
                cursor = page.get("next_cursor")
                if not cursor:
                    break
            out[state] = n
    return out


# --- scale-out ------------------------------------------------------------------------------


def shares(n: int, urls: list[str]) -> list[int]:
    """``n`` tasks split over the nodes as evenly as they go."""
    return [n // len(urls) + (i < n % len(urls)) for i in range(len(urls))]


def path_bulk(urls: list[str], n: int, ms: int) -> dict[str, Any]:
    with ThreadPoolExecutor(len(urls)) as pool:
        list(pool.map(lambda a: submit_bulk(*a, ms), zip(urls, shares(n, urls), strict=True)))
    return {}


def path_submit_loop(urls: list[str], n: int, ms: int) -> dict[str, Any]:
    from gpulane.client import Client

    def loop(url: str, count: int) -> None:
        with Client(url) as client:
            for _ in range(count):
                client.submit(PRESET, {"ms": ms})

    with ThreadPoolExecutor(len(urls)) as pool:
        list(pool.map(lambda a: loop(*a), zip(urls, shares(n, urls), strict=True)))
    return {}


def path_run_threads(urls: list[str], n: int, ms: int, threads: int) -> dict[str, Any]:
    from gpulane.client import Client

    left = [n]
    lock = threading.Lock()
    samples: list[float] = []

    def worker(i: int) -> None:
        with Client(urls[i % len(urls)]) as client:
            while True:
                with lock:
                    if left[0] <= 0:
                        return
                    left[0] -= 1
                t0 = time.perf_counter()
                client.run(PRESET, {"ms": ms})
                with lock:
                    samples.append(time.perf_counter() - t0)

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(worker, range(threads)))
    return {"threads": threads, "latency": latency_summary(samples)}


def scale(fleet: Fleet, args: argparse.Namespace) -> dict[str, Any]:
    paths: dict[str, Callable[[list[str], int, int], dict[str, Any]]] = {
        "bulk": path_bulk,
        "submit-loop": path_submit_loop,
        "run-threads": lambda urls, n, ms: path_run_threads(urls, n, ms,
                                                            2 * args.workers * len(urls)),
    }
    out: dict[str, Any] = {"paths": {p: {} for p in paths}}
    for count in (1, 2, 3):
        fleet.flush()
        empty_bytes = fleet.used_memory()
        urls = fleet.start_nodes(count)
        try:
            fleet.warm(urls)
            for name, fn in paths.items():
                n = args.tasks_per_node * count
                before = count_states(urls[0])
                meter = CpuMeter()
                t0 = time.perf_counter()
                extra = fn(urls, n, args.ms)
                wait_drained(urls[0])
                elapsed = time.perf_counter() - t0
                after = count_states(urls[0])
                done = {k: after[k] - before[k] for k in after}
                row = {"nodes": count, "tasks": n, "elapsed_s": round(elapsed, 3),
                       "tasks_per_s": round(n / elapsed, 1), "states": done,
                       "ok": done["succeeded"] == n and done["failed"] == 0,
                       "ideal_tasks_per_s": round(count * args.workers * 1000 / args.ms, 1),
                       "noise": meter.stop(), **extra}
                out["paths"][name][str(count)] = row
                print(f"  scale {name}, {count} node(s): {row['tasks_per_s']:,.0f} tasks/s "
                      f"({elapsed:.2f} s, {row['states']})", flush=True)
            # Sizing: what every finished task (hash, events, listings) keeps in Redis.
            kept = sum(count_states(urls[0]).values())
            used = fleet.used_memory() - empty_bytes
            out["redis_memory"] = {"nodes": count, "finished_tasks": kept, "used_bytes": used,
                                   "bytes_per_task": round(used / max(kept, 1))}
        finally:
            fleet.stop_nodes()
    rows = []
    for name, by_count in out["paths"].items():
        one, three = by_count["1"]["tasks_per_s"], by_count["3"]["tasks_per_s"]
        rows.append([name, one, by_count["2"]["tasks_per_s"], three, three / one])
    headers = ["path", "1 node tasks/s", "2 nodes", "3 nodes", "3 / 1"]
    print()
    out["table"] = print_table(headers, rows)
    out["markdown"] = markdown_table(headers, rows)
    best = max(r[4] for r in rows)
    out["goal"] = {"goal": "3 nodes >= 2.5x one node's tasks/s", "best_ratio": best,
                   "ratios": {r[0]: r[4] for r in rows}, "met": best >= 2.5}
    return out


# --- Redis against SQLite -------------------------------------------------------------------


def store(fleet: Fleet, tmp: Path, args: argparse.Namespace) -> dict[str, Any]:
    runs: dict[str, list[dict[str, Any]]] = {"sqlite": [], "redis": []}
    for r in range(args.rounds):
        for kind in ("sqlite", "redis"):
            fleet.flush()
            extra = ("--store", fleet.redis_url) if kind == "redis" else ()
            with Procs() as sub:  # one node at a time on the machine
                proc, url = start_gpulane(sub, tmp / f"store-{kind}-{r}", tmp, *extra,
                                          name=f"store-{kind}-{r}")
                warm_gpulane(url, proc, 50)
                meter = CpuMeter()
                res = {"bulk+list": gpulane_bulk_list(url, args.tasks, 500),
                       "bulk+longpoll": gpulane_bulk_longpoll(url, args.tasks, 500, 8),
                       "round_trip": gpulane_round_trip(url, args.rtt), "noise": meter.stop()}
            for m in ("bulk+list", "bulk+longpoll"):
                if not res[m]["check"]["ok"]:
                    raise RuntimeError(f"{kind} {m}: wrong results {res[m]['check']}")
            runs[kind].append(res)
            print(f"  store {kind} round {r + 1}: bulk+list "
                  f"{res['bulk+list']['tasks_per_s']:,.0f} tasks/s, bulk+longpoll "
                  f"{res['bulk+longpoll']['tasks_per_s']:,.0f} tasks/s, round trip p50 "
                  f"{res['round_trip']['p50_ms']:.2f} ms", flush=True)
    best = {kind: {"bulk+list": max(x["bulk+list"]["tasks_per_s"] for x in rs),
                   "bulk+longpoll": max(x["bulk+longpoll"]["tasks_per_s"] for x in rs),
                   "p50_ms": min(x["round_trip"]["p50_ms"] for x in rs),
                   "p99_ms": min(x["round_trip"]["p99_ms"] for x in rs)}
            for kind, rs in runs.items()}
    s, r_ = best["sqlite"], best["redis"]
    ratio = r_["bulk+list"] / s["bulk+list"]
    longpoll_ratio = r_["bulk+longpoll"] / s["bulk+longpoll"]
    p50_delta = r_["p50_ms"] - s["p50_ms"]
    headers = ["store", "bulk+list tasks/s", "bulk+longpoll tasks/s", "p50 ms", "p99 ms"]
    rows = [[k, b["bulk+list"], b["bulk+longpoll"], b["p50_ms"], b["p99_ms"]]
            for k, b in best.items()]
    print()
    table = print_table(headers, rows)
    return {"runs": runs, "best": best, "table": table, "markdown": markdown_table(headers, rows),
            "goals": {"throughput": {"goal": "Redis >= 0.8x SQLite tasks/s (bulk+list)",
                                     "ratio": ratio, "longpoll_ratio": longpoll_ratio,
                                     "met": ratio >= 0.8},
                      "p50": {"goal": "Redis round-trip p50 within 0.5 ms of SQLite's",
                              "delta_ms": p50_delta, "met": p50_delta <= 0.5}}}


# --- a node killed -9 -----------------------------------------------------------------------


def kill(fleet: Fleet, args: argparse.Namespace) -> dict[str, Any]:
    from gpulane.client import Client

    fleet.flush()
    urls = fleet.start_nodes(3)
    victim_name = "n3"
    victim, _ = fleet.nodes[victim_name]
    stop = threading.Event()

    def load() -> None:  # short tasks keep coming through n1
        with Client(urls[0]) as client:
            while not stop.wait(1 / KILL_LOAD_PER_S):
                with contextlib.suppress(Exception):
                    client.submit(PRESET, {"ms": args.ms})

    try:
        fleet.warm(urls)
        loader = threading.Thread(target=load, daemon=True)
        loader.start()
        with httpx.Client(base_url=urls[0], timeout=10) as http:
            # Two nodes' workers and two more: n1 (the one they are sent to) and n2 could
            # take up to 2 x workers between them, so n3 always runs at least two.
            long_ids = [t["id"] for t in http.post("/v1/tasks/bulk", json={"tasks": [
                {"preset": PRESET, "input": {"ms": KILL_LONG_MS}}
                for _ in range(2 * args.workers + 2)]}).json()["tasks"]]

            def victims() -> list[str] | None:
                tasks = [http.get(f"/v1/tasks/{i}").json() for i in long_ids]
                on = [t["id"] for t in tasks if t["state"] == "running"
                      and t["placement"]["node"] == victim_name]
                return on or None

            held = wait_until(victims, timeout=60, what="n3 running a long task")
            os.kill(victim.pid, signal.SIGKILL)
            killed_at = time.monotonic()
            victim.popen.wait(10)
            moved: dict[str, float] = {}
            while len(moved) < len(held) and time.monotonic() - killed_at < 120:
                for task_id in held:
                    if task_id in moved:
                        continue
                    t = http.get(f"/v1/tasks/{task_id}").json()
                    if t["state"] != "queued" and (t["placement"] or {}).get("node") not in (
                            None, victim_name):
                        moved[task_id] = round(time.monotonic() - killed_at, 3)
                time.sleep(0.02)
        stop.set()
        loader.join(10)
        wait_drained(urls[0])
        states = count_states(urls[0])
    finally:
        stop.set()
        fleet.stop_nodes()
    worst = max(moved.values()) if len(moved) == len(held) else None
    goal_s = args.node_ttl + 1
    out = {"node_ttl_s": args.node_ttl, "victim_tasks": len(held), "moved_after_s": moved,
           "last_running_elsewhere_s": worst, "states_at_end": states,
           "goal": {"goal": f"<= node TTL + 1 s = {goal_s:g} s", "met": worst is not None
                    and worst <= goal_s}}
    print()
    out["table"] = print_table(["figure", "value"], [
        ["node TTL s", args.node_ttl], ["tasks running on the killed node", len(held)],
        ["kill -> last of them running elsewhere, s", worst if worst is not None else "never"],
        ["goal", out["goal"]["goal"]], ["failed tasks at the end", states["failed"]]])
    return out


# --- the command ----------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--scenario", choices=["scale", "store", "kill", "all"], default="all")
    p.add_argument("--workers", type=int, default=4, help="fleet-sleep workers per node")
    p.add_argument("--ms", type=int, default=20, help="each scale task sleeps this long")
    p.add_argument("--tasks-per-node", type=int, default=400, help="scale: tasks per node")
    p.add_argument("--tasks", type=int, default=3000, help="store: tasks per throughput run")
    p.add_argument("--rtt", type=int, default=300, help="store: measured round trips")
    p.add_argument("--rounds", type=int, default=2, help="store: rounds per store")
    p.add_argument("--node-ttl", type=float, default=5.0, help="kill: the nodes' TTL, s")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "cluster.json")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    stop_on_signals()
    started, load = time.time(), list(os.getloadavg())
    record: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="gpulane-cluster-") as tmp, Procs() as procs:
        fleet = Fleet(procs, Path(tmp), args.workers, args.node_ttl)
        fleet.start_redis()
        if args.scenario in ("scale", "all"):
            print("scale-out", flush=True)
            record["scale"] = scale(fleet, args)
        if args.scenario in ("store", "all"):
            print("\nRedis store against SQLite, one node", flush=True)
            record["store"] = store(fleet, Path(tmp), args)
        if args.scenario in ("kill", "all"):
            print("\na node killed -9 under load", flush=True)
            record["kill"] = kill(fleet, args)
    goals = {k: v.get("goal") or v.get("goals") for k, v in record.items()}
    print(f"\ngoals: {goals}")
    params = {"workers_per_node": args.workers, "ms": args.ms,
              "tasks_per_node": args.tasks_per_node, "tasks": args.tasks, "rtt": args.rtt,
              "rounds": args.rounds, "node_ttl_s": args.node_ttl,
              "node": "gpulane serve --store redis://127.0.0.1:PORT/0 --simulate-gpus 1x24GiB, "
                      f"preset {PRESET}: {args.workers} sleep workers, batch size 1",
              "store_node": "bench/dispatch.py's node: 2 simulated GPUs, preset sleep"}
    write_json(args.out, {**run_record("cluster", "bench/cluster.py", argv, started, load),
                          "parameters": params, **record})
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
