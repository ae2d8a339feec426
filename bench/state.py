"""State benchmark: does a node's state stay bounded under steady load with a short retention,
and what does retention cost the event loop?

    .venv/bin/python bench/state.py [--tasks 20000] [--round 1000] [--retain-s 1]
                                    [--out bench/results/state.json]

In one process, on a SQLite store in a temporary folder (as ``gpulane serve`` keeps it):

1. Tasks: ``--tasks`` go through a node-like loop in rounds of ``--round``: submit (bulk of 100,
   half with an idempotency key), claim (batches of 50), a progress event each, finish
   (batches of 50). Meanwhile the Housekeeper's retention pass (``Store.purge`` in its own
   thread, finished before now - ``--retain-s``) runs again as soon as the last one ended,
   concurrently with the work, as the node runs it. After each round: the database's size
   (file and WAL apart) and rows, and the notifier's entries.
2. The stall retention causes: ``--backlog`` finished tasks are purged while the loop serves
   a trickle of single-task writes (submit, claim, finish) and a loop-lag probe (a 1 ms timer:
   how late it fires) runs; the longest write and the longest lag with the purge in flight
   are set against the same trickle with no purge.
3. Leases: 1,000 acquire/release pairs on 2 simulated GPUs; the table's size at once, and once
   the linger has passed (a moved clock).
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

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._util import REPO, percentile, print_table, run_record, write_json

from gpulane.devices import SimulatedProvider, parse_gpu_spec
from gpulane.model import TaskSpec, TaskState
from gpulane.scheduling import leases as leases_mod
from gpulane.scheduling.leases import LeaseManager, LeaseRequest
from gpulane.scheduling.ledger import Ledger
from gpulane.store import Finish, NewEvent, PurgeReport
from gpulane.store.base import body_hash
from gpulane.store.sqlite import SqliteStore
from gpulane.store.sqlite_upkeep import CHECKPOINT_INTERVAL_S

PROBE_S = 0.001
"""The loop-lag probe's timer: how late it fires is how long the loop was held."""

SUBMIT_BULK = 100
"""Tasks per submit_many (the API's bulk route)."""

CLAIM_BATCH = 50
"""Tasks per claim and per finish_many (a session worker's batch)."""


class LagProbe:
    """Fires every PROBE_S and records how late it fired."""

    def __init__(self) -> None:
        self.lags_s: list[float] = []
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            due = loop.time() + PROBE_S
            await asyncio.sleep(PROBE_S)
            lag = loop.time() - due
            self.lags_s.append(lag)


def latency_ms(values: list[float]) -> dict[str, float]:
    return {"p50": percentile(values, 50) * 1000, "p99": percentile(values, 99) * 1000,
            "max": max(values, default=0.0) * 1000, "n": len(values)}


def db_size(store: SqliteStore) -> dict[str, int]:
    """Database file and WAL file, in bytes, as on disk now."""
    out = {}
    for name, suffix in (("db_bytes", ""), ("wal_bytes", "-wal")):
        try:
            out[name] = os.path.getsize(store.path + suffix)
        except OSError:
            out[name] = 0
    return out


def row_counts(store: SqliteStore) -> dict[str, int]:
    return {t: store.db.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0]
            for t in ("tasks", "events", "idempotency")}


async def one_round(store: SqliteStore, base: int, n: int) -> None:
    for start in range(0, n, SUBMIT_BULK):
        specs = []
        for i in range(start, min(n, start + SUBMIT_BULK)):
            key = f"k{base + i}" if i % 2 == 0 else None
            body = {"preset": "sleep", "input": {"ms": 1, "i": base + i}}
            specs.append(TaskSpec(preset="sleep", input=body["input"], idempotency_key=key,
                                  body_hash=body_hash(body) if key else None))
        await store.submit_many(specs)
        await asyncio.sleep(0)  # requests arrive one at a time: let the loop turn
    while True:
        batch = await store.claim("sleep", "gpu", CLAIM_BATCH, "bench", "gpu:0")
        if not batch:
            break
        for t in batch:
            await store.append_events(t.id, [NewEvent("progress", {"done": 1, "total": 1})])
        await store.finish_many([Finish(t.id, t.token, TaskState.SUCCEEDED,
                                        output={"slept_ms": 1}) for t in batch])
        await asyncio.sleep(0)


async def tasks_phase(tmp: Path, total: int, round_n: int, retain_s: float
                      ) -> dict[str, Any]:
    store = SqliteStore(tmp / "gpulane.db")
    await store.open()
    purges: list[dict[str, Any]] = []
    samples: list[dict[str, Any]] = []
    purge_task: asyncio.Task[PurgeReport] | None = None
    started = time.perf_counter()

    async def purge() -> PurgeReport:
        t0 = time.perf_counter()
        report = await store.purge(time.time() - retain_s)
        purges.append({"tasks": report.tasks, "events": report.events, "keys": report.keys,
                       "batches": report.batches,
                       "longest_batch_ms": report.longest_batch_s * 1000,
                       "seconds": time.perf_counter() - t0})
        return report

    try:
        done = 0
        while done < total:
            n = min(round_n, total - done)
            if purge_task is None or purge_task.done():
                purge_task = asyncio.create_task(purge())
            await one_round(store, done, n)
            done += n
            samples.append({"tasks_done": done, **db_size(store), **row_counts(store),
                            "notifier": len(store.notifier),
                            "elapsed_s": round(time.perf_counter() - started, 2)})
        if purge_task is not None:
            await purge_task
        await asyncio.sleep(retain_s)  # the last round's finishes pass the retention
        await purge()
        samples.append({"tasks_done": done, **db_size(store), **row_counts(store),
                        "notifier": len(store.notifier),
                        "elapsed_s": round(time.perf_counter() - started, 2)})
    finally:
        await store.close()
    seconds = time.perf_counter() - started
    working = [p for p in purges if p["tasks"]]
    return {
        "tasks": total, "round": round_n, "retain_s": retain_s,
        "tasks_per_s": total / seconds, "samples": samples, "purges": purges,
        "purge_ms_per_batch_max": max((p["longest_batch_ms"] for p in working), default=0.0),
        "purge_ms_per_1000_tasks": (1000 * sum(p["seconds"] for p in working)
                                    / max(1, sum(p["tasks"] for p in working)) * 1000),
    }


async def trickle(store: SqliteStore, until: asyncio.Event, writes_s: list[float]) -> int:
    """Single-task writes, one every ~1 ms, until ``until`` is set; each call's time kept."""
    n = 0
    while not until.is_set():
        t0 = time.perf_counter()
        await store.submit(TaskSpec(preset="trickle", input={"n": n}))
        writes_s.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        got = await store.claim("trickle", "gpu", 1, "bench", "gpu:0")
        writes_s.append(time.perf_counter() - t0)
        if got:
            t0 = time.perf_counter()
            await store.finish(got[0].id, got[0].token, TaskState.SUCCEEDED)
            writes_s.append(time.perf_counter() - t0)
        n += 1
        await asyncio.sleep(PROBE_S)
    return n


async def stall_phase(tmp: Path, backlog: int, baseline_s: float) -> dict[str, Any]:
    store = SqliteStore(tmp / "stall.db")
    await store.open()
    try:
        await one_round(store, 0, backlog)
        cutoff = time.time()
        # Let the checkpointer fold the backlog's WAL into the file first: its sync competes
        # for the disk with any commit, purge or not, and would land in one run only.
        await asyncio.sleep(3 * CHECKPOINT_INTERVAL_S)
        out: dict[str, Any] = {"backlog": backlog}
        for label in ("no_purge", "purging"):
            probe = LagProbe()
            stop = asyncio.Event()
            writes: list[float] = []
            probe.start()
            writer = asyncio.create_task(trickle(store, stop, writes))
            t0 = time.perf_counter()
            report = None
            if label == "purging":
                report = await store.purge(cutoff)
            else:
                await asyncio.sleep(baseline_s)
            seconds = time.perf_counter() - t0
            stop.set()
            rounds = await writer
            await probe.stop()
            out[label] = {"seconds": seconds, "trickle_rounds": rounds,
                          "write_ms": latency_ms(writes), "loop_lag_ms": latency_ms(probe.lags_s)}
            if report is not None:
                out[label].update({"purged_tasks": report.tasks, "batches": report.batches,
                                   "longest_batch_ms": report.longest_batch_s * 1000})
        return out
    finally:
        await store.close()


async def leases_phase(n: int) -> dict[str, Any]:
    snaps = SimulatedProvider(parse_gpu_spec("2x24GiB")).snapshot()
    mgr = LeaseManager(Ledger(snaps, cpu_slots=2), on_change=lambda: None,
                       preempt_worker=lambda *_: None)
    offset = 0.0
    mgr.clock = lambda: time.time() + offset
    idle = mgr.table_size()
    for i in range(n):
        lease = await mgr.acquire(LeaseRequest(f"bench-{i}", vram_mb=4096), wait_s=0)
        mgr.release(lease.id, lease.token)
    at_once = mgr.table_size()
    offset = leases_mod.FINAL_LINGER_S + 1
    mgr.expire_now()
    return {"leases": n, "idle": idle, "after_release": at_once,
            "after_linger": mgr.table_size(), "linger_s": leases_mod.FINAL_LINGER_S,
            "kept_at_most": leases_mod.FINAL_KEPT}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", type=int, default=20_000)
    ap.add_argument("--round", type=int, default=1000)
    ap.add_argument("--retain-s", type=float, default=1.0)
    ap.add_argument("--leases", type=int, default=1000)
    ap.add_argument("--backlog", type=int, default=10_000)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "state.json")
    args = ap.parse_args()
    started, load = time.time(), list(os.getloadavg())

    with tempfile.TemporaryDirectory(prefix="gpulane-bench-state-") as tmp:
        tasks = asyncio.run(tasks_phase(Path(tmp), args.tasks, args.round, args.retain_s))
        stall = asyncio.run(stall_phase(Path(tmp), args.backlog, baseline_s=1.0))
    leases = asyncio.run(leases_phase(args.leases))

    s = tasks["samples"]
    quarter = s[len(s) // 4]
    print_table(["tasks done", "db MiB", "WAL MiB", "tasks rows", "events rows", "keys rows",
                 "notifier"],
                [[x["tasks_done"], x["db_bytes"] / 2**20, x["wal_bytes"] / 2**20, x["tasks"],
                  x["events"], x["idempotency"], x["notifier"]]
                 for x in [*s[::max(1, len(s) // 10)], s[-1]]])
    calm, busy = stall["no_purge"], stall["purging"]
    print_table(["measure", "value"], [
        ["tasks/s through submit, claim, event, finish", tasks["tasks_per_s"]],
        ["db file MiB after 1/4 of the run", quarter["db_bytes"] / 2**20],
        ["db file MiB at the end (max during the run)",
         f"{s[-1]['db_bytes'] / 2**20:.2f} ({max(x['db_bytes'] for x in s) / 2**20:.2f})"],
        ["WAL MiB max during the run", max(x["wal_bytes"] for x in s) / 2**20],
        ["purge: longest batch transaction (ms)", tasks["purge_ms_per_batch_max"]],
        ["purge: ms per 1,000 tasks (thread time)", tasks["purge_ms_per_1000_tasks"]],
        [f"purge of a {args.backlog:,}-task backlog (s, batches)",
         f"{busy['seconds']:.2f} ({busy['batches']})"],
        ["trickle write p99 / max, purge in flight (ms)",
         f"{busy['write_ms']['p99']:.2f} / {busy['write_ms']['max']:.2f}"],
        ["trickle write p99 / max, no purge (ms)",
         f"{calm['write_ms']['p99']:.2f} / {calm['write_ms']['max']:.2f}"],
        ["loop lag p99 / max, purge in flight (ms)",
         f"{busy['loop_lag_ms']['p99']:.2f} / {busy['loop_lag_ms']['max']:.2f}"],
        ["loop lag p99 / max, no purge (ms)",
         f"{calm['loop_lag_ms']['p99']:.2f} / {calm['loop_lag_ms']['max']:.2f}"],
        ["notifier entries at the end", s[-1]["notifier"]],
        [f"lease table after {args.leases} released", str(leases["after_release"])],
        ["lease table after the linger", str(leases["after_linger"])],
    ])
    write_json(args.out, {**run_record("state", "bench/state.py", None, started, load),
                          "tasks": tasks, "stall": stall, "leases": leases})
    print(f"wrote {args.out}")
    bounded = (s[-1]["notifier"] == 0 and s[-1]["tasks"] == 0
               and leases["after_linger"] == leases["idle"])
    return 0 if bounded else 1


if __name__ == "__main__":
    sys.exit(main())
