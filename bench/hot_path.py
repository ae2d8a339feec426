"""Node CPU per request on the hot routes, this tree against another side by side.

    .venv/bin/python bench/hot_path.py [--base-src PATH] [--src PATH] [--blocks 20]
                                       [--out bench/results/hot_path.json]

Starts a fresh ``gpulane serve`` (embedded SQLite, 2 simulated GPUs, the ``sleep`` preset's
two session workers warmed up) from this checkout (``--src``: from another ``src`` folder),
and with ``--base-src`` a second one from another version (e.g. ``git archive dff7ec6 src
examples | tar -x -C /tmp/base``, then ``--base-src /tmp/base/src``). Then ``--blocks`` blocks
of each kind of call, the two nodes taking turns block by block (the first alternating), so
that the load of a shared machine falls on both alike:

* ``B``: ``Client.run("sleep", {"ms": 0})``, a submit-and-wait round trip (50 a block);
* ``submit``: a plain ``POST /v1/tasks`` (50; the tasks run meanwhile, their cost counted);
* ``results 1`` / ``results 100``: ``POST /v1/tasks/results`` for 1 or 100 final tasks
  (100 and 20 a block; a node without the route answers 404, its figure then says nothing);
* ``get``: ``GET /v1/tasks/{id}`` of a final task (100).

Then, in this process, group commit on its own: ``GROUP_TASKS`` submits to a fresh SQLite
store (a file, ``synchronous=NORMAL`` as the node runs it), written one at a time (each
awaited before the next: a write each) and in groups of 64 made together (``asyncio.gather``:
one write a group), CPU per submit from ``time.process_time``, three rounds alternating.

Node CPU is the on-CPU time of every thread of the ``gpulane serve`` process
(``/proc/PID/task/*/schedstat``, nanoseconds) around each block, divided by its calls; the
table shows the median block per kind and node, in ms. Calls go through one keep-alive
connection (``http.client``) or the SDK (B), from this process.
"""

from __future__ import annotations

import argparse
import glob
import http.client
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._util import (
    CpuMeter,
    Procs,
    print_table,
    run_record,
    start_gpulane,
    stop_on_signals,
    write_json,
)
from bench.dispatch import warm_gpulane

KINDS = {"B": 50, "submit": 50, "results 1": 100, "results 100": 20, "get": 100}
"""Each kind of call and how many make a block."""
FINAL_TASKS = 200
"""Tasks run to the end before the blocks: what results and get read."""
GROUP_TASKS = 3_000
"""Submits per round of the group commit figure."""
GROUP_SIZE = 64
"""Submits made together per group (as 64 threads calling run() would)."""


def node_cpu_ns(pid: int) -> int:
    """On-CPU nanoseconds of every live thread of a process (schedstat's first field)."""
    total = 0
    for path in glob.glob(f"/proc/{pid}/task/*/schedstat"):
        try:
            total += int(Path(path).read_text().split()[0])
        except (FileNotFoundError, ProcessLookupError):
            pass  # a thread that ended meanwhile
    return total


class Target:
    """One node under test and its callers."""

    def __init__(self, procs: Procs, name: str, src: Path | None) -> None:
        from gpulane.client import Client

        self.name = name
        if src is not None:
            os.environ["PYTHONPATH"] = str(src)
        else:
            os.environ.pop("PYTHONPATH", None)
        tmp = Path(tempfile.mkdtemp(prefix="gl-hot-"))
        (tmp / "logs").mkdir()
        self.proc, url = start_gpulane(procs, tmp / "data", tmp / "logs", name=name)
        os.environ.pop("PYTHONPATH", None)
        warm_gpulane(url, self.proc, 200)
        host, port = url.split("//")[1].split(":")
        self.conn = http.client.HTTPConnection(host, int(port))
        self.client = Client(url)
        self.ids = [self.post("/v1/tasks", {"preset": "sleep", "input": {"ms": 0}})["id"]
                    for _ in range(FINAL_TASKS)]
        for tid in self.ids:
            self.client.result(tid, wait=30)
        self.cpu_ms: dict[str, list[float]] = {}

    def post(self, path: str, body: Any) -> Any:
        self.conn.request("POST", path, body=json.dumps(body),
                          headers={"Content-Type": "application/json"})
        return json.loads(self.conn.getresponse().read())

    def block(self, kind: str, n: int) -> None:
        # A connection idle past the server's keep-alive timeout (the other node's blocks)
        # is closed by it: each block opens its connections first, uncounted.
        self.conn.close()
        self.conn.request("GET", "/healthz")
        self.conn.getresponse().read()
        self.client.result(self.ids[0])
        start = node_cpu_ns(self.proc.pid)
        for k in range(n):
            if kind == "B":
                self.client.run("sleep", {"ms": 0})
            elif kind == "submit":
                self.post("/v1/tasks", {"preset": "sleep", "input": {"ms": 0}})
            elif kind == "results 1":
                self.post("/v1/tasks/results", {"ids": [self.ids[k % FINAL_TASKS]]})
            elif kind == "results 100":
                self.post("/v1/tasks/results", {"ids": self.ids[:100]})
            else:
                self.conn.request("GET", f"/v1/tasks/{self.ids[k % FINAL_TASKS]}")
                self.conn.getresponse().read()
        used = node_cpu_ns(self.proc.pid) - start
        self.cpu_ms.setdefault(kind, []).append(used / n / 1e6)

    def close(self) -> None:
        self.client.close()
        self.conn.close()


def group_commit_ms() -> dict[str, list[float]]:
    """Store CPU per submit, written alone and grouped (see the module docstring)."""
    import asyncio

    from gpulane.model import TaskSpec
    from gpulane.store.sqlite import SqliteStore

    async def one(grouped: bool) -> float:
        store = SqliteStore(Path(tempfile.mkdtemp(prefix="gl-group-")) / "gpulane.db")
        await store.open()
        specs = [TaskSpec(preset="p", input={"i": i}, priority=50, lane="gpu")
                 for i in range(GROUP_TASKS)]
        start = time.process_time()
        if grouped:
            for k in range(0, GROUP_TASKS, GROUP_SIZE):
                await asyncio.gather(*(store.submit(s) for s in specs[k:k + GROUP_SIZE]))
        else:
            for spec in specs:
                await store.submit(spec)
        used = time.process_time() - start
        await store.close()
        return used / GROUP_TASKS * 1000

    out: dict[str, list[float]] = {"alone": [], "grouped": []}
    for r in range(3):
        for mode in (("alone", "grouped") if r % 2 == 0 else ("grouped", "alone")):
            out[mode].append(asyncio.run(one(mode == "grouped")))
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-src", type=Path, default=None,
                        help="a src folder of another version, served side by side")
    parser.add_argument("--src", type=Path, default=None,
                        help="the first node's src folder (default: this checkout's)")
    parser.add_argument("--blocks", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path("bench/results/hot_path.json"))
    args = parser.parse_args(argv)
    stop_on_signals()
    started, load_start = time.time(), list(os.getloadavg())
    meter = CpuMeter()
    with Procs() as procs:
        targets = [Target(procs, "this-tree" if args.src is None else "src",
                          None if args.src is None else args.src.resolve())]
        if args.base_src is not None:
            targets.append(Target(procs, "base", args.base_src.resolve()))
        for b in range(args.blocks):
            for kind, n in KINDS.items():
                for target in (targets if b % 2 == 0 else targets[::-1]):
                    target.block(kind, n)
                if kind == "submit":
                    time.sleep(0.2)  # the submitted tasks run before the next kind's blocks
        for target in targets:
            target.close()
    rows = [[t.name, *(round(statistics.median(t.cpu_ms[k]), 3) for k in KINDS)]
            for t in targets]
    print_table(["node CPU ms / call (median block)", *KINDS], rows)
    group = group_commit_ms()
    print_table(["SQLite submit, ms CPU / task (median of 3)", "written alone",
                 f"in groups of {GROUP_SIZE}"],
                [["store + group commit", round(statistics.median(group["alone"]), 4),
                  round(statistics.median(group["grouped"]), 4)]])
    record = {**run_record("hot_path", "bench/hot_path.py", argv, started, load_start),
              "src": str(args.src) if args.src else None,
              "base_src": str(args.base_src) if args.base_src else None,
              "load": meter.stop(), "blocks": args.blocks, "calls_per_block": KINDS,
              "group_commit_ms_per_task": group,
              "nodes": {t.name: {k: {"median_ms": statistics.median(v),
                                     "min_ms": min(v), "max_ms": max(v), "blocks_ms": v}
                                 for k, v in t.cpu_ms.items()} for t in targets}}
    write_json(args.out, record)
    return record


if __name__ == "__main__":
    main()
