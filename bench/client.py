"""Client resilience benchmark: what the SDK's resilience layer costs, and what it saves.

    .venv/bin/python bench/client.py [--calls 3000] [--rate 200] [--outage 8]
                                     [--out bench/results/client.json]

1. Per-call overhead, against a local ``gpulane serve`` (sequential calls on one keep-alive
   connection): a bare ``httpx.Client`` request (+ ``.json()``), the SDK with its resilience
   layer switched off (``retry=None, breaker=None, budget=None``), and the SDK as shipped.
   Variants alternate within each round and the median round is kept, so drift in the
   machine's speed hits them alike. Two endpoints: ``GET /healthz`` (the cheapest answer, the
   worst case for a relative overhead) and ``GET /v1/tasks/{id}``. The layer's own CPU time is
   also measured without a network, through ``httpx.MockTransport``. Goal: <= 5 %.
2. A full outage: an app calls ``AsyncClient.run(..., fallback=...)`` open-loop at ``--rate``
   calls/s (one task per call, whatever the previous calls are doing) for ``--outage`` seconds
   against a dead server, stood in for by a listener that accepts and resets every connection
   (a balancer in front of a dead host) and counts them: the requests that reach it; and
   against a closed port (a killed ``gpulane serve``), the requests counted as they leave the
   SDK's connection pool. For comparison, the SDK without its breaker (the retry budget alone
   holding retries back). Goal: the dead server sees <= 1.2x the app's call rate.

   (Retries with neither budget nor breaker are left out: at 200 calls/s on a 2-core machine
   the 4x request load queues past the pool size, and httpcore's quadratic assignment of
   queued requests to connections then times the pool out, which measures httpcore.)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import socket
import statistics
import struct
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._util import (
    REPO,
    Procs,
    free_port,
    machine_info,
    markdown_table,
    print_table,
    start_gpulane,
    write_json,
)

from gpulane.client import AsyncClient, Client
from gpulane.client._base import DEFAULT_LIMITS
from gpulane.client.resilience import REGISTRY

GOAL_OVERHEAD = 0.05
GOAL_OUTAGE_RATIO = 1.2


# --- 1. overhead ---------------------------------------------------------------------------


def start_server(procs: Procs, tmp: Path) -> str:
    return start_gpulane(procs, tmp / "data", tmp)[1]


def bare_client(url: str) -> tuple[Callable[[str], Any], Callable[[], None]]:
    http = httpx.Client(base_url=url, timeout=10)

    def call(path: str) -> Any:
        response = http.get(path)
        response.raise_for_status()
        return response.json()

    return call, http.close


def sdk_client(url: str, resilient: bool,
               transport: httpx.BaseTransport | None = None) -> tuple[Callable[[str], Any],
                                                                      Callable[[], None]]:
    if resilient:
        client = Client(url, transport=transport)
    else:
        client = Client(url, transport=transport, retry=None, breaker=None, budget=None)

    def call(path: str) -> Any:
        return client.health() if path == "/healthz" else client.get(path.rsplit("/", 1)[1])

    return call, client.close


def per_call_us(variants: dict[str, Callable[[str], Any]], path: str,
                calls: int) -> dict[str, dict[str, float]]:
    """Per-call times of each variant, calls interleaved (A B C, B C A, ...) so that noise from
    the rest of the machine falls on all of them alike; median and 10 %-trimmed mean in us."""
    names = list(variants)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for fn in variants.values():  # warm up: connections, caches
        for _ in range(50):
            fn(path)
    clock = time.perf_counter
    for i in range(calls):
        k = i % len(names)
        for name in names[k:] + names[:k]:
            fn = variants[name]
            t0 = clock()
            fn(path)
            samples[name].append((clock() - t0) * 1e6)
    out = {}
    for name, values in samples.items():
        xs = sorted(values)
        cut = len(xs) // 10
        out[name] = {"median_us": statistics.median(xs),
                     "trimmed_mean_us": statistics.fmean(xs[cut:len(xs) - cut]),
                     "p90_us": xs[int(len(xs) * 0.9)], "n": len(xs)}
    return out


def bench_overhead(url: str, calls: int) -> dict[str, Any]:
    with Client(url) as c:
        task_id = str(c.run("sleep", {"ms": 0})["id"])
    out: dict[str, Any] = {}
    closers: list[Callable[[], None]] = []
    try:
        bare, close = bare_client(url)
        closers.append(close)
        off, close = sdk_client(url, resilient=False)
        closers.append(close)
        on, close = sdk_client(url, resilient=True)
        closers.append(close)
        variants = {"httpx": bare, "sdk_no_resilience": off, "sdk": on}
        for label, path in (("healthz", "/healthz"), ("get_task", f"/v1/tasks/{task_id}")):
            res = per_call_us(variants, path, calls)
            base = res["httpx"]["median_us"]
            out[label] = {
                "path": path, "variants": res,
                "overhead_vs_httpx": (res["sdk"]["median_us"] - base) / base,
                "resilience_share_vs_httpx": (res["sdk"]["median_us"]
                                              - res["sdk_no_resilience"]["median_us"]) / base,
            }
    finally:
        for close in closers:
            close()
    out["in_process"] = bench_in_process(calls)
    return out


def bench_in_process(calls: int) -> dict[str, float]:
    """The layer's own CPU time per call, without a network: the retry/breaker/budget/stats
    bookkeeping of one successful call, timed directly, and the SDK over an
    ``httpx.MockTransport`` with the layer on and off (interleaved)."""
    from gpulane.client.resilience import CircuitBreaker, Resilience, RetryBudget, RetryPolicy

    res = Resilience("http://bench.test", retry=RetryPolicy(), breaker=CircuitBreaker(),
                     budget=RetryBudget())
    n = 50_000
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(n):
            call = res.begin("GET /v1/tasks/t1")
            call.admit()
            call.succeeded()
        best = min(best, (time.perf_counter() - t0) / n * 1e6)

    body = b'{"id": "t1", "state": "succeeded"}'

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=body, headers={"content-type": "application/json"})

    off, close_off = sdk_client("http://bench.test", False, httpx.MockTransport(handler))
    on, close_on = sdk_client("http://bench.test", True, httpx.MockTransport(handler))
    try:
        mock = per_call_us({"sdk_no_resilience": off, "sdk": on}, "/v1/tasks/t1", calls * 5)
    finally:
        close_off()
        close_on()
    return {"layer_bookkeeping_us": best,
            "mock_sdk_no_resilience_us": mock["sdk_no_resilience"]["median_us"],
            "mock_sdk_us": mock["sdk"]["median_us"]}


# --- 2. outage -----------------------------------------------------------------------------


class DeadServer:
    """Accepts TCP connections and resets each at once (a balancer in front of a dead host);
    counts them, with times: the requests that reach it."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(4096)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.hits: list[float] = []
        self._stop = False
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        self.sock.settimeout(0.1)
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.hits.append(time.monotonic())
            with contextlib.suppress(OSError):
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            conn.close()

    def __enter__(self) -> DeadServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop = True
        self._thread.join(2)
        self.sock.close()


class Counting(httpx.AsyncBaseTransport):
    """The SDK's own kind of pool, counting every HTTP request handed to it (with times)."""

    def __init__(self) -> None:
        self.inner = httpx.AsyncHTTPTransport(limits=DEFAULT_LIMITS)
        self.hits: list[float] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.hits.append(time.monotonic())
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self.inner.aclose()


SCENARIOS: dict[str, dict[str, Any]] = {
    "sdk": {"what": "SDK defaults (retries + budget + breaker)", "dead": "reset", "kwargs": {}},
    "sdk_refused": {"what": "SDK defaults, port closed", "dead": "refused", "kwargs": {}},
    "no_breaker": {"what": "retries + budget, no breaker, port closed", "dead": "refused",
                   "kwargs": {"breaker": None}},
}


async def outage(kind: str, rate: float, seconds: float) -> dict[str, Any]:
    """``rate`` calls/s for ``seconds``, open loop, against a dead server."""
    REGISTRY.clear()
    scenario = SCENARIOS[kind]
    with contextlib.ExitStack() as stack:
        kwargs = dict(scenario["kwargs"])
        if scenario["dead"] == "reset":
            dead = stack.enter_context(DeadServer())
            url, hits = dead.url, dead.hits
            counting = None
        else:
            url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
            counting = Counting()
            hits = counting.hits
            kwargs["transport"] = counting
            if "breaker" not in kwargs:  # the shared one, as without a transport
                kwargs["breaker"] = REGISTRY.breaker(url)
        async with AsyncClient(url, **kwargs) as client:
            latencies: list[float] = []
            served = errors = 0

            async def one() -> None:
                nonlocal served, errors
                t0 = time.monotonic()
                try:
                    task = await client.run("sleep", {"ms": 0}, fallback=lambda: "cpu")
                    served += task["id"] is None
                except Exception:
                    errors += 1
                latencies.append(time.monotonic() - t0)

            start = time.monotonic()
            tasks: list[asyncio.Task[None]] = []
            n = int(rate * seconds)
            for i in range(n):  # open loop: call i starts at start + i / rate
                delay = start + i / rate - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(one()))
            await asyncio.gather(*tasks)
            stats = client.stats()
        got = [t for t in hits if t >= start]
    breaker = stats["breaker"] or {}
    transitions = breaker.get("transitions", [])
    opened = next((t["monotonic"] - start for t in transitions if t["to"] == "open"), None)
    first = sum(1 for t in got if t < start + 1.0)
    lat = sorted(latencies)
    return {
        "what": scenario["what"], "dead_server": scenario["dead"], "app_calls": n,
        "app_rate": rate, "seconds": seconds, "served_by_fallback": served, "errors": errors,
        "server_requests": len(got), "ratio": len(got) / n,
        "first_second_requests": first, "first_second_ratio": first / min(n, rate),
        "breaker_opened_after_s": opened, "transitions": [t["to"] for t in transitions],
        "retries": stats["retries"], "retries_denied": stats["retries_denied"],
        "call_p50_ms": lat[len(lat) // 2] * 1000,
        "call_p99_ms": lat[int(len(lat) * 0.99)] * 1000,
    }


# --- report --------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--calls", type=int, default=3000, help="calls per variant and endpoint")
    p.add_argument("--rate", type=float, default=200.0, help="app calls/s during the outage")
    p.add_argument("--outage", type=float, default=8.0, help="seconds of outage")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "client.json")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Breaker transitions are expected here, and summarized in the tables and the JSON.
    logging.getLogger("gpulane.client").setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory(prefix="gpulane-bench-client-") as tmp, Procs() as procs:
        url = start_server(procs, Path(tmp))
        overhead = bench_overhead(url, args.calls)
    outages = {kind: asyncio.run(outage(kind, args.rate, args.outage)) for kind in SCENARIOS}

    rows: list[list[Any]] = []
    for label, shown in (("healthz", "GET /healthz"), ("get_task", "GET /v1/tasks/{id}")):
        o = overhead[label]
        v = o["variants"]
        rows.append([shown, f"{v['httpx']['median_us']:.0f} us",
                     f"{v['sdk_no_resilience']['median_us']:.0f} us",
                     f"{v['sdk']['median_us']:.0f} us", f"{o['overhead_vs_httpx']:+.1%}",
                     f"{o['resilience_share_vs_httpx']:+.1%}"])
    ip = overhead["in_process"]
    headers = ["per call (median, local server)", "bare httpx", "SDK, layer off", "SDK",
               "SDK vs httpx", "layer's share"]
    print()
    table1 = print_table(headers, rows)
    print(f"\nresilience bookkeeping per successful call: {ip['layer_bookkeeping_us']:.1f} us; "
          f"SDK over MockTransport: {ip['mock_sdk_no_resilience_us']:.0f} us layer off, "
          f"{ip['mock_sdk_us']:.0f} us layer on")
    out_rows = []
    for o in outages.values():
        opened = o["breaker_opened_after_s"]
        out_rows.append([o["what"], f"{o['app_rate']:.0f}/s x {o['seconds']:g}s",
                         o["server_requests"], f"{o['ratio']:.2f}x",
                         f"{o['first_second_ratio']:.2f}x",
                         "-" if opened is None else f"{opened:.2f}s",
                         f"{o['served_by_fallback']}/{o['app_calls']}",
                         f"{o['call_p50_ms']:.1f} / {o['call_p99_ms']:.0f} ms"])
    headers2 = ["full outage", "app calls", "requests to server", "ratio", "ratio, 1st s",
                "breaker opened", "fallback served", "call p50 / p99"]
    print()
    table2 = print_table(headers2, out_rows)

    worst = max(overhead[k]["overhead_vs_httpx"] for k in ("healthz", "get_task"))
    sdk_ratio = max(outages["sdk"]["ratio"], outages["sdk_refused"]["ratio"])
    goals = {"overhead_le_5pct": worst <= GOAL_OVERHEAD,
             "outage_ratio_le_1_2x": sdk_ratio <= GOAL_OUTAGE_RATIO}
    print(f"\ngoals: SDK overhead vs bare httpx <= 5 %: "
          f"{'met' if goals['overhead_le_5pct'] else 'MISSED'} (worst {worst:+.1%}); "
          f"dead server sees <= 1.2x the app's call rate: "
          f"{'met' if goals['outage_ratio_le_1_2x'] else 'MISSED'} ({sdk_ratio:.2f}x)")
    result = {"benchmark": "client", "machine": machine_info(),
              "args": vars(args) | {"out": str(args.out)}, "overhead": overhead,
              "outage": outages, "goals": goals,
              "tables": {"overhead": table1, "outage": table2},
              "markdown": {"overhead": markdown_table(headers, rows),
                           "outage": markdown_table(headers2, out_rows)}}
    write_json(args.out, result)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
