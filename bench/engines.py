"""Engines benchmark (issue 16): each engine the apps use, on the CPU lane and the GPU lane of
one gpulane node, beside the GPU speedups the apps' authors reported.

    .venv/bin/python bench/engines.py [--engines ctgan,gcn,xgboost,embed,matmul,matmul-onnx]
                                      [--items 256] [--rounds 3] [--no-gpu]
                                      [--out bench/results/engines.json]

Engines, each an example preset run through the node's HTTP API (one after another, so no
two compete for the CPU):

* ``ctgan``: ctgan-train (CTGAN, wine, 30 epochs, batch 50); figure: the worker's own fit
  seconds (``output.seconds``: data transform and training, no process start or import);
* ``gcn``: gcn-train (a GCN with torch-geometric on Zachary's karate club), its default input
  (100 epochs); figure: ``output.seconds`` (else the task's run time);
* ``xgboost``: xgboost-train (200,000 rows, 50 features, 50 rounds); figure: ``output.seconds``;
* ``embed``: all-MiniLM-L6-v2, ``--items`` texts in tasks of 32; figure: texts/s;
* ``matmul`` and ``matmul-onnx``: the same MLP (3 x Linear 2048) on torch and on ONNX Runtime,
  ``--items`` single-row tasks submitted at once (the node batches them); figure: rows/s.

A session preset is warmed first on each lane (one task starts its worker and loads the
model); a one-off starts a fresh worker per task, so its figure is the training time the
worker measures. Each engine runs ``--rounds`` times (3) on each lane, engines and lanes
alternating within a round; the table gives each lane's median with the min-max of the runs
(the noise of a shared machine). A preset this node lacks, or whose worker fails (a missing
package: torch-geometric, ctgan, onnxruntime), is recorded as skipped with the reason.

The GPU side runs when torch sees a GPU (CUDA, or ROCm through torch.cuda) and the node started
on the real devices finds it (GET /v1/gpus: not simulated, at least one device, whichever
device provider it chose); every engine then runs twice, ``device: "cpu"`` and ``device:
"gpu"``. Without one, the node is bench/_util.py's start_gpulane (simulated GPUs, whose workers
would compute on the CPU: no GPU figure), the CPU side is recorded and the JSON says the GPU
side was skipped and why. ``--allow-cpu-only`` instead runs the GPU lane on those simulated
GPUs as a dry run of the GPU path (its figures are the CPU's; JSON to a temporary file).
"""

from __future__ import annotations

import argparse
import os
import statistics
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
    child_env,
    markdown_table,
    print_table,
    run_record,
    start_gpulane,
    stop_on_signals,
    write_json,
)

OUT = REPO / "bench" / "results" / "engines.json"
"""Where the run's JSON goes."""

TASK_WAIT_S = 600.0
"""Longest wait for one task (a one-off training on a 2-core CPU)."""

EXAMPLES = REPO / "examples" / "presets"
"""The example presets the GPU node serves (the CPU-only node has them by default)."""

# name: (preset, kind, input); kind "oneoff" (figure: training seconds) or "session" (items/s)
ENGINES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "ctgan": ("ctgan-train", "oneoff", {"dataset": "wine", "epochs": 30, "batch_size": 50,
                                        "samples": 2}),
    "gcn": ("gcn-train", "oneoff", {}),
    "xgboost": ("xgboost-train", "oneoff", {"rows": 200_000, "features": 50, "rounds": 50}),
    "embed": ("embed", "session", {}),
    "matmul": ("matmul", "session", {}),
    "matmul-onnx": ("matmul-onnx", "session", {}),
}

REPORTED = {"ctgan": "2-3x", "gcn": "2-4x", "xgboost": "3-10x"}
"""The GPU speedups the apps' authors wrote in their notes (no figure for the others)."""

EMBED_PER_TASK = 32
"""Texts per embed task."""


def session_inputs(engine: str, items: int) -> list[dict[str, Any]]:
    """The measured tasks' inputs: ``items`` rows in all."""
    if engine == "embed":
        texts = [f"row {i}: a short sentence about engine {i % 7} and device {i % 3}"
                 for i in range(items)]
        return [{"texts": texts[i:i + EMBED_PER_TASK]}
                for i in range(0, items, EMBED_PER_TASK)]
    return [{"seed": i} for i in range(items)]


def submit_all(api: httpx.Client, preset: str, device: str,
               inputs: list[dict[str, Any]]) -> list[str]:
    r = api.post("/v1/tasks/bulk", json={"tasks": [
        {"preset": preset, "input": inp, "device": device} for inp in inputs]})
    r.raise_for_status()
    return [t["id"] for t in r.json()["tasks"]]


def wait_final(api: httpx.Client, task_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + TASK_WAIT_S
    while True:
        r = api.get(f"/v1/tasks/{task_id}/result", params={"wait": 30}, timeout=60)
        r.raise_for_status()
        task: dict[str, Any] = r.json()
        if task["state"] in ("succeeded", "failed", "cancelled"):
            return task
        if time.monotonic() > deadline:
            raise TimeoutError(f"task {task_id} not final after {TASK_WAIT_S:g}s: {task}")


def failure(task: dict[str, Any]) -> str | None:
    if task["state"] == "succeeded":
        return None
    error = task.get("error") or {}
    return f"{task['state']}: {error.get('kind')}: {error.get('message')}"


def run_oneoff(api: httpx.Client, preset: str, device: str,
               inp: dict[str, Any]) -> dict[str, Any]:
    (task_id,) = submit_all(api, preset, device, [inp])
    task = wait_final(api, task_id)
    if (why := failure(task)) is not None:
        return {"skipped": why}
    out = task["output"] or {}
    run_s = float(task["finished_at"]) - float(task["started_at"])
    seconds = out.get("seconds") if isinstance(out.get("seconds"), int | float) else run_s
    summary = {k: out[k] for k in ("device", "accuracy", "fidelity", "metric") if k in out}
    if isinstance(summary.get("fidelity"), dict):
        summary["fidelity"] = summary["fidelity"].get("score")
    return {"seconds": round(float(seconds), 3), "task_run_s": round(run_s, 3),
            "placement": task.get("placement"), "output": summary}


def warm_up(api: httpx.Client, engine: str, preset: str, device: str) -> str | None:
    """Start a session preset's worker on the lane (one task); why it failed, or None."""
    return failure(wait_final(api, submit_all(api, preset, device,
                                              session_inputs(engine, 1))[0]))


def run_session(api: httpx.Client, engine: str, preset: str, device: str,
                items: int) -> dict[str, Any]:
    inputs = session_inputs(engine, items)
    started = time.perf_counter()
    ids = submit_all(api, preset, device, inputs)
    tasks = [wait_final(api, task_id) for task_id in ids]
    seconds = time.perf_counter() - started
    failed = [why for task in tasks if (why := failure(task)) is not None]
    if failed:
        return {"skipped": f"{len(failed)} of {len(tasks)} tasks failed, first: {failed[0]}"}
    return {"items": items, "tasks": len(tasks), "seconds": round(seconds, 3),
            "items_per_s": round(items / seconds, 1), "placement": tasks[-1].get("placement"),
            "output": {k: v for k, v in (tasks[-1]["output"] or {}).items()
                       if k in ("provider", "dim")}}


def presets_of(api: httpx.Client) -> set[str]:
    r = api.get("/v1/presets")
    r.raise_for_status()
    body = r.json()
    items = body.get("presets", body) if isinstance(body, dict) else body
    return {p["name"] for p in items}


def bench_all(api: httpx.Client, engines: list[str], lanes: list[str], items: int,
              rounds: int) -> dict[str, dict[str, Any]]:
    """Every engine on every lane, ``rounds`` times, engines and lanes alternating within a
    round (so a slow spell of a shared machine hits them all); each lane's median figure."""
    known = presets_of(api)
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {e: {lane: [] for lane in lanes}
                                                        for e in engines}
    skipped: dict[str, dict[str, str]] = {e: {} for e in engines}
    for engine in engines:
        preset, kind, _ = ENGINES[engine]
        for lane in lanes:
            if preset not in known:
                skipped[engine][lane] = f"preset {preset} is not on this node"
            elif kind == "session" and (why := warm_up(api, engine, preset, lane)) is not None:
                skipped[engine][lane] = f"its worker did not serve: {why}"
    for n in range(rounds):
        for engine in engines:
            preset, kind, inp = ENGINES[engine]
            for lane in lanes:
                if lane in skipped[engine]:
                    continue
                print(f"  round {n + 1}/{rounds}: {engine} on the {lane} lane",
                      file=sys.stderr, flush=True)
                run = (run_oneoff(api, preset, lane, inp) if kind == "oneoff"
                       else run_session(api, engine, preset, lane, items))
                if "skipped" in run:
                    skipped[engine][lane] = run["skipped"]
                else:
                    runs[engine][lane].append(run)
    return {engine: {lane: {"skipped": skipped[engine][lane]} if lane in skipped[engine]
                     else summary(engine, runs[engine][lane]) for lane in lanes}
            for engine in engines}


def summary(engine: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The runs and their median figure, with its spread (min, max) to show the noise."""
    key = "seconds" if ENGINES[engine][1] == "oneoff" else "items_per_s"
    values = [float(r[key]) for r in runs]
    return {key: round(statistics.median(values), 3), "min_max": [min(values), max(values)],
            "runs": runs}


def speedup(engine: str, result: dict[str, Any]) -> float | None:
    """GPU over CPU: training seconds CPU/GPU, or items/s GPU/CPU."""
    cpu, gpu = result.get("cpu", {}), result.get("gpu", {})
    if ENGINES[engine][1] == "oneoff":
        if cpu.get("seconds") and gpu.get("seconds"):
            return round(cpu["seconds"] / gpu["seconds"], 2)
    elif cpu.get("items_per_s") and gpu.get("items_per_s"):
        return round(gpu["items_per_s"] / cpu["items_per_s"], 2)
    return None


def figure(engine: str, lane: dict[str, Any] | None) -> str:
    if not lane:
        return "-"
    if "skipped" in lane:
        return "skipped"
    if ENGINES[engine][1] == "oneoff":
        low, high = lane["min_max"]
        return f"{lane['seconds']:.2f} s ({low:.2f}-{high:.2f})"
    low, high = lane["min_max"]
    return f"{lane['items_per_s']:,.0f}/s ({low:,.0f}-{high:,.0f})"


def table(results: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    headers = ["engine", "preset", "CPU lane (min-max)", "GPU lane (min-max)", "speedup",
               "authors' speedup"]
    rows = [[engine, ENGINES[engine][0], figure(engine, r.get("cpu")),
             figure(engine, r.get("gpu")),
             f"{s:.2f}x" if (s := speedup(engine, r)) is not None else "-",
             REPORTED.get(engine, "-")] for engine, r in results.items()]
    return headers, rows


def gpu_probe() -> tuple[bool, str, dict[str, Any]]:
    """(usable, why not, torch's view): whether torch sees a GPU, CUDA or ROCm (a ROCm torch
    answers through torch.cuda too), asked in a fresh interpreter (bench/gpu.py's probe)."""
    from bench.gpu import probe_torch

    info = probe_torch()
    if info.get("cuda_available"):
        return True, "", {"torch": info}
    why = info.get("error") or f"torch {info.get('torch_version')} sees no CUDA or ROCm GPU"
    return False, str(why), {"torch": info}


def node_gpus(api: httpx.Client) -> tuple[str, dict[str, Any]]:
    """Why the node has no real GPU lane ("" when it has one), and its GET /v1/gpus view."""
    r = api.get("/v1/gpus")
    r.raise_for_status()
    view = r.json()
    seen = {k: view.get(k) for k in ("provider", "simulated", "reason", "devices")}
    if view.get("simulated") or not view.get("devices"):
        return f"the node found no GPU (provider {view.get('provider')}: " \
               f"{view.get('reason')})", seen
    return "", seen


def start_node(procs: Procs, tmp: Path, use_gpu: bool) -> str:
    (tmp / "logs").mkdir(parents=True, exist_ok=True)
    if not use_gpu:
        return start_gpulane(procs, tmp / "data", tmp / "logs")[1]
    from bench.gpu import start_server

    return start_server(procs, EXAMPLES, tmp / "data", tmp / "logs", child_env(), None)[1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--engines", default=",".join(ENGINES))
    p.add_argument("--items", type=int, default=256,
                   help="rows per session engine (embed texts, matmul rows)")
    p.add_argument("--rounds", type=int, default=3,
                   help="measured runs per engine and lane (the median is reported)")
    p.add_argument("--no-gpu", action="store_true", help="the CPU lane only, even with a GPU")
    p.add_argument("--allow-cpu-only", action="store_true",
                   help="without a GPU, run the GPU lane on simulated GPUs (computing on the "
                        "CPU): a dry run of the GPU path, JSON to a temporary file")
    p.add_argument("--out", type=Path, default=None, help=f"default {OUT.relative_to(REPO)}")
    args = p.parse_args(argv)
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    if not engines or any(e not in ENGINES for e in engines) or min(args.items, args.rounds) < 1:
        p.error(f"--engines takes a comma-separated subset of {','.join(ENGINES)}; --items "
                "and --rounds are at least 1")
    stop_on_signals()
    started, load_start = time.time(), list(os.getloadavg())
    use_gpu, why, gpus = (False, "--no-gpu", {}) if args.no_gpu else gpu_probe()
    dry_run = not use_gpu and args.allow_cpu_only
    lanes = ["cpu", "gpu"] if use_gpu or dry_run else ["cpu"]
    if dry_run:
        print(f"bench/engines.py: dry run, the GPU lane on simulated GPUs ({why})",
              file=sys.stderr)
    elif not use_gpu:
        print(f"bench/engines.py: no GPU lane ({why}); recording the CPU side only",
              file=sys.stderr)
    out = args.out or (Path(tempfile.gettempdir()) / "engines-dry-run.json" if dry_run else OUT)
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="gpulane-engines-") as tmp, Procs() as procs:
        url = start_node(procs, Path(tmp), use_gpu)
        with httpx.Client(base_url=url, timeout=60) as api:
            if use_gpu:
                why, gpus["node"] = node_gpus(api)
                if why:
                    use_gpu, lanes = False, ["cpu"]
                    print(f"bench/engines.py: no GPU lane ({why})", file=sys.stderr)
            results = bench_all(api, engines, lanes, args.items, args.rounds)
    if not use_gpu and not dry_run:
        for engine in engines:
            results[engine]["gpu"] = {"skipped": f"no GPU: {why}"}
    headers, rows = table(results)
    print_table(headers, rows)
    record = run_record("engines", "bench/engines.py", argv, started, load_start)
    write_json(out, {
        **record,
        "gpu": {"used": use_gpu, "skipped_because": None if use_gpu else why,
                "dry_run_on_simulated_gpus": dry_run, **gpus},
        "engines": {e: {"preset": ENGINES[e][0], "kind": ENGINES[e][1],
                        "input": ENGINES[e][2], "authors_speedup": REPORTED.get(e),
                        **results[e], "speedup": speedup(e, results[e])} for e in engines},
        "items": args.items,
        "rounds": args.rounds,
        "table_markdown": markdown_table(headers, rows),
    })
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
