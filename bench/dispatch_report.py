"""bench/dispatch.py's tables and goals, from the results of one run.

The main table has one row per system (gpulane per preset, today's baseline, each peer): A,
B and T, and the server side's CPU per task in each (gpulane: the node process alone; a peer:
its workers and redis-server). A second table holds the other throughput methods (bulk, group)
and a third the CPU split (node / workers / redis). Every goal is printed met or MISSED, and a
goal that cannot be judged in this run (no peer, no baseline, no online preset) says why and
counts as not met.
"""

from __future__ import annotations

import argparse
import math
from typing import Any

from bench._util import markdown_table, print_table

NAN = math.nan
GOAL_A_OVER_PEERS = 1.5
"""Method A: gpulane's tasks/s over the best peer's, at least."""
GOAL_B_P50_MS = 1.0
"""Method B: gpulane's p50 round trip, at most."""
GOAL_T_OVER_BASELINE = 2.0
"""Method T: gpulane's tasks/s over today's (the baseline commit's), at least."""
GOAL_NODE_CPU_MS = 0.3
"""Node CPU per online request (sleep-online), in ms, at most."""
GPULANE_ROWS = {"gpulane": "gpulane sleep", "gpulane-online": "gpulane sleep-online",
                "baseline": "gpulane sleep @ {commit}"}


def _ok(res: Any) -> bool:
    return isinstance(res, dict) and "error" not in res and "skipped" not in res \
        and res.get("check", {}).get("ok", True)


def _get(res: Any, key: str) -> float:
    return float(res[key]) if _ok(res) and key in res else NAN


def _cpu(res: Any, group: str | None = None) -> float:
    """Server CPU ms per task of one method: one group, or all of them."""
    if not _ok(res) or "server_cpu_ms_per_task" not in res:
        return NAN
    per = res["server_cpu_ms_per_task"]
    return float(per.get(group, NAN)) if group else float(sum(per.values()))


def _per_request(res: Any) -> float:
    """The node's CPU ms per request, where the method's requests are known."""
    if not _ok(res) or "server_cpu_ms_per_request" not in res:
        return NAN
    return float(res["server_cpu_ms_per_request"].get("node", NAN))


def _server_cpu(name: str, res: Any) -> float:
    """The CPU a system's server side spends per task: gpulane's node alone, a peer's all."""
    return _cpu(res, "node") if name in GPULANE_ROWS else _cpu(res)


def _figure(res: Any) -> float | None:
    """What ranks one method's rounds: tasks/s, or a round trip's p50."""
    if not _ok(res):
        return None
    if "tasks_per_s" in res:
        return float(res["tasks_per_s"])
    return float(res["p50_ms"]) if "p50_ms" in res else None


def _median_of(runs: list[Any]) -> Any:
    """The run whose figure is the median (the lower middle of an even count), with every
    round's figure beside it; a method that failed in some round keeps the others'."""
    ranked = sorted((f, i) for i, f in enumerate(map(_figure, runs)) if f is not None)
    if not ranked:
        return runs[0]
    pick = dict(runs[ranked[(len(ranked) - 1) // 2][1]])
    pick["rounds"] = [_figure(r) for r in runs]
    return pick


def median_round(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """One result per system from several rounds: each method's median round (bulk methods
    and extras too); the rest (versions, workers) from the first round. One round: itself."""
    if len(rounds) == 1:
        return rounds[0]
    out: dict[str, Any] = {}
    for system, first in rounds[0].items():
        every = [r.get(system, {}) for r in rounds]
        merged = dict(first)
        for key, value in first.items():
            if key in ("throughput", "extras") and isinstance(value, dict):
                merged[key] = {m: _median_of([e.get(key, {}).get(m, {}) for e in every])
                               for m in value}
            elif isinstance(value, dict) and _figure(value) is not None:
                merged[key] = _median_of([e.get(key, {}) for e in every])
        if "round_trip" in merged:
            merged["round_trip"] = merged["B"]
        out[system] = merged
    return out


def rows_of(results: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for name, res in results.items():
        if "skipped" in res or ("error" in res and "B" not in res):
            continue
        label = GPULANE_ROWS.get(name, f"{name} {res.get('version', '')}").format(
            commit=str(res.get("commit", ""))[:7])
        out.append((label, {"name": name, **res}))
    return out


def best_a(res: dict[str, Any]) -> tuple[str, float]:
    """The fastest A variant of one system (gpulane has two; a peer one)."""
    variants = {k: _get(v, "tasks_per_s") for k, v in res.items() if k.startswith("A")}
    variants = {k: v for k, v in variants.items() if not math.isnan(v)}
    if not variants:
        return "-", NAN
    k = max(variants, key=lambda x: variants[x])
    return k, variants[k]


def goals_of(results: dict[str, Any], threads: int) -> dict[str, dict[str, Any]]:
    ours = {k: results[k] for k in ("gpulane", "gpulane-online")
            if k in results and "skipped" not in results[k]}
    peers = {k: v for k, v in results.items() if k not in GPULANE_ROWS}
    goals: dict[str, dict[str, Any]] = {}

    a_ours = max(((f"{GPULANE_ROWS[k]} {m}", v) for k, r in ours.items() for m, v in [best_a(r)]),
                 key=lambda x: -1 if math.isnan(x[1]) else x[1], default=("-", NAN))
    a_peer = max(((k, best_a(r)[1]) for k, r in peers.items()),
                 key=lambda x: -1 if math.isnan(x[1]) else x[1], default=("-", NAN))
    goals["A"] = _goal(f"A: gpulane tasks/s >= {GOAL_A_OVER_PEERS}x the best peer's",
                       a_ours[1] / a_peer[1], GOAL_A_OVER_PEERS, higher=True,
                       detail=f"{a_ours[0]} {a_ours[1]:,.0f}/s, best peer {a_peer[0]} "
                              f"{a_peer[1]:,.0f}/s",
                       why="no peer measured" if not peers
                       else "no peer A figure with right results" if math.isnan(a_peer[1])
                       else "")

    b_ours = min(((k, r.get("B")) for k, r in ours.items() if _ok(r.get("B"))),
                 key=lambda x: x[1]["p50_ms"], default=None)
    peer_p99 = {k: r["B"]["p99_ms"] for k, r in peers.items() if _ok(r.get("B"))}
    if b_ours is None:
        goals["B"] = _goal("B", NAN, 0, higher=True, detail="", why="no gpulane B figure")
    else:
        name, b = b_ours
        worst = min(peer_p99.values(), default=NAN)
        met = b["p50_ms"] <= GOAL_B_P50_MS and bool(peer_p99) and b["p99_ms"] < worst
        goals["B"] = {"goal": f"B: gpulane p50 <= {GOAL_B_P50_MS} ms and p99 below every "
                              "peer's", "value": b["p50_ms"], "met": met,
                      "detail": f"{GPULANE_ROWS[name]}: p50 {b['p50_ms']:.2f} ms, p99 "
                                f"{b['p99_ms']:.2f} ms; peers' p99 ms: "
                                + ", ".join(f"{k} {v:.2f}" for k, v in peer_p99.items()),
                      **({} if peer_p99 else {"why": "no peer measured"})}

    t_ours = max(((k, _get(r.get("T"), "tasks_per_s")) for k, r in ours.items()),
                 key=lambda x: -1 if math.isnan(x[1]) else x[1], default=("-", NAN))
    base = results.get("baseline", {})
    t_base = _get(base.get("T"), "tasks_per_s")
    goals["T"] = _goal(f"T: gpulane {threads} threads run() >= {GOAL_T_OVER_BASELINE}x "
                       "today's", t_ours[1] / t_base, GOAL_T_OVER_BASELINE, higher=True,
                       detail=f"{GPULANE_ROWS.get(t_ours[0], '-')} {t_ours[1]:,.0f}/s, today "
                              f"({str(base.get('commit', '-'))[:7]}) {t_base:,.0f}/s",
                       why="" if not math.isnan(t_base) else "no baseline figure")

    online = results.get("gpulane-online", {})
    for method in ("T", "B"):
        cpu = _cpu(online.get(method), "node")
        goals[f"node_cpu_online_{method}"] = _goal(
            f"node CPU per online request ({method}, sleep-online) <= {GOAL_NODE_CPU_MS} ms",
            cpu, GOAL_NODE_CPU_MS, higher=False, detail=f"{cpu:.3f} ms per run() call",
            why="" if not math.isnan(cpu) else "no sleep-online figure")
    return goals


def _goal(goal: str, value: float, bound: float, *, higher: bool, detail: str,
          why: str = "") -> dict[str, Any]:
    met = not math.isnan(value) and (value >= bound if higher else value <= bound)
    out: dict[str, Any] = {"goal": goal, "value": None if math.isnan(value) else value,
                           "met": met, "detail": detail}
    if why:
        out["why"] = why
    return out


def report(results: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    rows = rows_of(results)
    headers = ["system", "A submit+wait /s", "A enqueue /s", "B p50 ms", "B p99 ms",
               "B mean ms", f"T {args.threads} thr /s", "server CPU ms/task: A", "CPU B", "CPU T"]
    table_rows = []
    for label, r in rows:
        a_first = r.get("A submit+result", r.get("A"))
        table_rows.append([
            label, _get(a_first, "tasks_per_s"), _get(r.get("A enqueue"), "tasks_per_s"),
            _get(r.get("B"), "p50_ms"), _get(r.get("B"), "p99_ms"), _get(r.get("B"), "mean_ms"),
            _get(r.get("T"), "tasks_per_s"), _server_cpu(r["name"], a_first),
            _server_cpu(r["name"], r.get("B")), _server_cpu(r["name"], r.get("T"))])
    print()
    table = print_table(headers, table_rows)
    other_rows = [[label, method, _get(res, "tasks_per_s"), _server_cpu(r["name"], res)]
                  for label, r in rows
                  for method, res in {**r.get("throughput", {}), **r.get("extras", {})}.items()]
    other_headers = ["system", "other throughput method", "tasks/s", "server CPU ms/task"]
    if other_rows:
        print()
        print_table(other_headers, other_rows)
    cpu_rows = [[label, method, _cpu(res, "node"), _per_request(res), _cpu(res, "workers"),
                 _cpu(res, "redis")]
                for label, r in rows for method, res in r.items()
                if method.startswith(("A", "B", "T")) and isinstance(res, dict)
                and "skipped" not in res]
    cpu_headers = ["system", "method", "node ms/task", "node ms/request", "workers ms/task",
                   "redis ms/task"]
    print()
    print_table(cpu_headers, cpu_rows)
    goals = goals_of(results, args.threads)
    print()
    for goal in goals.values():
        status = "met" if goal["met"] else "MISSED"
        why = f"; {goal['why']}" if "why" in goal else ""
        print(f"{goal['goal']}: {status}  ({goal['detail']}{why})")
    markdown = "\n\n".join([markdown_table(headers, table_rows),
                            *([markdown_table(other_headers, other_rows)] if other_rows else []),
                            markdown_table(cpu_headers, cpu_rows),
                            "\n".join(f"- {g['goal']}: **{'met' if g['met'] else 'MISSED'}** "
                                      f"({g['detail']})" for g in goals.values())])
    return {"table": table, "markdown": markdown, "goals": goals,
            "all_goals_met": all(g["met"] for g in goals.values())}
