"""The online lane against the durable one: ``sleep-online`` (``durable: false``) vs ``sleep``.

    .venv/bin/python bench/online_lane.py [--rounds 5] [--calls 1000] [--threads 64]
        [--thread-calls 3000] [--out bench/results/online_lane.json]

One fresh ``gpulane serve`` (2 simulated GPUs, the example presets), both presets' workers
warmed. Then ``--rounds`` rounds, each running, for ``sleep`` then ``sleep-online`` (the
order alternates per round, so drift in the machine's load falls on both):

* B: ``--calls`` sequential ``Client.run(preset, {"ms": 0})`` round trips, each timed;
* T: ``--threads`` threads sharing ``--thread-calls`` ``Client.run`` calls.

The node's CPU (user + system of the ``gpulane serve`` process, from /proc) is read around
each; the table shows per preset the medians over rounds of B's p50/p99, node CPU per round
trip, T's throughput and node CPU per task, and the spread (min-max) of B's p50. Every
answer is checked (state succeeded). The sleep workers' CPU is not the node's and is not
counted.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._util import (
    CpuMeter,
    Procs,
    percentile,
    print_table,
    run_record,
    start_gpulane,
    stop_on_signals,
    wait_until,
    write_json,
)

PRESETS = ("sleep", "sleep-online")
"""The durable example preset and its online twin (examples/presets/sleep-online.yaml)."""


def node_cpu_s(pid: int) -> float:
    """User + system CPU seconds of one process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def warm(url: str, proc: Any) -> None:
    """Both presets' workers up (a backlog brings the second GPU's), then round trips."""
    from gpulane.client import Client

    with Client(url) as client:
        for preset in PRESETS:
            def ready(preset: str = preset) -> bool | None:
                ids = [t["id"] for t in client.submit_many(
                    [{"preset": preset, "input": {"ms": 2}} for _ in range(200)])]
                for tid in ids:
                    client.result(tid, wait=30)
                workers = [w for w in client.workers()["workers"]
                           if w["preset"] == preset and w["state"] in ("ready", "busy")]
                return True if len(workers) >= 2 else None

            wait_until(ready, timeout=60, interval=0.2, what=f"two {preset} workers", proc=proc)
            for _ in range(100):
                client.run(preset, {"ms": 0})


def method_b(url: str, pid: int, preset: str, calls: int) -> dict[str, float]:
    from gpulane.client import Client

    times = []
    with Client(url) as client:
        cpu0 = node_cpu_s(pid)
        for _ in range(calls):
            t = time.perf_counter()
            task = client.run(preset, {"ms": 0})
            times.append(time.perf_counter() - t)
            assert task["state"] == "succeeded", task
        cpu = node_cpu_s(pid) - cpu0
    return {"p50_ms": percentile(times, 50) * 1000, "p99_ms": percentile(times, 99) * 1000,
            "node_cpu_ms": cpu / calls * 1000}


def threads_run(url: str, pid: int, preset: str, threads: int, calls: int) -> dict[str, float]:
    from gpulane.client import Client

    left = [calls]
    lock = threading.Lock()
    bad: list[Any] = []
    client = Client(url)

    def work() -> None:
        while True:
            with lock:
                if left[0] <= 0:
                    return
                left[0] -= 1
            task = client.run(preset, {"ms": 0})
            if task["state"] != "succeeded":
                bad.append(task)

    cpu0, t0 = node_cpu_s(pid), time.perf_counter()
    pool = [threading.Thread(target=work) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    wall, cpu = time.perf_counter() - t0, node_cpu_s(pid) - cpu0
    client.close()
    assert not bad, bad[:3]
    return {"per_s": calls / wall, "node_cpu_ms": cpu / calls * 1000}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=64)
    parser.add_argument("--thread-calls", type=int, default=3000)
    parser.add_argument("--out", type=Path,
                        default=Path(__file__).parent / "results" / "online_lane.json")
    args = parser.parse_args()
    stop_on_signals()
    started, load = time.time(), list(os.getloadavg())
    rounds: list[dict[str, Any]] = []
    with Procs() as procs:
        tmp = Path(tempfile.mkdtemp(prefix="gpulane-online-"))
        (tmp / "logs").mkdir()
        proc, url = start_gpulane(procs, tmp / "data", tmp / "logs")
        warm(url, proc)
        for i in range(args.rounds):
            order = PRESETS if i % 2 == 0 else PRESETS[::-1]
            for preset in order:
                meter = CpuMeter()
                b = method_b(url, proc.pid, preset, args.calls)
                t = threads_run(url, proc.pid, preset, args.threads, args.thread_calls)
                rounds.append({"round": i, "preset": preset, "b": b, "threads": t,
                               "noise": meter.stop()})
                print(f"round {i} {preset}: B p50 {b['p50_ms']:.2f} ms, node "
                      f"{b['node_cpu_ms']:.3f} ms/run; {args.threads} threads "
                      f"{t['per_s']:,.0f}/s, node {t['node_cpu_ms']:.3f} ms/task", flush=True)
    rows, summary = [], {}
    for preset in PRESETS:
        mine = [r for r in rounds if r["preset"] == preset]

        def med(part: str, key: str, mine: list[dict[str, Any]] = mine) -> float:
            return statistics.median(r[part][key] for r in mine)

        p50s = [r["b"]["p50_ms"] for r in mine]
        summary[preset] = {"b_p50_ms": med("b", "p50_ms"), "b_p99_ms": med("b", "p99_ms"),
                           "b_node_cpu_ms": med("b", "node_cpu_ms"),
                           "threads_per_s": med("threads", "per_s"),
                           "threads_node_cpu_ms": med("threads", "node_cpu_ms"),
                           "b_p50_spread_ms": [min(p50s), max(p50s)]}
        s = summary[preset]
        rows.append([preset, f"{s['b_p50_ms']:.2f}", f"{s['b_p99_ms']:.2f}",
                     f"{s['b_node_cpu_ms']:.3f}", f"{s['threads_per_s']:,.0f}",
                     f"{s['threads_node_cpu_ms']:.3f}",
                     f"{min(p50s):.2f}-{max(p50s):.2f}"])
    print_table(["preset", "B p50 ms", "B p99 ms", "node CPU ms/run (B)",
                       f"{args.threads} threads run()/s", "node CPU ms/task (threads)",
                       "B p50 spread"], rows)
    write_json(args.out, {**run_record("online_lane", "bench/online_lane.py", None, started,
                                       load),
                          "params": vars(args) | {"out": str(args.out)},
                          "summary": summary, "rounds": rounds})


if __name__ == "__main__":
    main()
