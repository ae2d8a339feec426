"""Dashboard benchmark: how fast the page paints, and whether it keeps up with a busy node.

    .venv/bin/python bench/dashboard.py [--loads 5] [--rate 200] [--seconds 20]
                                        [--out bench/results/dashboard.json]

Starts ``gpulane serve`` on 2 simulated 24 GiB GPUs and Debian's headless Chromium (selenium,
as tests/browser does), then:

1. First paint: ``--loads`` fresh loads of ``/`` (the first with an empty cache); per load
   Chromium's own paint timing (``first-paint``, ``first-contentful-paint``) and the
   ``gpulane-first-status`` mark the page sets when it has drawn its first status event.
   Goal: first-contentful-paint under 1 s on every load.
2. Keeping up: with the page open, a load generator submits ``--rate`` no-op tasks a second
   (``sleep`` with ms 0 on the GPUs, in bulk requests of a tenth of the rate every 100 ms)
   for ``--seconds``. Measured: the page's main-thread busy time (Chrome DevTools
   ``Performance.getMetrics`` TaskDuration) and its renderer processes' CPU from /proc, each
   in cores; the status events it drew against the seconds that passed; how old the drawn
   status was at each one-second sample (lag). Goal: the page's CPU under one core.

Exit 3 when Chromium or chromedriver is not installed (skipped, as bench/gpu.py without a GPU).
"""

from __future__ import annotations

import argparse
import os
import shutil
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
    percentile,
    print_table,
    run_record,
    start_gpulane,
    stop_on_signals,
    write_json,
)

GOAL_FIRST_PAINT_MS = 1000.0
"""First contentful paint of every load under this."""
GOAL_PAGE_CORES = 1.0
"""The page's CPU while the node takes --rate tasks a second, in cores."""
TICK_S = 0.1
"""The load generator's pace: one bulk submit this often."""
_CLK = os.sysconf("SC_CLK_TCK")


def renderer_cpu_s(root: int) -> float:
    """CPU seconds of the Chromium renderer processes below ``root`` (chromedriver's pid)."""
    procs: dict[int, tuple[int, float, bool]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            rest = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            renderer = b"--type=renderer" in (entry / "cmdline").read_bytes()
        except (OSError, IndexError):
            continue
        procs[int(entry.name)] = (int(rest[1]), (int(rest[11]) + int(rest[12])) / _CLK,
                                  renderer)
    below, todo = set(), [root]
    while todo:
        pid = todo.pop()
        below.add(pid)
        todo.extend(p for p, (ppid, _, _) in procs.items() if ppid == pid and p not in below)
    return sum(cpu for pid, (_, cpu, renderer) in procs.items() if pid in below and renderer)


def first_paints(driver: Any, url: str, loads: int) -> list[dict[str, float | None]]:
    rows = []
    driver.execute_cdp_cmd("Network.enable", {})
    driver.execute_cdp_cmd("Network.setCacheDisabled", {"cacheDisabled": True})
    for i in range(loads):
        if i == 1:
            driver.execute_cdp_cmd("Network.setCacheDisabled", {"cacheDisabled": False})
        driver.get("about:blank")
        driver.get(url + "/")
        # Paint entries land after the frame is shown: wait for them and the first status.
        marks = driver.execute_script(
            "return new Promise(done => { const t0 = performance.now(); const look = () => {"
            " const m = performance.getEntriesByName('gpulane-first-status');"
            " const p = performance.getEntriesByType('paint');"
            " if ((m.length && p.length >= 2) || performance.now() - t0 > 5000)"
            " done({paint: p.map(e => [e.name, e.startTime]),"
            " status: m.length ? m[0].startTime : null,"
            " dcl: performance.getEntriesByType('navigation')[0].domContentLoadedEventEnd});"
            " else setTimeout(look, 20); }; look(); })")
        paint = dict(marks["paint"])
        rows.append({"load": i + 1, "cache": "cold" if i == 0 else "warm",
                     "first_paint_ms": paint.get("first-paint"),
                     "first_contentful_paint_ms": paint.get("first-contentful-paint"),
                     "dom_content_loaded_ms": marks["dcl"],
                     "first_status_drawn_ms": marks["status"]})
    return rows


def generate(url: str, rate: int, seconds: float, stop: threading.Event,
             counts: dict[str, int]) -> None:
    """Submit ``rate`` no-op tasks a second, in bulk every TICK_S, paced by the clock."""
    per_tick = max(1, round(rate * TICK_S))
    body = {"tasks": [{"preset": "sleep", "input": {"ms": 0}, "device": "gpu"}] * per_tick}
    with httpx.Client(base_url=url, timeout=30) as http:
        start = time.monotonic()
        n = 0
        while not stop.is_set() and time.monotonic() - start < seconds:
            r = http.post("/v1/tasks/bulk", json=body)
            counts["submitted" if r.status_code == 202 else "refused"] += per_tick
            n += 1
            delay = start + n * TICK_S - time.monotonic()
            if delay > 0:
                stop.wait(delay)


def page_metrics(driver: Any) -> dict[str, float]:
    got = driver.execute_cdp_cmd("Performance.getMetrics", {})["metrics"]
    return {m["name"]: float(m["value"]) for m in got}


def keep_up(driver: Any, url: str, rate: int, seconds: float) -> dict[str, Any]:
    driver.get(url + "/")
    driver.execute_script(
        "return new Promise(done => { const look = () => document.getElementById('conn')"
        ".dataset.draws ? done() : setTimeout(look, 20); look(); })")
    driver.execute_cdp_cmd("Performance.enable", {"timeDomain": "threadTicks"})
    chromedriver = driver.service.process.pid
    draws0 = int(driver.find_element("id", "conn").get_attribute("data-draws"))
    m0, cpu0, t0 = page_metrics(driver), renderer_cpu_s(chromedriver), time.monotonic()
    counts = {"submitted": 0, "refused": 0}
    stop = threading.Event()
    gen = threading.Thread(target=generate, args=(url, rate, seconds, stop, counts))
    meter = CpuMeter()
    gen.start()
    lags, per_s = [], []
    last = (m0, cpu0, t0)
    try:
        while gen.is_alive():
            gen.join(1.0)
            now_m, now_cpu, now = page_metrics(driver), renderer_cpu_s(chromedriver), \
                time.monotonic()
            at = driver.find_element("id", "conn").get_attribute("data-at")
            lags.append(max(time.time() - float(at), 0.0))
            span = max(now - last[2], 1e-9)
            per_s.append({"task_cores": (now_m["TaskDuration"] - last[0]["TaskDuration"]) / span,
                          "renderer_cores": (now_cpu - last[1]) / span})
            last = (now_m, now_cpu, now)
    finally:
        stop.set()
        gen.join()
    m1, cpu1, t1 = last
    wall = t1 - t0
    draws = int(driver.find_element("id", "conn").get_attribute("data-draws")) - draws0
    return {
        "rate_per_s": rate, "seconds": round(wall, 2), **counts,
        "submitted_per_s": round(counts["submitted"] / wall, 1),
        "page_task_cores": round((m1["TaskDuration"] - m0["TaskDuration"]) / wall, 4),
        "page_task_cores_max_1s": round(max(p["task_cores"] for p in per_s), 4),
        "renderer_cores": round((cpu1 - cpu0) / wall, 4),
        "renderer_cores_max_1s": round(max(p["renderer_cores"] for p in per_s), 4),
        "status_draws": draws, "status_draws_per_s": round(draws / wall, 2),
        "lag_p50_s": round(percentile(lags, 50), 3), "lag_max_s": round(max(lags), 3),
        "js_heap_used_mb": round(m1["JSHeapUsedSize"] / 2**20, 1),
        "dom_nodes": int(m1["Nodes"]),
        "machine": meter.stop(),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--loads", type=int, default=5)
    ap.add_argument("--rate", type=int, default=200)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "dashboard.json")
    args = ap.parse_args(argv)
    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        print("chromium and chromedriver are not installed (apt-get install chromium "
              "chromium-driver): skipped", file=sys.stderr)
        return 3
    from tests.browser.conftest import headless_chromium

    stop_on_signals()
    started, load_start = time.time(), list(os.getloadavg())
    with tempfile.TemporaryDirectory() as tmp, Procs() as procs:
        _, url = start_gpulane(procs, Path(tmp) / "data", Path(tmp))
        driver = headless_chromium()
        try:
            paints = first_paints(driver, url, args.loads)
            load = keep_up(driver, url, args.rate, args.seconds)
        finally:
            driver.quit()

    print_table(["load", "cache", "first paint ms", "first contentful paint ms",
                       "DOMContentLoaded ms", "first status drawn ms"],
                      [[p["load"], p["cache"], fmt(p["first_paint_ms"]),
                        fmt(p["first_contentful_paint_ms"]), fmt(p["dom_content_loaded_ms"]),
                        fmt(p["first_status_drawn_ms"])] for p in paints])
    print()
    print_table(
        ["tasks/s asked", "tasks/s sent", "page cores (DevTools)", "max 1 s", "renderer cores",
         "max 1 s", "draws/s", "lag p50 s", "lag max s"],
        [[load["rate_per_s"], load["submitted_per_s"], load["page_task_cores"],
          load["page_task_cores_max_1s"], load["renderer_cores"],
          load["renderer_cores_max_1s"], load["status_draws_per_s"], load["lag_p50_s"],
          load["lag_max_s"]]])
    fcp = [p["first_contentful_paint_ms"] or float("inf") for p in paints]
    goals = {"first_paint_under_1s": max(fcp) < GOAL_FIRST_PAINT_MS,
             "page_under_one_core": max(load["page_task_cores_max_1s"],
                                        load["renderer_cores"]) < GOAL_PAGE_CORES}
    print(f"\ngoals: {goals}")
    result = {**run_record("dashboard", "bench/dashboard.py", argv, started, load_start),
              "goals": goals, "first_paint": paints, "keep_up": load}
    write_json(args.out, result)
    print(f"wrote {args.out}")
    return 0 if all(goals.values()) else 1


def fmt(ms: float | None) -> str:
    return "n/a" if ms is None else f"{ms:.0f}"


if __name__ == "__main__":
    sys.exit(main())
