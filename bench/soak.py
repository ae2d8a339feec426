"""Soak benchmark: a node that is killed, and a node that runs for long, lose nothing and keep
their state bounded.

    .venv/bin/python bench/soak.py [--scenario chaos|retention|both]
        chaos:     [--seconds 60] [--rate 200] [--node-kills 10] [--worker-kills 100]
                   [--mates 15] [--drain-timeout 180]
        retention: [--tasks 200000] [--baseline 20000] [--retain 30] [--task-rate 1000]
                   [--bulk 500] [--leases 1000]
        [--out bench/results/soak.json]

chaos: a real ``gpulane serve`` (2 simulated GPUs, bench/presets loaded) takes ``--rate``
submits/s of ``poison-sleep`` tasks, each with an idempotency key so a submit retried after a
kill is safe, while the node is killed -9 and restarted ``--node-kills`` times and a worker
(a pid from GET /v1/workers) is killed -9 ``--worker-kills`` times, spread over the run. Part
way through, one bulk submit mixes a poison input (its worker os._exit()s) with ``--mates``
ordinary tasks, so they share batches. Afterwards every acknowledged task is read back, with
its events. Must hold: 0 acknowledged tasks lost, 0 tasks with two recorded successes (state
events ``succeeded``), every batch-mate succeeded, the poison task ``failed`` with kind
``worker_died`` after max_attempts.

retention: ``--tasks`` ``sleep`` tasks (ms 0), submitted in bulks of ``--bulk`` at
``--task-rate`` a second (so that the run spans several purge rounds), through one node
started with ``GPULANE_RETAIN=--retain``, while ``--leases`` leases are taken and given back.
Must hold: the node's RSS at the end within 10 % of its RSS after the first ``--baseline``
tasks; the database no more than 10 % larger at the end than once purges keep pace (after the
retention and two purge rounds, judged when the run lasts that long); no task row left a purge
round after the last one's retention; no lease active at the end. Also reported: DB size and
rows and RSS at every tenth of the run, and GET /v1/status (housekeeping: purge counters,
rows, database bytes).

Prints a table per scenario, writes ``--out`` as JSON, and exits 1 if a must-hold failed.
The scenarios live in bench/soak_chaos.py and bench/soak_retention.py (their shared parts
in bench/soak_node.py); tests/chaos runs them small.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._util import REPO, print_table, run_record, stop_on_signals, write_json
from bench.soak_chaos import ChaosConfig, chaos
from bench.soak_retention import RetentionConfig, retention


def print_figures(title: str, figures: dict[str, Any]) -> None:
    print(f"\n{title}")
    rows = [[k, v if isinstance(v, int | float | str | bool) or v is None else str(v)]
            for k, v in figures.items()
            if k not in ("problems", "config", "samples", "end_status", "purged_status")]
    print_table(["figure", "value"], rows)
    if figures.get("samples"):
        print_table(["done", "s", "rss_mb", "db_mb", "task_rows"],
                    [list(x.values()) for x in figures["samples"]])
    for key in ("end_status", "purged_status"):  # the node's own view, less the presets
        if figures.get(key) is not None:
            view = {k: v for k, v in figures[key].items() if k != "presets"}
            print(f"{key}: {view}")
    for problem in figures["problems"]:
        print(f"MUST-HOLD FAILED: {problem}")


def main() -> int:
    doc = __doc__ or ""
    ap = argparse.ArgumentParser(description=doc.split("\n")[0])
    ap.add_argument("--scenario", choices=["chaos", "retention", "both"], default="both")
    c, r = ChaosConfig(), RetentionConfig()
    ap.add_argument("--seconds", type=float, default=c.seconds)
    ap.add_argument("--rate", type=float, default=c.rate)
    ap.add_argument("--node-kills", type=int, default=c.node_kills)
    ap.add_argument("--worker-kills", type=int, default=c.worker_kills)
    ap.add_argument("--mates", type=int, default=c.mates)
    ap.add_argument("--drain-timeout", type=float, default=c.drain_timeout_s)
    ap.add_argument("--tasks", type=int, default=r.tasks)
    ap.add_argument("--baseline", type=int, default=r.baseline)
    ap.add_argument("--retain", type=float, default=r.retain_s)
    ap.add_argument("--task-rate", type=float, default=r.rate)
    ap.add_argument("--bulk", type=int, default=r.bulk)
    ap.add_argument("--leases", type=int, default=r.leases)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "soak.json")
    args = ap.parse_args()
    stop_on_signals()
    started, load = time.time(), list(os.getloadavg())
    record: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="gpulane-soak-") as tmp:
        if args.scenario in ("chaos", "both"):
            cfg = ChaosConfig(seconds=args.seconds, rate=args.rate, node_kills=args.node_kills,
                              worker_kills=args.worker_kills, mates=args.mates,
                              drain_timeout_s=args.drain_timeout)
            (Path(tmp) / "chaos").mkdir()
            record["chaos"] = {"config": asdict(cfg), **chaos(cfg, Path(tmp) / "chaos")}
            print_figures("chaos", record["chaos"])
        if args.scenario in ("retention", "both"):
            rcfg = RetentionConfig(tasks=args.tasks, baseline=args.baseline,
                                   retain_s=args.retain, rate=args.task_rate, bulk=args.bulk,
                                   leases=args.leases)
            (Path(tmp) / "retention").mkdir()
            record["retention"] = {"config": asdict(rcfg),
                                   **retention(rcfg, Path(tmp) / "retention")}
            print_figures("retention", record["retention"])
    write_json(args.out, {**run_record("soak", "bench/soak.py", None, started, load), **record})
    print(f"wrote {args.out}")
    return 1 if any(s["problems"] for s in record.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
