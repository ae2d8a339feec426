"""The chaos soak: a node killed -9 and restarted, and its workers killed -9, while tasks pour
in at a steady rate with a poison input among them (see bench/soak.py, the command)."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from bench._util import REPO
from bench.soak_node import (
    HTTP_TIMEOUT_S,
    Acks,
    SoakNode,
    alive,
    post_until_acked,
    wait_drained,
    worker_pids,
)

POISON_PRESETS = REPO / "bench" / "presets"
"""Where the ``poison-sleep`` preset (bench/presets/poison.yaml) lives."""
POISON_PRESET = "poison-sleep"
"""The preset every chaos task uses: it sleeps, or dies on a poison input."""
POISON_MAX_ATTEMPTS = 3
"""The poison preset's max_attempts (bench/presets/poison.yaml)."""
WORKER_WAIT_S = 2.0
"""How long a worker kill waits for a worker to be up (after a restart) before it is missed."""
ORPHAN_GRACE_S = 10.0
"""How long a killed node's workers get to notice and exit before they count as orphans."""


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
            pids = live_workers(http, WORKER_WAIT_S if what == "worker" else 0.0)
            if what == "worker":
                if pids:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(rng.choice(pids), signal.SIGKILL)
                    out["worker_kills"] += 1
                else:
                    out["worker_kills_missed"] += 1  # none came up within WORKER_WAIT_S
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


def live_workers(http: httpx.Client, wait_s: float) -> list[int]:
    """The node's worker pids, waiting up to ``wait_s`` for one to be up (after a restart
    the first ones start with the first tasks)."""
    deadline = time.monotonic() + wait_s
    while True:
        with contextlib.suppress(httpx.HTTPError, ValueError, KeyError):
            if pids := worker_pids(http):
                return pids
        if time.monotonic() >= deadline:
            return []
        time.sleep(0.05)


def events_of(http: httpx.Client, task_id: str) -> list[tuple[str, dict[str, Any]]]:
    """A final task's whole event stream (it closes after the final event)."""
    r = http.get(f"/v1/tasks/{task_id}/events", timeout=30)
    r.raise_for_status()
    out, kind = [], ""
    for line in r.text.splitlines():
        if line.startswith("event: "):
            kind = line[7:]
        elif line.startswith("data: "):
            out.append((kind, json.loads(line[6:])))
    return out


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
