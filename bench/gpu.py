"""GPU benchmark: embed on the GPU lane against the CPU lane, and how busy a saturating load
keeps the GPU (NVML), in one run of a real node.

    .venv/bin/python bench/gpu.py [--requests 5000] [--concurrency 256] [--cpu-requests 600]
                                  [--matmul-layers 1024] [--matmul-replicas 2]
                                  [--out bench/results/gpu-<gpu name>.json] [--check-goals]

Needs an NVIDIA GPU that both NVML (``pynvml``) and torch (``torch.cuda.is_available()``)
can use. Without one it prints why on one line and exits with status 3, writing nothing:
status 3 means "skipped", so ``make bench`` on a CPU-only machine may carry on past it.
``--allow-cpu-only`` instead runs the whole flow as a dry run on one simulated GPU (its
workers compute on the CPU) with small sizes; the NVML figures are then null and the JSON goes
to a temporary file, not to bench/results/.

One ``gpulane serve --no-examples`` (real NVML provider: no ``--simulate-gpus``) runs three
presets of the example workers, each with ``batch: {max_size: 128, max_wait_ms: 5, adaptive:
true}``:

* ``embed-gpu``: all-MiniLM-L6-v2 sentence embeddings, ``devices: [gpu]``;
* ``embed-cpu``: the same, ``devices: [cpu]``;
* ``matmul-gpu``: the synthetic MLP of examples/presets/workers/matmul_model.py with
  ``MATMUL_LAYERS=--matmul-layers`` Linear(2048, 2048) layers (float32, 16 MiB each) and
  ``replicas: --matmul-replicas`` per GPU, so that the GPU, not the server, is the bottleneck.

Each preset in turn: one request starts its worker(s), warm-up bursts run until no more
workers start, then ``--concurrency`` client coroutines share the measured requests (the load
generator of bench/batching.py: single-item ``POST /v1/tasks?wait=60`` over keep-alive
HTTP/1.1 connections, every answer checked). GPU presets get at least ``--requests``, and
more if needed to last ``--min-seconds`` at the warm-up's rate; ``embed-cpu`` gets
``--cpu-requests``.

While a GPU preset's measured load runs, a thread reads NVML's utilisation
(``nvmlDeviceGetUtilizationRates().gpu``: the share of the driver's last sample period in
which a kernel was running) and memory in use every ``--sample-ms`` on each GPU its workers
sit on (``GET /v1/workers`` placement). The first and last 10 % of the run are dropped; the
mean and p50 of the rest are reported.

Goal: mean GPU utilisation >= 90 % in the steady middle of a saturating run, for at least one
of embed-gpu and matmul-gpu. Reported: embed's GPU/CPU requests/s ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._util import (
    REPO,
    CpuMeter,
    Procs,
    child_env,
    free_port,
    markdown_table,
    percentile,
    print_table,
    run_record,
    start_proc,
    stop_on_signals,
    wait_until,
    write_json,
)
from bench.batching import (
    EXAMPLE_YAML,
    MARKER,
    READY_TIMEOUT_S,
    WAIT_S,
    WORKERS_DIR,
    _report_run,
    drive,
    gpulane_caller,
    make_input,
    output_ok,
    proc_cpu_s,
    reap_marked,
    run_failed,
    workers_of,
)

PRESETS = ("embed-gpu", "embed-cpu", "matmul-gpu")
MODEL_OF = {"embed-gpu": "embed", "embed-cpu": "embed", "matmul-gpu": "matmul"}
GPU_PRESETS = ("embed-gpu", "matmul-gpu")
BATCH = {"max_size": 128, "max_wait_ms": 5, "adaptive": True}
GOAL_UTIL_PCT = 90.0
TRIM = 0.1
"""Share of the measured run dropped at each end before the utilisation samples count."""
START_TIMEOUT_S = 600.0
"""How long a worker may take to start: 1,024 matmul layers are 16 GiB built on the CPU and
copied to the GPU."""
MATMUL_LAYER_MIB = 16  # one Linear(2048, 2048) in float32, bias aside
MAX_REQUESTS = 500_000
DRY_RUN_GPUS = "1x24GiB"
DRY_DEFAULTS = {"requests": 100, "cpu_requests": 50, "concurrency": 16, "warmup": 32,
                "min_seconds": 0.0, "matmul_layers": 8, "matmul_replicas": 1}
GPU_DEFAULTS = {"requests": 5000, "cpu_requests": 600, "concurrency": 256, "warmup": 1000,
                "min_seconds": 15.0, "matmul_layers": 1024, "matmul_replicas": 2}
SKIPPED = 3  # not 2: argparse exits 2 on a bad command line, which must not pass for "skipped"
"""Exit status when no GPU can be used: the benchmark did not run."""


# --- is there a GPU? -----------------------------------------------------------------------------


def probe_torch() -> dict[str, Any]:
    """torch's view of CUDA, from a fresh interpreter (a broken CUDA install cannot take this
    process down, and this one does not keep torch loaded)."""
    code = ("import json, torch; ok = torch.cuda.is_available(); print(json.dumps({"
            "'torch_version': torch.__version__, 'cuda_version': torch.version.cuda, "
            "'cuda_available': ok, 'device_count': torch.cuda.device_count() if ok else 0}))")
    try:
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              timeout=180, env=child_env(), cwd=REPO)
    except (OSError, subprocess.SubprocessError) as exc:
        return {"cuda_available": False, "error": f"could not run torch: {exc!r}"}
    try:
        info: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"cuda_available": False, "error": f"torch failed (exit {done.returncode}): {tail}"}
    return info


def probe_gpu() -> tuple[Any, dict[str, Any], str]:
    """(NvmlProvider or None, torch's view, why no GPU can be used or "")."""
    from gpulane.devices.nvml import NvmlProvider

    provider, why = NvmlProvider.probe()
    torch_info = probe_torch()
    if provider is None:
        return None, torch_info, f"NVML: {why}"
    if not torch_info.get("cuda_available"):
        provider.close()
        detail = torch_info.get("error") or (
            f"torch {torch_info.get('torch_version')} (CUDA {torch_info.get('cuda_version')}): "
            "torch.cuda.is_available() is False")
        return None, torch_info, detail
    return provider, torch_info, ""


def gpu_info(provider: Any, torch_info: dict[str, Any]) -> dict[str, Any]:
    """What the JSON says about the GPUs: names, memory, driver, CUDA."""
    snaps = provider.snapshot() if provider is not None else []
    cuda_driver = None
    if provider is not None:
        with contextlib.suppress(Exception):
            import pynvml

            v = int(pynvml.nvmlSystemGetCudaDriverVersion())
            cuda_driver = f"{v // 1000}.{v % 1000 // 10}"
    return {
        "devices": [{"index": s.index, "name": s.name, "uuid": s.uuid,
                     "total_vram_mib": s.total_vram_mb} for s in snaps],
        "driver_version": provider.driver_version if provider is not None else None,
        "cuda_driver_version": cuda_driver,
        "torch_version": torch_info.get("torch_version"),
        "torch_cuda_version": torch_info.get("cuda_version"),
        "torch_cuda_available": torch_info.get("cuda_available"),
    }


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown-gpu"


# --- NVML sampling -------------------------------------------------------------------------------


class UtilSampler:
    """Reads NVML's GPU utilisation and memory in use on some GPUs every ``interval_s``, in a
    thread, as (perf_counter time, GPU index, utilisation %, memory used MiB). A failed read
    is counted, never raised."""

    def __init__(self, indexes: list[int], interval_s: float) -> None:
        import pynvml

        self.nvml: Any = pynvml
        self.nvml.nvmlInit()  # reference-counted: the provider's session stays open too
        self.handles = {i: self.nvml.nvmlDeviceGetHandleByIndex(i) for i in indexes}
        self.interval_s = interval_s
        self.samples: list[tuple[float, int, float, int]] = []
        self.errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="nvml-sampler", daemon=True)

    def __enter__(self) -> UtilSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        with contextlib.suppress(Exception):
            self.nvml.nvmlShutdown()

    def _run(self) -> None:
        next_at = time.perf_counter()
        while not self._stop.is_set():
            for index, handle in self.handles.items():
                try:
                    util = float(self.nvml.nvmlDeviceGetUtilizationRates(handle).gpu)
                    used = int(self.nvml.nvmlDeviceGetMemoryInfo(handle).used) // (1 << 20)
                except Exception:  # NVMLError*, a lost GPU: count it, keep sampling
                    self.errors += 1
                    continue
                self.samples.append((time.perf_counter(), index, util, used))
            next_at += self.interval_s
            self._stop.wait(max(0.0, next_at - time.perf_counter()))

    def summary(self, t0: float, t1: float) -> dict[str, Any]:
        """Utilisation over the samples between the first and last TRIM of [t0, t1]."""
        lo, hi = t0 + TRIM * (t1 - t0), t1 - TRIM * (t1 - t0)
        steady = [s for s in self.samples if lo <= s[0] <= hi]
        during = [s for s in self.samples if t0 <= s[0] <= t1]

        def stats(rows: list[tuple[float, int, float, int]]) -> dict[str, Any]:
            utils = [r[2] for r in rows]
            return {"samples": len(rows),
                    "mean_pct": statistics.fmean(utils) if utils else None,
                    "p50_pct": percentile(utils, 50) if utils else None,
                    "min_pct": min(utils) if utils else None,
                    "max_pct": max(utils) if utils else None}

        return {
            **stats(steady),
            "window_s": [round(lo - t0, 3), round(hi - t0, 3)],
            "run_s": round(t1 - t0, 3),
            "sample_interval_ms": self.interval_s * 1000,
            "samples_whole_run": len(during), "read_errors": self.errors,
            "per_gpu": {str(i): stats([r for r in steady if r[1] == i]) for i in self.handles},
            "memory_used_mib_max": {str(i): max((r[3] for r in during if r[1] == i),
                                                default=None) for i in self.handles},
        }


# --- gpulane -------------------------------------------------------------------------------------


def preset_entry(name: str, args: argparse.Namespace) -> dict[str, Any]:
    import yaml

    model = MODEL_OF[name]
    example = yaml.safe_load(EXAMPLE_YAML[model].read_text())["presets"][0]
    env = dict(example.get("env") or {})
    vram_mb = int(example.get("vram_mb") or 1024)
    replicas = 1
    if model == "matmul":
        env["MATMUL_LAYERS"] = str(args.matmul_layers)
        vram_mb = args.matmul_layers * MATMUL_LAYER_MIB + 1024  # + CUDA context, cuBLAS
        replicas = args.matmul_replicas
    entry: dict[str, Any] = {
        "name": name,
        "argv": ["python", str(WORKERS_DIR / f"{model}_worker.py")],
        "workdir": str(EXAMPLE_YAML[model].parent),
        "mode": "session",
        "devices": ["cpu" if name.endswith("-cpu") else "gpu"],
        "replicas": replicas,
        "batch": dict(BATCH),
        "env": env,
        "idle_unload_s": 3600,
        "start_timeout_s": START_TIMEOUT_S,
        "timeout_s": example.get("timeout_s", 60),
    }
    if not name.endswith("-cpu"):
        entry["vram_mb"] = vram_mb
    return entry


def write_presets(folder: Path, args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """The run's presets in one YAML file; returns name -> preset entry."""
    import yaml

    folder.mkdir(parents=True, exist_ok=True)
    written = {name: preset_entry(name, args) for name in args.presets}
    (folder / "gpu-bench.yaml").write_text(yaml.safe_dump({"presets": list(written.values())},
                                                         sort_keys=False))
    return written


def start_server(procs: Procs, presets_dir: Path, data_dir: Path, log_dir: Path,
                 env: dict[str, str], simulate: str | None) -> tuple[Any, str]:
    """bench.batching.start_server with the GPU source as a parameter: NVML (None) or a
    simulated spec (the dry run)."""
    import httpx

    port = free_port()
    exe = Path(sys.executable).with_name("gpulane")
    argv = [str(exe)] if exe.exists() else [sys.executable, "-m", "gpulane"]
    argv += ["serve", "--data-dir", str(data_dir), "--port", str(port), "--presets",
             str(presets_dir), "--no-examples", "--log-level", "warning"]
    if simulate:
        argv += ["--simulate-gpus", simulate]
    proc = procs.add(start_proc("gpulane", argv, log_dir=log_dir, env=env))
    url = f"http://127.0.0.1:{port}"
    wait_until(lambda: httpx.get(f"{url}/readyz", timeout=2.0).status_code == 200,
               timeout=READY_TIMEOUT_S, what="gpulane /readyz", proc=proc)
    return proc, url


def gpu_indexes(workers: list[dict[str, Any]]) -> list[int]:
    """The GPUs (NVML indexes: gpulane numbers them as NVML does) the workers sit on."""
    found: set[int] = set()
    for w in workers:
        device = str(w.get("device") or "")
        if device.startswith("gpu:"):
            found.update(int(i) for i in device[4:].split(",") if i.strip().isdigit())
    return sorted(found)


def first_task(url: str, preset: str, model: str) -> None:
    """One task, which starts the preset's first worker (loads the model); wait for it."""
    import httpx

    deadline = time.monotonic() + START_TIMEOUT_S
    task = httpx.post(f"{url}/v1/tasks", params={"wait": WAIT_S}, timeout=WAIT_S + 30,
                      json={"preset": preset, "input": make_input(model, 0)}).json()
    while task.get("state") in ("queued", "running") and time.monotonic() < deadline:
        task = httpx.get(f"{url}/v1/tasks/{task['id']}/result", params={"wait": WAIT_S},
                         timeout=WAIT_S + 30).json()
    if task.get("state") != "succeeded" or not output_ok(model, task.get("output")):
        raise RuntimeError(f"{preset}: the first task did not succeed: {task}")


def warm_up(url: str, preset: str, model: str, args: argparse.Namespace, caller: Any
            ) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """Bursts of ``--warmup`` requests until no worker of the preset is starting and a burst
    started none (a backlog is what makes the scheduler start replicas); returns the workers
    and the last burst's figures."""
    last: dict[str, Any] | None = None
    seen: set[str] = set()
    for _ in range(6):
        if args.warmup:
            last = asyncio.run(drive(args.warmup, args.concurrency, caller))
            if last["bad"]:
                raise RuntimeError(f"{preset}: {last['bad']} bad answers in the warm-up")
        wait_until(lambda: not any(w["state"] == "starting" for w in workers_of(url, preset)),
                   timeout=START_TIMEOUT_S, what=f"{preset}'s workers to start", interval=0.5)
        ids = {w["id"] for w in workers_of(url, preset)}
        if ids == seen or not args.warmup:
            break
        seen = ids
    return workers_of(url, preset), last


def bench_preset(url: str, server_pid: int, preset: str, args: argparse.Namespace,
                 sample: bool) -> dict[str, Any]:
    model = MODEL_OF[preset]
    host, port = url.removeprefix("http://").split(":")
    caller = gpulane_caller(host, int(port), model, preset)
    first_task(url, preset, model)
    workers, warm = warm_up(url, preset, model, args, caller)
    if preset.endswith("-cpu"):
        n = args.cpu_requests
    else:
        rate = warm["requests_per_s"] if warm else 0.0
        n = min(MAX_REQUESTS, max(args.requests, math.ceil(rate * args.min_seconds)))
    indexes = gpu_indexes(workers)
    before = {w["id"]: w["batch"] or {} for w in workers}
    pids = [w.get("pid") for w in workers]
    s0, w0 = proc_cpu_s(server_pid), [proc_cpu_s(p) for p in pids]
    meter = CpuMeter()
    sampler = UtilSampler(indexes, args.sample_ms / 1000) if sample and indexes else None
    with sampler or contextlib.nullcontext():
        t0 = time.perf_counter()
        result = asyncio.run(drive(n, args.concurrency, caller))
        t1 = time.perf_counter()
    result["noise"] = meter.stop()
    s1, w1 = proc_cpu_s(server_pid), [proc_cpu_s(p) for p in pids]
    after_workers = workers_of(url, preset)
    if {w["id"] for w in after_workers} != set(before):
        raise RuntimeError(f"{preset}: its workers changed during the run: {after_workers}")
    after = {w["id"]: w["batch"] or {} for w in after_workers}
    batches = sum((after[i].get("batches") or 0) - (b.get("batches") or 0)
                  for i, b in before.items())
    tasks = sum((after[i].get("tasks") or 0) - (b.get("tasks") or 0) for i, b in before.items())
    worker_cpu = None
    if all(x is not None for x in (*w0, *w1)):
        worker_cpu = sum(x or 0.0 for x in w1) - sum(x or 0.0 for x in w0)
    result.update({
        "preset": preset, "model": model, "requests_floor": args.requests,
        "warmup_requests_per_s": warm["requests_per_s"] if warm else None,
        "workers": [{"id": w["id"], "pid": w.get("pid"), "device": w.get("device")}
                    for w in workers],
        "gpus": indexes,
        "batches": batches, "batched_tasks": tasks,
        "mean_batch": tasks / batches if batches else None,
        "batcher_after": after,
        "server_cpu_s_per_request": None if s0 is None or s1 is None else (s1 - s0) / n,
        "worker_cpu_s_per_request": None if worker_cpu is None else worker_cpu / n,
        "gpu_utilisation": sampler.summary(t0, t1) if sampler else None,
    })
    return result


def worker_vram(provider: Any, result: dict[str, Any]) -> dict[str, int | None] | None:
    """GPU memory each of the preset's worker processes holds (NVML's process list)."""
    if provider is None:
        return None
    used = {p.pid: p.used_vram_mb for s in provider.snapshot() for p in s.processes}
    return {str(w["pid"]): used.get(w["pid"]) for w in result["workers"]}


def bench_gpulane(args: argparse.Namespace, procs: Procs, tmp: Path, log_dir: Path,
                  env: dict[str, str], provider: Any) -> dict[str, Any]:
    import httpx

    presets = write_presets(tmp / "presets", args)
    proc, url = start_server(procs, tmp / "presets", tmp / "gpulane-data", log_dir, env,
                             DRY_RUN_GPUS if args.dry_run else None)
    gpus = httpx.get(f"{url}/v1/gpus", timeout=10.0).json()
    if not args.dry_run and gpus.get("simulated"):
        raise RuntimeError(f"the node fell back to simulated GPUs: {gpus.get('reason')}")
    print(f"gpulane: serving at {url} (pid {proc.pid}); {gpus.get('reason')}", flush=True)
    out: dict[str, Any] = {"url": url, "presets": presets, "node_gpus": gpus, "runs": {}}
    for preset in args.presets:
        print(f"{preset}: starting its worker(s) and warming up", flush=True)
        r = bench_preset(url, proc.pid, preset, args,
                         sample=provider is not None and preset in GPU_PRESETS)
        r["worker_vram_mib"] = worker_vram(provider, r)
        _report_run(preset, r)
        util = r["gpu_utilisation"]
        if util is not None:
            mean = util["mean_pct"]
            print(f"    GPU {','.join(map(str, r['gpus']))}: utilisation mean "
                  f"{_pct(mean)}, p50 {_pct(util['p50_pct'])} over {util['samples']} samples "
                  f"({util['run_s']:.1f} s run)", flush=True)
        out["runs"][preset] = r
    out["workers_at_end"] = httpx.get(f"{url}/v1/workers", timeout=10.0).json()["workers"]
    return out


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0f} %"


# --- report --------------------------------------------------------------------------------------


def report(args: argparse.Namespace, g: dict[str, Any]) -> dict[str, Any]:
    headers = ["preset", "device", "workers", "requests", "requests/s", "p50 ms", "p99 ms",
               "mean batch", "GPU util mean %", "GPU util p50 %", "GPU mem MiB"]
    nan = float("nan")
    rows: list[list[Any]] = []
    for preset in args.presets:
        r = g["runs"][preset]
        util = r["gpu_utilisation"] or {}
        mem = [m for m in (util.get("memory_used_mib_max") or {}).values() if m is not None]
        devices = ",".join(sorted({w["device"] or "?" for w in r["workers"]}))
        rows.append([preset, devices, len(r["workers"]), r["requests"], r["requests_per_s"],
                     r["p50_ms"], r["p99_ms"], r["mean_batch"] or nan,
                     _num(util.get("mean_pct")), _num(util.get("p50_pct")),
                     float(max(mem)) if mem else nan])
    runs = g["runs"]
    speedup = None
    if "embed-gpu" in runs and "embed-cpu" in runs:
        speedup = runs["embed-gpu"]["requests_per_s"] / runs["embed-cpu"]["requests_per_s"]
    per_preset: dict[str, Any] = {}
    for preset in GPU_PRESETS:
        if preset not in runs:
            continue
        mean = (runs[preset]["gpu_utilisation"] or {}).get("mean_pct")
        per_preset[preset] = {"mean_pct": mean,
                              "met": None if mean is None else mean >= GOAL_UTIL_PCT}
    measured = [p["met"] for p in per_preset.values() if p["met"] is not None]
    goals = {"gpu_utilisation": {
        "goal": f"mean NVML GPU utilisation >= {GOAL_UTIL_PCT:.0f} % in the steady middle "
                "(first and last 10 % dropped) of a saturating run, for at least one of "
                f"{', '.join(GPU_PRESETS)}",
        "per_preset": per_preset,
        "met": any(measured) if measured else None}}
    print()
    table = print_table(headers, rows)
    print()
    if speedup is not None:
        print(f"embed GPU vs CPU: {speedup:.2f}x the requests/s "
              f"({runs['embed-gpu']['requests_per_s']:,.0f} vs "
              f"{runs['embed-cpu']['requests_per_s']:,.0f})"
              + (" [dry run: both on the CPU]" if args.dry_run else ""))
    for preset, p in per_preset.items():
        if p["met"] is None:
            why = "dry run, no NVML" if args.dry_run else "no samples"
            print(f"{preset} GPU utilisation: not measured ({why})")
        else:
            print(f"{preset} GPU utilisation: mean {p['mean_pct']:.1f} % (goal >= "
                  f"{GOAL_UTIL_PCT:.0f} %): {'MET' if p['met'] else 'MISSED'}")
    if goals["gpu_utilisation"]["met"] is False:
        print("hint: the GPU waited on the rest of the pipeline (client, server, worker CPU); "
              "more GPU work per request (--matmul-layers) or more workers per GPU "
              "(--matmul-replicas) load it more")
    return {"table": table, "markdown": markdown_table(headers, rows),
            "ratios": {"embed_gpu_over_cpu_requests_per_s": speedup},
            "goals": goals, "all_goals_met": goals["gpu_utilisation"]["met"]}


def _num(value: float | None) -> float:
    return float("nan") if value is None else float(value)


# --- main ----------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    dflt = " (default %s; dry run %s)"
    p.add_argument("--requests", type=int, help="measured requests per GPU preset, at least"
                   + dflt % (GPU_DEFAULTS["requests"], DRY_DEFAULTS["requests"]))
    p.add_argument("--cpu-requests", type=int, help="measured requests for embed-cpu"
                   + dflt % (GPU_DEFAULTS["cpu_requests"], DRY_DEFAULTS["cpu_requests"]))
    p.add_argument("--concurrency", type=int, help="client coroutines"
                   + dflt % (GPU_DEFAULTS["concurrency"], DRY_DEFAULTS["concurrency"]))
    p.add_argument("--warmup", type=int, help="requests per warm-up burst"
                   + dflt % (GPU_DEFAULTS["warmup"], DRY_DEFAULTS["warmup"]))
    p.add_argument("--min-seconds", type=float,
                   help="GPU presets get more requests if needed to last this long at the "
                   "warm-up's rate" + dflt % (GPU_DEFAULTS["min_seconds"],
                                                DRY_DEFAULTS["min_seconds"]))
    p.add_argument("--matmul-layers", type=int, help="MATMUL_LAYERS of matmul-gpu"
                   + dflt % (GPU_DEFAULTS["matmul_layers"], DRY_DEFAULTS["matmul_layers"]))
    p.add_argument("--matmul-replicas", type=int, help="matmul-gpu workers per GPU"
                   + dflt % (GPU_DEFAULTS["matmul_replicas"], DRY_DEFAULTS["matmul_replicas"]))
    p.add_argument("--presets", default=",".join(PRESETS),
                   help="comma-separated subset (default %(default)s)")
    p.add_argument("--sample-ms", type=float, default=100.0,
                   help="NVML sampling interval (default %(default)s)")
    p.add_argument("--allow-cpu-only", action="store_true",
                   help="without a usable GPU, run a dry run (one simulated GPU, workers on the "
                        "CPU, small sizes, NVML figures null) instead of exiting with status 3")
    p.add_argument("--out", type=Path, help="where to write the JSON (default bench/results/"
                   "gpu-<gpu name>.json; a dry run: a temporary file)")
    p.add_argument("--keep-logs", action="store_true", help="keep the server's logs")
    p.add_argument("--check-goals", action="store_true",
                   help="exit with status 1 when the goal is missed")
    args = p.parse_args(argv)
    args.presets = [s.strip() for s in args.presets.split(",") if s.strip()]
    if not args.presets or any(s not in PRESETS for s in args.presets):
        p.error(f"--presets takes a comma-separated subset of {','.join(PRESETS)}")
    for key in ("requests", "cpu_requests", "concurrency", "matmul_layers", "matmul_replicas"):
        if getattr(args, key) is not None and getattr(args, key) < 1:
            p.error(f"--{key.replace('_', '-')} must be >= 1")
    if (args.warmup or 0) < 0 or (args.min_seconds or 0) < 0 or args.sample_ms <= 0:
        p.error("--warmup and --min-seconds must be >= 0, --sample-ms > 0")
    return args


def fill_defaults(args: argparse.Namespace, dry_run: bool) -> None:
    args.dry_run = dry_run
    for key, value in (DRY_DEFAULTS if dry_run else GPU_DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)


def _terminated(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds through the finally blocks that stop the server


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    stop_on_signals()
    provider, torch_info, why = probe_gpu()
    if provider is None and not args.allow_cpu_only:
        print(f"bench/gpu.py: skipped (exit {SKIPPED}, nothing written): no usable NVIDIA GPU "
              f"({why}); expected on a CPU-only machine, where `make bench` can treat exit "
              f"{SKIPPED} as skipped; --allow-cpu-only runs a dry run on the CPU", file=sys.stderr)
        return SKIPPED
    fill_defaults(args, dry_run=provider is None)
    if args.dry_run:
        print(f"dry run on the CPU, no GPU: {why}; one simulated GPU ({DRY_RUN_GPUS}), "
              "NVML figures null", flush=True)
    run_id = uuid.uuid4().hex
    env = child_env(**{MARKER: run_id})
    env.pop("MATMUL_THREADS", None)
    tmp = Path(tempfile.mkdtemp(prefix="gpulane-bench-gpu-"))
    log_dir = tmp / "logs"
    log_dir.mkdir()
    started = time.time()
    load_start = list(os.getloadavg())
    try:
        info = gpu_info(provider, torch_info)
        with Procs() as procs:  # the server is stopped here, however the block ends
            g = bench_gpulane(args, procs, tmp, log_dir, env, provider)
    except BaseException:
        return run_failed(run_id, log_dir)
    finally:
        reap_marked(run_id)
        if provider is not None:
            provider.close()
    if args.keep_logs:
        print(f"logs: {log_dir}", file=sys.stderr)
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    summary = report(args, g)
    used = sorted({i for r in g["runs"].values() for i in r["gpus"]})
    by_index = {d["index"]: d for d in info["devices"]}
    gpu_name = by_index[used[0]]["name"] if used and used[0] in by_index else None
    out = args.out
    if out is None:
        out = (Path(tempfile.gettempdir()) / "gpulane-bench-gpu-dry-run.json" if args.dry_run
               else REPO / "bench" / "results" / f"gpu-{slug(gpu_name or 'unknown-gpu')}.json")
    data = {
        **run_record("gpu", "bench/gpu.py", argv, started, load_start,
                     code_paths=("src", "bench", "examples"),
                     machine_extra={"gpu": info, "gpus_used": used}),
        "dry_run": args.dry_run,
        "dry_run_reason": why or None,
        "gpu_name": gpu_name,
        "parameters": {
            "presets": args.presets,
            "requests_floor": args.requests, "min_seconds": args.min_seconds,
            "cpu_requests": args.cpu_requests, "concurrency": args.concurrency,
            "warmup_burst": args.warmup, "batch": BATCH,
            "matmul_layers": args.matmul_layers, "matmul_replicas_per_gpu":
                args.matmul_replicas,
            "inputs": {"matmul": '{"seed": i} (the worker builds a 2048-float vector)',
                       "embed": '{"text": a 14-word sentence varying with i}'},
            "load": f"{args.concurrency} asyncio coroutines share the requests, one single-item "
                    "request at a time each, timed from send to answer",
            "gpulane_node": "gpulane serve --no-examples"
                            + (f" --simulate-gpus {DRY_RUN_GPUS}" if args.dry_run
                               else " (NVML provider)") + ", SQLite store",
            "gpulane_client": f"asyncio HTTP/1.1 (bench/batching.py), one keep-alive "
                              f"connection per coroutine, POST /v1/tasks?wait={WAIT_S}",
            "nvml_sampling": None if args.dry_run else {
                "what": "nvmlDeviceGetUtilizationRates().gpu and nvmlDeviceGetMemoryInfo().used"
                        " on each GPU the preset's workers sit on",
                "interval_ms": args.sample_ms,
                "steady_window": f"the first and last {TRIM:.0%} of the measured run dropped"},
        },
        **summary,
        "results": g,
    }
    write_json(out, data)
    note = " (a dry run: not a result, kept out of bench/results/)" if args.dry_run else ""
    print(f"\nwrote {out}{note} ({data['duration_s']:.0f} s)")
    return 1 if args.check_goals and summary["all_goals_met"] is False else 0


if __name__ == "__main__":
    sys.exit(main())
