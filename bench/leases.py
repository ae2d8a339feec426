"""Lease benchmark: how fast a lease is granted, and how many grants a contended node makes.

    .venv/bin/python bench/leases.py [--n 500] [--clients 32] [--seconds 5]
                                     [--out bench/results/leases.json]

Starts ``gpulane serve`` on 2 simulated 24 GiB GPUs as a subprocess, then:

1. Grant latency on an idle node: ``--n`` sequential acquire + release pairs over one
   keep-alive ``httpx.Client``; the latency is the acquire call (POST /v1/leases, 201).
   Goal: p50 <= 2 ms.
2. Grants per second under contention: ``--clients`` threads, each looping acquire 12 GiB
   (wait_s=30) / release for ``--seconds``; 2x24 GiB holds at most 4 such leases at once.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._util import (
    REPO,
    CpuMeter,
    Procs,
    git_info,
    latency_summary,
    machine_info,
    print_table,
    start_gpulane,
    write_json,
)

GOAL_P50_MS = 2.0


def start_server(procs: Procs, tmp: Path) -> str:
    return start_gpulane(procs, tmp / "data", tmp)[1]


def acquire(http: httpx.Client, holder: str, vram_mb: int, wait_s: float) -> dict[str, Any]:
    r = http.post("/v1/leases", json={"holder": holder, "vram_mb": vram_mb, "wait_s": wait_s,
                                      "ttl_s": 60})
    if r.status_code != 201:
        raise RuntimeError(f"acquire: {r.status_code} {r.text}")
    lease: dict[str, Any] = r.json()
    return lease


def release(http: httpx.Client, lease: dict[str, Any]) -> None:
    r = http.delete(f"/v1/leases/{lease['id']}", params={"token": lease["token"]})
    if r.status_code != 200:
        raise RuntimeError(f"release: {r.status_code} {r.text}")


def idle_latency(url: str, n: int) -> dict[str, Any]:
    with httpx.Client(base_url=url, timeout=10) as http:
        for _ in range(20):  # warm up the connection and the server's code paths
            release(http, acquire(http, "bench-warmup", 4096, 0))
        times: list[float] = []
        meter = CpuMeter()
        for _ in range(n):
            t0 = time.perf_counter()
            lease = acquire(http, "bench-idle", 4096, 0)
            times.append(time.perf_counter() - t0)
            release(http, lease)
        noise = meter.stop()
    return {**latency_summary(times), "noise": noise}


def contention(url: str, clients: int, seconds: float) -> dict[str, Any]:
    grants = [0] * clients
    waits: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    start = threading.Barrier(clients + 1)
    stop_at = 0.0

    def loop(i: int) -> None:
        mine: list[float] = []
        with httpx.Client(base_url=url, timeout=60) as http:
            start.wait()
            try:
                while time.monotonic() < stop_at:
                    t0 = time.perf_counter()
                    lease = acquire(http, f"bench-{i}", 12 * 1024, 30)
                    mine.append(time.perf_counter() - t0)
                    grants[i] += 1
                    release(http, lease)
            except Exception as exc:  # report, do not hang the others
                with lock:
                    errors.append(repr(exc))
        with lock:
            waits.extend(mine)

    threads = [threading.Thread(target=loop, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    meter = CpuMeter()
    t_start = time.monotonic()
    stop_at = t_start + seconds
    start.wait()
    for t in threads:
        t.join(seconds + 90)
    elapsed = time.monotonic() - t_start
    total = sum(grants)
    return {"clients": clients, "seconds": round(elapsed, 3), "grants": total,
            "grants_per_s": total / elapsed, "min_client_grants": min(grants),
            "max_client_grants": max(grants), "acquire_wait": latency_summary(waits),
            "errors": errors[:5], "noise": meter.stop()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "leases.json")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="gpulane-bench-leases-") as tmp, Procs() as procs:
        url = start_server(procs, Path(tmp))
        idle = idle_latency(url, args.n)
        busy = contention(url, args.clients, args.seconds)
        with httpx.Client(base_url=url, timeout=10) as http:
            left = http.get("/v1/leases").json()["leases"]

    ok = idle["p50_ms"] <= GOAL_P50_MS
    print_table(["measure", "value"], [
        ["idle grant p50 (ms)", idle["p50_ms"]],
        ["idle grant p99 (ms)", idle["p99_ms"]],
        ["idle grant max (ms)", idle["max_ms"]],
        [f"contended grants/s ({args.clients} clients, 12 GiB)", busy["grants_per_s"]],
        ["contended acquire p50 (ms)", busy["acquire_wait"]["p50_ms"]],
        ["contended acquire p99 (ms)", busy["acquire_wait"]["p99_ms"]],
        ["grants per client min/max", f"{busy['min_client_grants']}/"
                                      f"{busy['max_client_grants']}"],
        ["leases left afterwards", len(left)],
        [f"goal p50 <= {GOAL_P50_MS:g} ms", "met" if ok else "MISSED"],
    ])
    if busy["errors"]:
        print(f"contention errors: {busy['errors']}", file=sys.stderr)
    write_json(args.out, {"benchmark": "leases", "goal_p50_ms": GOAL_P50_MS, "goal_met": ok,
                          "idle": {"n": args.n, **idle}, "contention": busy,
                          "leases_left": len(left), "machine": machine_info(),
                          "git": git_info()})
    print(f"wrote {args.out}")
    return 0 if ok and not busy["errors"] and not left else 1


if __name__ == "__main__":
    sys.exit(main())
