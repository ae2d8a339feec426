"""Soak benchmark: a node that is killed, and a node that runs for long, lose nothing and keep
their state bounded.

    .venv/bin/python bench/soak.py [--scenario chaos|retention|both]
        chaos:     [--seconds 60] [--rate 200] [--node-kills 10] [--worker-kills 100]
                   [--mates 15] [--drain-timeout 180]
        retention: [--tasks 200000] [--baseline 20000] [--retain 30] [--bulk 500]
                   [--leases 1000]
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

retention: ``--tasks`` ``sleep`` tasks (ms 0), submitted in bulks of ``--bulk``, through one
node started with ``GPULANE_RETAIN=--retain``, while ``--leases`` leases are taken and given
back. Reports the node's RSS after the first ``--baseline`` tasks and at the end (must be
within 10 %), the database's size and rows, and GET /v1/status (lease table, notifier,
purge counters) where the node serves it.

Prints a table per scenario, writes ``--out`` as JSON, and exits 1 if a must-hold failed.
The scenarios are functions (:func:`chaos`, :func:`retention`) that tests/chaos runs small.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import signal
import sqlite3
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._util import (
    REPO,
    Proc,
    child_env,
    free_port,
    print_table,
    run_record,
    start_proc,
    stop_on_signals,
    wait_until,
    write_json,
)

POISON_PRESETS = REPO / "bench" / "presets"
"""Where the ``poison-sleep`` preset (bench/presets/poison.yaml) lives."""
POISON_PRESET = "poison-sleep"
POISON_MAX_ATTEMPTS = 3
"""The poison preset's max_attempts (bench/presets/poison.yaml)."""
READY_TIMEOUT_S = 60.0
"""How long a (re)started node may take to answer /readyz."""
RSS_GROWTH_LIMIT = 0.10
"""The retention scenario's end RSS may exceed its baseline RSS by this fraction at most."""
HTTP_TIMEOUT_S = 10.0
"""Per request; a node being killed answers nothing, and the submitter retries."""
RETRY_PAUSE_S = 0.05
"""Between a failed submit and its retry, unless the answer's Retry-After says longer."""
RETRY_AFTER_CAP_S = 2.0
"""Longest pause a Retry-After may impose here (the run has a schedule to keep)."""
ORPHAN_GRACE_S = 10.0
"""How long a killed node's workers get to notice and exit before they count as orphans."""


# --- the node under test ---------------------------------------------------------------------


class SoakNode:
    """``gpulane serve`` on one port and data dir, killable with -9 and restartable."""

    def __init__(self, workdir: Path, *extra: str, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.data_dir = workdir / "data"
        self.workdir = workdir
        self.argv = [sys.executable, "-m", "gpulane", "serve", "--data-dir", str(self.data_dir),
                     "--port", str(self.port), "--simulate-gpus", "2x24GiB",
                     "--log-level", "warning", *extra]
        self.env = child_env(**(env or {}))
        self.proc: Proc | None = None
        self.starts = 0

    def start(self) -> float:
        """Start the node and wait until it is ready; the seconds that took."""
        began = time.monotonic()
        self.starts += 1
        self.proc = start_proc(f"serve-{self.starts}", self.argv, log_dir=self.workdir,
                               env=self.env)
        wait_until(lambda: httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200,
                   timeout=READY_TIMEOUT_S, what="gpulane /readyz", proc=self.proc)
        return time.monotonic() - began

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def kill_hard(self) -> None:
        """kill -9 the node process alone: its workers must notice on their own."""
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.popen.wait(30)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError):  # a zombie is dead for this purpose
        if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
            return False
    return True


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def worker_pids(http: httpx.Client) -> list[int]:
    workers = http.get("/v1/workers", timeout=2).json()["workers"]
    return [w["pid"] for w in workers if w.get("pid") and w.get("state") != "exited"]


def status_view(http: httpx.Client) -> dict[str, Any] | None:
    """GET /v1/status where the node serves it."""
    with contextlib.suppress(httpx.HTTPError, ValueError):
        r = http.get("/v1/status", timeout=5)
        if r.status_code == 200:
            body: dict[str, Any] = r.json()
            return body
    return None


# --- chaos -----------------------------------------------------------------------------------


@dataclass
class ChaosConfig:
    seconds: float = 60.0
    rate: float = 200.0  # submits per second, all submitters together
    node_kills: int = 10
    worker_kills: int = 100
    mates: int = 15  # ordinary tasks in the poison task's bulk submit
    submitters: int = 2
    drain_timeout_s: float = 180.0
    seed: int = 11


@dataclass
class Acks:
    """What the submitters were told: idempotency key -> task id, and what it took."""

    ids: dict[str, str] = field(default_factory=dict)
    retries: int = 0
    answers: Counter[str] = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)


def post_until_acked(http: httpx.Client, path: str, body: dict[str, Any],
                     headers: dict[str, str], acks: Acks, give_up_at: float) -> Any:
    """POST until a 2xx answer (a retry carries the same idempotency keys), or give up."""
    while time.monotonic() < give_up_at:
        pause = RETRY_PAUSE_S
        try:
            r = http.post(path, json=body, headers=headers)
            with acks.lock:
                acks.answers[str(r.status_code)] += 1
            if r.status_code < 300:
                return r.json()
            if r.status_code < 500 and r.status_code not in (408, 429):
                raise RuntimeError(f"submit refused: {r.status_code} {r.text[:300]}")
            with contextlib.suppress(ValueError):
                pause = max(pause, min(float(r.headers.get("retry-after", 0)),
                                       RETRY_AFTER_CAP_S))
        except httpx.TransportError as exc:
            with acks.lock:
                acks.answers[type(exc).__name__] += 1
        with acks.lock:
            acks.retries += 1
        time.sleep(pause)
    return None


def submitter(url: str, me: int, cfg: ChaosConfig, acks: Acks, stop: threading.Event,
              poison: dict[str, Any]) -> None:
    rate = cfg.rate / cfg.submitters
    began = time.monotonic()
    nxt, i = began, 0
    with httpx.Client(base_url=url, timeout=HTTP_TIMEOUT_S) as http:
        while not stop.is_set():
            now = time.monotonic()
            if now < nxt:
                time.sleep(nxt - now)
            nxt = max(nxt + 1 / rate, time.monotonic() - 0.5)  # no burst after a long outage
            if me == 0 and not poison and now - began >= cfg.seconds * 0.3:
                poison.update(submit_poison(http, cfg, acks))
                continue
            key = f"soak-{me}-{i}"
            i += 1
            task = post_until_acked(http, "/v1/tasks",
                                    {"preset": POISON_PRESET, "input": {"ms": 0, "n": key}},
                                    {"Idempotency-Key": key}, acks,
                                    time.monotonic() + cfg.drain_timeout_s)
            if task is not None:
                with acks.lock:
                    acks.ids[key] = task["id"]


def submit_poison(http: httpx.Client, cfg: ChaosConfig, acks: Acks) -> dict[str, Any]:
    """One bulk: the poison input in the middle of its batch-mates."""
    items = [{"preset": POISON_PRESET, "input": {"ms": 0, "mate": m},
              "idempotency_key": f"mate-{m}"} for m in range(cfg.mates)]
    items.insert(cfg.mates // 2, {"preset": POISON_PRESET, "input": {"poison": True},
                                  "idempotency_key": "poison"})
    answer = post_until_acked(http, "/v1/tasks/bulk", {"tasks": items}, {}, acks,
                              time.monotonic() + cfg.drain_timeout_s)
    if answer is None:
        return {"poison_id": None, "mate_ids": []}
    ids = [t["id"] for t in answer["tasks"]]
    with acks.lock:
        for item, task_id in zip(items, ids, strict=True):
            acks.ids[str(item["idempotency_key"])] = task_id
    poison_id = ids.pop(cfg.mates // 2)
    return {"poison_id": poison_id, "mate_ids": ids}


def killer(node: SoakNode, cfg: ChaosConfig, stop: threading.Event,
           out: dict[str, Any]) -> None:
    """Kill the node and workers on a schedule spread over the run."""
    rng = random.Random(cfg.seed)
    plan = sorted([((k + 0.5) * cfg.seconds / max(cfg.node_kills, 1), "node")
                   for k in range(cfg.node_kills)] +
                  [((k + 0.5) * cfg.seconds / max(cfg.worker_kills, 1), "worker")
                   for k in range(cfg.worker_kills)])
    began = time.monotonic()
    out.update(node_kills=0, worker_kills=0, worker_kills_missed=0, orphans=0, restart_s=[])
    with httpx.Client(base_url=node.url, timeout=2) as http:
        for at, what in plan:
            if stop.wait(max(0.0, began + at - time.monotonic())):
                return
            try:
                pids = worker_pids(http)
            except (httpx.HTTPError, ValueError, KeyError):
                pids = []
            if what == "worker":
                if pids:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(rng.choice(pids), signal.SIGKILL)
                    out["worker_kills"] += 1
                else:
                    out["worker_kills_missed"] += 1  # none running (node restarting, idle)
                continue
            node.kill_hard()
            out["node_kills"] += 1
            deadline = time.monotonic() + ORPHAN_GRACE_S
            while any(alive(p) for p in pids) and time.monotonic() < deadline:
                time.sleep(0.05)
            for pid in (p for p in pids if alive(p)):
                out["orphans"] += 1  # outlived its node: counted, then cleaned up
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            out["restart_s"].append(round(node.start(), 2))


def events_of(http: httpx.Client, task_id: str) -> list[tuple[str, dict[str, Any]]]:
    """A final task's whole event stream (it closes after the final event)."""
    import json

    r = http.get(f"/v1/tasks/{task_id}/events", timeout=30)
    r.raise_for_status()
    out, kind = [], ""
    for line in r.text.splitlines():
        if line.startswith("event: "):
            kind = line[7:]
        elif line.startswith("data: "):
            out.append((kind, json.loads(line[6:])))
    return out


def wait_drained(http: httpx.Client, timeout: float) -> bool:
    """Until no task is queued or running (or timeout): True when drained."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError, ValueError, KeyError):
            if not any(http.get("/v1/tasks", params={"state": s, "limit": 1}).json()["tasks"]
                       for s in ("queued", "running")):
                return True
        time.sleep(0.2)
    return False


def chaos(cfg: ChaosConfig, workdir: Path) -> dict[str, Any]:
    """Run the chaos scenario; the figures, and ``problems`` (empty when all held)."""
    node = SoakNode(workdir, "--presets", str(POISON_PRESETS))
    node.start()
    acks, stop = Acks(), threading.Event()
    poison: dict[str, Any] = {}
    kills: dict[str, Any] = {}
    began = time.monotonic()
    try:
        threads = [threading.Thread(target=submitter, args=(node.url, n, cfg, acks, stop, poison),
                                    daemon=True) for n in range(cfg.submitters)]
        threads.append(threading.Thread(target=killer, args=(node, cfg, stop, kills),
                                        daemon=True))
        for t in threads:
            t.start()
        time.sleep(cfg.seconds)
        stop.set()
        for t in threads:
            t.join(cfg.drain_timeout_s)
        submit_s = time.monotonic() - began
        with httpx.Client(base_url=node.url, timeout=HTTP_TIMEOUT_S) as http:
            drained = wait_drained(http, cfg.drain_timeout_s)
            tasks: dict[str, dict[str, Any]] = {}
            for task_id in set(acks.ids.values()):
                r = http.get(f"/v1/tasks/{task_id}")
                if r.status_code == 200:
                    tasks[task_id] = r.json()
            events = {task_id: events_of(http, task_id)
                      for task_id, t in tasks.items() if t["state"] in ("succeeded", "failed")}
    finally:
        stop.set()
        node.stop()
    return chaos_verdict(cfg, acks, poison, kills, tasks, events, drained, submit_s)


def chaos_verdict(cfg: ChaosConfig, acks: Acks, poison: dict[str, Any], kills: dict[str, Any],
                  tasks: dict[str, dict[str, Any]],
                  events: dict[str, list[tuple[str, dict[str, Any]]]], drained: bool,
                  submit_s: float) -> dict[str, Any]:
    acked = set(acks.ids.values())
    poison_id = poison.get("poison_id")
    mates = poison.get("mate_ids", [])
    innocent = [t for i, t in tasks.items() if i != poison_id]
    succeeded_twice = [i for i, evs in events.items()
                       if sum(k == "state" and d.get("state") == "succeeded" for k, d in evs) > 1]
    ran_twice = [i for i, evs in events.items() if sum(k == "result" for k, _ in evs) > 1]
    not_succeeded = Counter(f"{t['state']}:{(t['error'] or {}).get('kind')}" for t in innocent
                            if t["state"] != "succeeded")
    p = tasks.get(poison_id or "", {})
    figures: dict[str, Any] = {
        "acknowledged": len(acked), "submit_rate_per_s": round(len(acks.ids) / submit_s, 1),
        "submit_retries": acks.retries, "answers": dict(acks.answers), **kills,
        "lost": len(acked - tasks.keys()), "drained": drained,
        "not_final": sum(t["state"] not in ("succeeded", "failed", "cancelled")
                         for t in tasks.values()),
        "innocent_not_succeeded": dict(not_succeeded),
        "innocent_attempts_over_1": sum(t["attempts"] > 1 for t in innocent),
        "recorded_success_twice": len(succeeded_twice), "executed_twice": len(ran_twice),
        "mates": len(mates),
        "mates_succeeded": sum(tasks.get(m, {}).get("state") == "succeeded" for m in mates),
        "poison_state": p.get("state"), "poison_kind": (p.get("error") or {}).get("kind"),
        "poison_attempts": p.get("attempts"),
    }
    problems = []
    if figures["lost"]:
        problems.append(f"{figures['lost']} acknowledged task(s) lost")
    if figures["not_final"] or not drained:
        problems.append(f"{figures['not_final']} task(s) not final after the drain timeout")
    if succeeded_twice:
        problems.append(f"{len(succeeded_twice)} task(s) recorded as succeeded twice, e.g. "
                        f"{succeeded_twice[:3]}")
    if not_succeeded:
        problems.append(f"innocent tasks that did not succeed: {dict(not_succeeded)}")
    if poison_id is None:
        problems.append("the poison bulk was never acknowledged")
    elif figures["mates_succeeded"] != len(mates):
        problems.append(f"only {figures['mates_succeeded']} of {len(mates)} batch-mates "
                        "succeeded")
    if poison_id is not None and (p.get("state"), figures["poison_kind"],
                                  p.get("attempts")) != ("failed", "worker_died",
                                                         POISON_MAX_ATTEMPTS):
        problems.append(f"poison task {p.get('state')}/{figures['poison_kind']} after "
                        f"{p.get('attempts')} attempt(s), not failed/worker_died after "
                        f"{POISON_MAX_ATTEMPTS}")
    figures["problems"] = problems
    return figures


# --- retention -------------------------------------------------------------------------------


@dataclass
class RetentionConfig:
    tasks: int = 200_000
    baseline: int = 20_000  # RSS is measured once this many are done, and again at the end
    retain_s: float = 30.0
    bulk: int = 500
    leases: int = 1000
    window: int = 4  # bulks in flight at most
    purge_timeout_s: float = 120.0


def db_figures(data_dir: Path) -> dict[str, Any]:
    """The database's size on disk and its row counts (read-only, beside the live node)."""
    db = data_dir / "gpulane.db"
    size = sum(p.stat().st_size for p in data_dir.glob("gpulane.db*") if p.is_file())
    rows: dict[str, int] = {}
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)) as c:
        names = [r[0] for r in c.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        for name in names:
            rows[name] = c.execute(f'SELECT COUNT(*) FROM "{name}"').fetchone()[0]
    return {"db_mb": round(size / 2**20, 2), "rows": rows}


def lease_churn(url: str, n: int, stop: threading.Event, out: dict[str, int]) -> None:
    out.update(leases_taken=0, lease_errors=0)
    with httpx.Client(base_url=url, timeout=HTTP_TIMEOUT_S) as http:
        for i in range(n):
            if stop.is_set():
                return
            r = http.post("/v1/leases", json={"holder": f"soak-{i}", "vram_mb": 1024,
                                              "ttl_s": 30})
            if r.status_code != 201:
                out["lease_errors"] += 1
                continue
            lease = r.json()
            out["leases_taken"] += 1
            if http.delete(f"/v1/leases/{lease['id']}",
                           params={"token": lease["token"]}).status_code != 200:
                out["lease_errors"] += 1


def retention(cfg: RetentionConfig, workdir: Path) -> dict[str, Any]:
    """Run the retention scenario; the figures, and ``problems`` (empty when all held)."""
    node = SoakNode(workdir, env={"GPULANE_RETAIN": f"{cfg.retain_s:g}"})
    node.start()
    stop = threading.Event()
    leases: dict[str, int] = {}
    figures: dict[str, Any] = {}
    problems: list[str] = []
    acks = Acks()
    began = time.monotonic()
    try:
        churn = threading.Thread(target=lease_churn, args=(node.url, cfg.leases, stop, leases),
                                 daemon=True)
        churn.start()
        with httpx.Client(base_url=node.url, timeout=60) as http:
            lasts: list[str] = []
            failed = 0
            done = 0
            for start in range(0, cfg.tasks, cfg.bulk):
                n = min(cfg.bulk, cfg.tasks - start)
                body = {"tasks": [{"preset": "sleep", "input": {"ms": 0}}] * n}
                answer = post_until_acked(http, "/v1/tasks/bulk", body, {}, acks,
                                          time.monotonic() + cfg.purge_timeout_s)
                if answer is None:
                    problems.append(f"bulk at task {start} never acknowledged")
                    break
                lasts.append(answer["tasks"][-1]["id"])
                while len(lasts) > cfg.window or (start + n >= cfg.tasks and lasts):
                    t = http.get(f"/v1/tasks/{lasts.pop(0)}/result",
                                 params={"wait": 60}).json()
                    failed += t["state"] != "succeeded"
                    done += cfg.bulk
                    if "baseline_rss_mb" not in figures and done >= cfg.baseline:
                        figures["baseline_rss_mb"] = round(rss_mb(node.pid), 1)
                        figures["baseline_db"] = db_figures(node.data_dir)
            drained = wait_drained(http, cfg.purge_timeout_s)
            figures["run_s"] = round(time.monotonic() - began, 1)
            figures["tasks_per_s"] = round(cfg.tasks / figures["run_s"], 1)
            churn.join(cfg.purge_timeout_s)  # every lease taken and given back
            figures["end_rss_mb"] = round(rss_mb(node.pid), 1)
            figures["end_db"] = db_figures(node.data_dir)
            figures["end_status"] = status_view(http)
            # The last tasks age past the retention; the purge should then empty the table.
            deadline = time.monotonic() + cfg.retain_s + cfg.purge_timeout_s
            while time.monotonic() < deadline:
                figures["purged_db"] = db_figures(node.data_dir)
                if figures["purged_db"]["rows"].get("tasks", 0) == 0:
                    break
                time.sleep(1.0)
            figures["purged_status"] = status_view(http)
            figures["purged_rss_mb"] = round(rss_mb(node.pid), 1)
    finally:
        stop.set()
        node.stop()
    figures.update(leases, drained=drained, batch_ends_not_succeeded=failed,
                   submit_answers=dict(acks.answers))
    base = figures.get("baseline_rss_mb")
    if base is not None:
        figures["rss_growth"] = round(figures["end_rss_mb"] / base - 1, 3)
        if figures["rss_growth"] > RSS_GROWTH_LIMIT:
            problems.append(f"RSS grew {figures['rss_growth']:.1%} from the baseline "
                            f"({base} -> {figures['end_rss_mb']} MB)")
    if failed:
        problems.append(f"{failed} bulk(s) ended with a task that did not succeed")
    if not drained:
        problems.append("tasks still queued or running after the run")
    if figures.get("purged_db", {}).get("rows", {}).get("tasks", 0):
        problems.append(f"{figures['purged_db']['rows']['tasks']} task row(s) left "
                        f"{cfg.retain_s:g}+ s after the last finished (retain {cfg.retain_s:g} s)")
    if leases.get("lease_errors"):
        problems.append(f"{leases['lease_errors']} lease acquire/release error(s)")
    figures["problems"] = problems
    return figures


# --- the command -----------------------------------------------------------------------------


def print_figures(title: str, figures: dict[str, Any]) -> None:
    print(f"\n{title}")
    rows = [[k, v if isinstance(v, int | float | str | bool) or v is None else str(v)]
            for k, v in figures.items()
            if k not in ("problems", "config", "end_status", "purged_status")]
    print_table(["figure", "value"], rows)
    for key in ("end_status", "purged_status"):
        if figures.get(key) is not None:
            print(f"{key}: {figures[key]}")
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
                                   retain_s=args.retain, bulk=args.bulk, leases=args.leases)
            (Path(tmp) / "retention").mkdir()
            record["retention"] = {"config": asdict(rcfg),
                                   **retention(rcfg, Path(tmp) / "retention")}
            print_figures("retention", record["retention"])
    write_json(args.out, {**run_record("soak", "bench/soak.py", None, started, load), **record})
    print(f"wrote {args.out}")
    return 1 if any(s["problems"] for s in record.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
