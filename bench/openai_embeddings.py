"""OpenAI embeddings benchmark: /v1/embeddings with lists of 32 texts against single-text
calls, in one sitting, on one node.

    .venv/bin/python bench/openai_embeddings.py [--items 2048] [--list-size 32]
                                                [--in-flight 64] [--rounds 3]
                                                [--out bench/results/openai_embeddings.json]
                                                [--check-goals]

One ``gpulane serve`` with the example presets (``embed``: all-MiniLM-L6-v2, batch max_size
64; on simulated GPUs it computes on the CPU). Each mode embeds ``--items`` texts with the
same number of texts in flight (``--in-flight``): *single* sends one text per request from
that many coroutines (the node batches them, up to 64 a batch); *list* sends ``--list-size``
texts per request from in-flight / list-size coroutines (each request is one task whose texts
count towards the batch). Requests go through httpx with one keep-alive connection per
coroutine, each answer checked (one 384-float vector per text). The modes alternate for
``--rounds`` rounds after a warm-up of each; the figure is the median round of each.

Goal: list items/s >= 3x single items/s.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._util import (
    REPO,
    Procs,
    latency_summary,
    markdown_table,
    print_table,
    run_record,
    start_gpulane,
    stop_on_signals,
    write_json,
)

GOAL_RATIO = 3.0
"""List requests must embed at least this many times the items per second of single ones."""
TOPICS = ("the weather", "a football match", "interest rates", "a new phone", "cooking pasta",
          "a mountain hike", "train delays", "a jazz concert")
"""What the generated sentences are about (varied, so tokenised lengths vary a little)."""


def sentences(n: int, offset: int = 0) -> list[str]:
    return [f"Sentence {offset + i} says something about {TOPICS[(offset + i) % len(TOPICS)]}."
            for i in range(n)]


async def embed_all(url: str, texts: list[str], per_request: int,
                    in_flight: int) -> dict[str, Any]:
    """Embed ``texts`` in requests of ``per_request`` texts, ``in_flight`` texts at a time."""
    requests = [texts[i:i + per_request] for i in range(0, len(texts), per_request)]
    workers = max(1, in_flight // per_request)
    latencies: list[float] = []
    pending = iter(requests)

    async def worker() -> None:
        async with httpx.AsyncClient(base_url=url, timeout=120) as http:
            for batch in pending:
                sent = time.perf_counter()
                r = await http.post("/v1/embeddings", json={
                    "model": "embed", "input": batch if per_request > 1 else batch[0],
                    "encoding_format": "float"})
                latencies.append(time.perf_counter() - sent)
                data = r.json()["data"] if r.status_code == 200 else None
                if data is None or len(data) != len(batch) or any(
                        len(d["embedding"]) != 384 for d in data):
                    raise RuntimeError(f"bad answer {r.status_code}: {r.text[:300]}")

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(workers)))
    elapsed = time.perf_counter() - started
    return {"items": len(texts), "requests": len(requests), "clients": workers,
            "seconds": round(elapsed, 3), "items_per_s": round(len(texts) / elapsed, 1),
            "latency_ms": {k: round(v, 1) for k, v in latency_summary(latencies).items()}}


def worker_batches(url: str) -> dict[str, Any]:
    """The embed worker's batcher figures (mean batch size in items, batches, tasks)."""
    for w in httpx.get(f"{url}/v1/workers", timeout=10).json()["workers"]:
        if w.get("preset") == "embed" and w.get("batch"):
            b = w["batch"]
            return {k: b.get(k) for k in ("batches", "tasks", "items", "mean_size", "size")}
    return {}


async def sitting(url: str, args: argparse.Namespace) -> dict[str, Any]:
    modes = {"single": 1, "list": args.list_size}
    for per in modes.values():  # warm-up: the worker loaded, the batcher's size grown
        await embed_all(url, sentences(min(256, args.items), 10**6), per, args.in_flight)
    rounds: dict[str, list[dict[str, Any]]] = {m: [] for m in modes}
    for r in range(args.rounds):
        for mode, per in modes.items():
            before = worker_batches(url)
            run = await embed_all(url, sentences(args.items, r * args.items), per,
                                  args.in_flight)
            after = worker_batches(url)
            batches = (after.get("batches") or 0) - (before.get("batches") or 0)
            items = (after.get("items") or 0) - (before.get("items") or 0)
            run["mean_batch_items"] = round(items / batches, 1) if batches else None
            rounds[mode].append(run)
            print(f"round {r + 1} {mode}: {run['items_per_s']} items/s, mean batch "
                  f"{run['mean_batch_items']} items", flush=True)
    return rounds


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    ordered = sorted(runs, key=lambda x: x["items_per_s"])
    return ordered[len(ordered) // 2]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--items", type=int, default=2048)
    p.add_argument("--list-size", type=int, default=32)
    p.add_argument("--in-flight", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", type=Path, default=REPO / "bench/results/openai_embeddings.json")
    p.add_argument("--check-goals", action="store_true")
    args = p.parse_args()
    stop_on_signals()
    started, load_start = time.time(), list(os.getloadavg())
    with tempfile.TemporaryDirectory() as tmp, Procs() as procs:
        _, url = start_gpulane(procs, Path(tmp) / "data", Path(tmp))
        rounds = asyncio.run(sitting(url, args))
    single, listed = median_run(rounds["single"]), median_run(rounds["list"])
    ratio = round(listed["items_per_s"] / single["items_per_s"], 2)
    headers = ["mode", "texts/request", "clients", "items/s", "p50 ms", "p99 ms",
               "mean batch (items)"]
    rows = [[m, 1 if m == "single" else args.list_size, r["clients"], r["items_per_s"],
             r["latency_ms"]["p50_ms"], r["latency_ms"]["p99_ms"], r["mean_batch_items"]]
            for m, r in (("single", single), ("list", listed))]
    print_table(headers, rows)
    goal_met = ratio >= GOAL_RATIO
    per_round = [round(b["items_per_s"] / a["items_per_s"], 2)
                 for a, b in zip(rounds["single"], rounds["list"], strict=True)]
    print(f"list / single items/s: {ratio}x (goal >= {GOAL_RATIO}x: "
          f"{'met' if goal_met else 'MISSED'}); each round's: {per_round}")
    write_json(args.out, {
        **run_record("openai_embeddings", "bench/openai_embeddings.py", None, started,
                     load_start),
        "settings": {"items": args.items, "list_size": args.list_size,
                     "in_flight": args.in_flight, "rounds": args.rounds},
        "rounds": rounds, "median": {"single": single, "list": listed},
        "ratio": ratio, "ratios_per_round": per_round,
        "goal": {"ratio_at_least": GOAL_RATIO, "met": goal_met},
        "table_md": markdown_table(headers, rows)})
    return 0 if goal_met or not args.check_goals else 1


if __name__ == "__main__":
    sys.exit(main())
