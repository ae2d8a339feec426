"""Node CPU per task with no HTTP in the way: what scheduling, runtime and the store cost.

    .venv/bin/python bench/node_cpu.py [--rounds 3] [--calls 2000] [--presets sleep,sleep-online]
        [--out bench/results/node_cpu.json]

A node is built in this process (SQLite store, 2 simulated 24 GiB GPUs, the example presets)
and driven through its own API: ``--calls`` sequential round trips (``Node.submit`` then
``Node.wait``) of ``{"ms": 0}`` per preset and round, the presets' order alternating per
round. The process's CPU (time.process_time: the node's event loop and its threads; the sleep
workers are other processes and are not counted) is read around each run, with the scheduler
passes per task and the round trips' p50. The table shows the medians over rounds and the
spread (min-max) of CPU per task; on a shared machine that spread is the noise.

What it leaves out, the HTTP stack and the SDK, bench/dispatch.py measures (method B).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._util import percentile, print_table, run_record, write_json

WARMUP_CALLS = 200
"""Round trips before each measured run (workers warm, caches and batch stats settled)."""


async def _run(node: Any, preset: str, calls: int) -> dict[str, float]:
    async def round_trip() -> None:
        task, _ = await node.submit(node.build_spec(preset=preset, input={"ms": 0}))
        got = await node.wait(task.id, 30.0)
        if got.state.value != "succeeded":
            raise RuntimeError(f"task {got.id} ended {got.state.value}: {got.error}")

    for _ in range(WARMUP_CALLS):
        await round_trip()
    latencies = []
    passes = node.scheduler.passes
    cpu = time.process_time()
    for _ in range(calls):
        t = time.perf_counter()
        await round_trip()
        latencies.append(time.perf_counter() - t)
    cpu = time.process_time() - cpu
    return {"cpu_us_per_task": cpu / calls * 1e6,
            "passes_per_task": (node.scheduler.passes - passes) / calls,
            "p50_ms": percentile(latencies, 50) * 1000}


async def measure(presets: list[str], rounds: int,
                  calls: int) -> dict[str, list[dict[str, float]]]:
    from gpulane.config import Settings
    from gpulane.node import Node

    out: dict[str, list[dict[str, float]]] = {p: [] for p in presets}
    with tempfile.TemporaryDirectory() as tmp:
        node = Node(Settings.model_validate({"data_dir": Path(tmp) / "data",
                                             "simulate_gpus": "2x24GiB"}))
        await node.start()
        try:
            for r in range(rounds):
                for preset in presets if r % 2 == 0 else presets[::-1]:
                    got = await _run(node, preset, calls)
                    out[preset].append(got)
                    print(f"round {r + 1} {preset}: {got['cpu_us_per_task']:.0f} us/task, "
                          f"{got['passes_per_task']:.2f} passes/task, p50 "
                          f"{got['p50_ms']:.2f} ms", flush=True)
        finally:
            await node.stop()
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--presets", default="sleep,sleep-online")
    ap.add_argument("--out", type=Path, default=Path("bench/results/node_cpu.json"))
    args = ap.parse_args(argv)
    started, load = time.time(), list(os.getloadavg())
    runs = asyncio.run(measure(args.presets.split(","), args.rounds, args.calls))
    rows, summary = [], {}
    for preset, got in runs.items():
        cpu = [g["cpu_us_per_task"] for g in got]
        summary[preset] = {
            "cpu_us_per_task": statistics.median(cpu), "cpu_min_max": [min(cpu), max(cpu)],
            "passes_per_task": statistics.median(g["passes_per_task"] for g in got),
            "p50_ms": statistics.median(g["p50_ms"] for g in got)}
        s = summary[preset]
        rows.append([preset, s["cpu_us_per_task"], f"{min(cpu):.0f}-{max(cpu):.0f}",
                     s["passes_per_task"], s["p50_ms"]])
    print_table(["preset", "node CPU us/task", "spread", "passes/task", "p50 ms"], rows)
    write_json(args.out, {**run_record("node_cpu", "bench/node_cpu.py", argv, started, load),
                          "rounds": args.rounds, "calls": args.calls, "summary": summary,
                          "runs": runs})


if __name__ == "__main__":
    main()
