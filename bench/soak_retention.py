"""The retention soak: many tasks through one node with a short retention, its memory,
database and tables read as it goes (see bench/soak.py, the command)."""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from bench.soak_node import (
    HTTP_TIMEOUT_S,
    Acks,
    SoakNode,
    post_until_acked,
    rss_mb,
    status_view,
    wait_drained,
)

from gpulane.scheduling.housekeeping import PURGE_INTERVAL_S

RSS_GROWTH_LIMIT = 0.10
"""The retention scenario's end RSS may exceed its baseline RSS by this fraction at most."""
DB_GROWTH_LIMIT = 0.10
"""The database may grow this fraction at most once purges keep pace with the submits."""


@dataclass
class RetentionConfig:
    tasks: int = 200_000
    baseline: int = 20_000  # RSS is measured once this many are done, and again at the end
    retain_s: float = 30.0
    rate: float = 1000.0  # tasks per second: long enough a run for several purge rounds
    bulk: int = 500
    leases: int = 1000
    window: int = 4  # bulks in flight at most
    purge_timeout_s: float = 120.0
    samples: int = 10  # DB and RSS readings spread over the run


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


def lease_churn(url: str, n: int, out: dict[str, int]) -> None:
    """Take ``n`` leases one after the other, each given back at once."""
    out.update(leases_taken=0, lease_errors=0)
    with httpx.Client(base_url=url, timeout=HTTP_TIMEOUT_S) as http:
        for i in range(n):
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
    leases: dict[str, int] = {}
    figures: dict[str, Any] = {"samples": []}
    acks = Acks()
    try:
        churn = threading.Thread(target=lease_churn, args=(node.url, cfg.leases, leases),
                                 daemon=True)
        churn.start()
        with httpx.Client(base_url=node.url, timeout=60) as http:
            failed = pour(http, node, cfg, acks, figures)
            drained = wait_drained(http, cfg.purge_timeout_s)
            churn.join(cfg.purge_timeout_s)  # every lease taken and given back
            figures["end_rss_mb"] = round(rss_mb(node.pid), 1)
            figures["end_db"] = db_figures(node.data_dir)
            figures["end_status"] = status_view(http)
            figures["active_leases_end"] = len(http.get("/v1/leases").json()["leases"])
            # The last tasks age past the retention; a purge round then empties the table.
            deadline = time.monotonic() + cfg.retain_s + PURGE_INTERVAL_S + cfg.purge_timeout_s
            while time.monotonic() < deadline:
                figures["purged_db"] = db_figures(node.data_dir)
                if figures["purged_db"]["rows"].get("tasks", 0) == 0:
                    break
                time.sleep(1.0)
            figures["purged_status"] = status_view(http)
            figures["purged_rss_mb"] = round(rss_mb(node.pid), 1)
    finally:
        node.stop()
    figures.update(leases, drained=drained, batch_ends_not_succeeded=failed,
                   submit_answers=dict(acks.answers))
    figures["problems"] = retention_verdict(cfg, figures, failed, drained, leases)
    return figures


def pour(http: httpx.Client, node: SoakNode, cfg: RetentionConfig, acks: Acks,
         figures: dict[str, Any]) -> int:
    """Submit every task at ``cfg.rate`` in bulks, at most ``cfg.window`` bulks unfinished,
    taking the baseline and the samples; the bulks whose last task did not succeed."""
    began = time.monotonic()
    lasts: list[tuple[str, int]] = []
    failed = done = 0
    every = max(cfg.tasks // max(cfg.samples, 1), 1)
    for start in range(0, cfg.tasks, cfg.bulk):
        n = min(cfg.bulk, cfg.tasks - start)
        ahead = began + start / cfg.rate - time.monotonic()
        if ahead > 0:
            time.sleep(ahead)
        body = {"tasks": [{"preset": "sleep", "input": {"ms": 0}}] * n}
        answer = post_until_acked(http, "/v1/tasks/bulk", body, {}, acks,
                                  time.monotonic() + cfg.purge_timeout_s)
        if answer is None:
            raise RuntimeError(f"the bulk at task {start} was never acknowledged")
        lasts.append((answer["tasks"][-1]["id"], n))
        while len(lasts) > cfg.window or (start + n >= cfg.tasks and lasts):
            task_id, size = lasts.pop(0)
            t = http.get(f"/v1/tasks/{task_id}/result", params={"wait": 60}).json()
            failed += t["state"] != "succeeded"
            before, done = done, done + size
            if before < cfg.baseline <= done:
                figures["baseline_rss_mb"] = round(rss_mb(node.pid), 1)
                figures["baseline_db"] = db_figures(node.data_dir)
            if before // every != done // every:
                db = db_figures(node.data_dir)
                figures["samples"].append({
                    "done": done, "s": round(time.monotonic() - began, 1),
                    "rss_mb": round(rss_mb(node.pid), 1), "db_mb": db["db_mb"],
                    "task_rows": db["rows"].get("tasks")})
    figures["run_s"] = round(time.monotonic() - began, 1)
    figures["tasks_per_s"] = round(cfg.tasks / figures["run_s"], 1)
    return failed


def retention_verdict(cfg: RetentionConfig, figures: dict[str, Any], failed: int,
                      drained: bool, leases: dict[str, int]) -> list[str]:
    problems = []
    base = figures.get("baseline_rss_mb")
    if base is not None:
        figures["rss_growth"] = round(figures["end_rss_mb"] / base - 1, 3)
        if figures["rss_growth"] > RSS_GROWTH_LIMIT:
            problems.append(f"RSS grew {figures['rss_growth']:.1%} from the baseline "
                            f"({base} -> {figures['end_rss_mb']} MB)")
    # The database stops growing once purges keep pace: the table holds at most what finished
    # within the retention and one purge round, reached before the second round past the
    # retention. Judged from then to the end, when the run lasts that long.
    samples = figures["samples"]
    steady = [x for x in samples if x["s"] > cfg.retain_s + 2 * PURGE_INTERVAL_S]
    if len(steady) >= 2:
        first, last = steady[0], steady[-1]
        figures["db_growth_steady"] = round(last["db_mb"] / first["db_mb"] - 1, 3)
        if figures["db_growth_steady"] > DB_GROWTH_LIMIT:
            problems.append(f"the database grew {figures['db_growth_steady']:.1%} once purges "
                            f"kept pace ({first['db_mb']} MB at {first['s']} s -> "
                            f"{last['db_mb']} MB at the end)")
    else:
        figures["db_growth_steady"] = "not judged: run shorter than retain + 2 purge rounds"
    tables = figures.get("purged_status", {}).get("tables")
    if tables is not None:  # the in-memory tables are back to their idle size
        live = tables["leases"]["waiting"] + tables["leases"]["holding"]
        if live or tables["task_notifier"]:
            problems.append(f"in-memory tables not idle at the end: {tables}")
    if figures.get("active_leases_end"):
        problems.append(f"{figures['active_leases_end']} lease(s) still active at the end")
    if failed:
        problems.append(f"{failed} bulk(s) ended with a task that did not succeed")
    if not drained:
        problems.append("tasks still queued or running after the run")
    left = figures.get("purged_db", {}).get("rows", {}).get("tasks", 0)
    if left:
        problems.append(f"{left} task row(s) left a purge round after the retention "
                        f"({cfg.retain_s:g} s) of the last")
    if leases.get("lease_errors") or leases.get("leases_taken") != cfg.leases:
        problems.append(f"leases: {leases}")
    return problems
