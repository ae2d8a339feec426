"""bench/dispatch.py's methods, CPU counters and goals, without starting any server."""

from __future__ import annotations

import argparse
import os
import threading
from typing import Any

import pytest
from bench import dispatch_methods as methods
from bench._util import proc_cpu_s, tree_pids
from bench.dispatch_report import goals_of, median_round, report

OK = methods.EXPECTED_OUTPUT


def test_method_a_waits_for_each_handle_in_submission_order() -> None:
    submitted: list[int] = []
    waited: list[int] = []

    def submit() -> int:
        submitted.append(len(submitted))
        return submitted[-1]

    def wait(handle: int) -> dict[str, int]:
        waited.append(handle)
        return OK

    out = methods.method_a(submit, wait, 5)
    assert waited == submitted == [0, 1, 2, 3, 4]
    assert out["check"] == {"count": 5, "expected": 5, "good": 5, "ok": True}


def test_method_t_shares_the_calls_between_threads_and_checks_every_output() -> None:
    seen: set[int] = set()
    lock = threading.Lock()

    def call() -> dict[str, int]:
        with lock:
            seen.add(threading.get_ident())
        return OK

    out = methods.method_t(call, 200, 8)
    assert out["check"]["count"] == 200 and out["check"]["ok"]
    assert 1 <= len(seen) <= 8


def test_method_t_raises_the_first_error_of_any_thread() -> None:
    def call() -> Any:
        raise ConnectionError("refused")

    with pytest.raises(ConnectionError, match="refused"):
        methods.method_t(call, 50, 4)


def test_a_wrong_output_fails_the_check() -> None:
    out = methods.method_b(lambda: {"state": "failed"}, 3)
    assert out["check"] == {"count": 3, "expected": 3, "good": 0, "ok": False}


def test_a_failing_method_is_recorded_not_raised() -> None:
    def boom() -> dict[str, Any]:
        raise RuntimeError("peer down")

    out = methods.measured("x", boom, None, tasks=1)
    assert out["error"] == "RuntimeError('peer down')"


def test_server_cpu_counts_the_named_processes_from_proc() -> None:
    pid = os.getpid()
    assert pid in tree_pids(pid)
    assert proc_cpu_s([pid]) >= 0.0 and proc_cpu_s([2**22 + 7]) == 0.0  # gone counts 0
    cpu = methods.ServerCpu({"me": lambda: [pid]})
    before = cpu.read()
    sum(i * i for i in range(300_000))  # some CPU of our own
    out = methods.measured("me", lambda: methods.method_b(lambda: OK, 2), cpu, tasks=2,
                           requests=4)
    assert set(out["server_cpu_s"]) == {"me"} and cpu.since(before)["me"] >= 0.0
    assert out["server_cpu_ms_per_request"]["me"] == pytest.approx(
        out["server_cpu_ms_per_task"]["me"] / 2)


def _run(per_s: float, cpu_ms: float) -> dict[str, Any]:
    return {"tasks_per_s": per_s, "elapsed_s": 1.0, "check": {"ok": True},
            "server_cpu_ms_per_task": {"node": cpu_ms, "workers": 0.01}}


def _rt(p50: float, p99: float, cpu_ms: float = 1.0) -> dict[str, Any]:
    return {"p50_ms": p50, "p99_ms": p99, "mean_ms": p50, "check": {"ok": True},
            "server_cpu_ms_per_task": {"node": cpu_ms}}


def results(**over: Any) -> dict[str, Any]:
    base = {
        "gpulane": {"A submit+result": _run(500, 2.0), "A enqueue": _run(2000, 0.3),
                    "B": _rt(0.9, 3.0), "T": _run(3000, 0.4)},
        "gpulane-online": {"A submit+result": _run(600, 1.5), "A enqueue": _run(2500, 0.2),
                           "B": _rt(0.8, 2.5, 0.9), "T": _run(3200, 0.25)},
        "baseline": {"commit": "dff7ec6" + "0" * 33, "B": _rt(2.0, 4.0), "T": _run(1500, 0.6)},
        "huey": {"version": "3.5.4", "A": _run(1200, 0.9), "B": _rt(2.1, 6.9),
                 "T": _run(900, 1.0)},
    }
    base.update(over)
    return base


def test_every_goal_is_judged_against_the_same_run() -> None:
    goals = goals_of(results(), threads=64)
    assert goals["A"]["met"] and goals["A"]["value"] == pytest.approx(2500 / 1200)
    assert goals["B"]["met"]  # sleep-online: p50 0.8 <= 1.0, p99 2.5 < 6.9
    assert goals["T"]["met"] and goals["T"]["value"] == pytest.approx(3200 / 1500)
    assert goals["node_cpu_online_T"]["met"] and not goals["node_cpu_online_B"]["met"]


def test_a_goal_that_cannot_be_judged_is_missed_and_says_why() -> None:
    res = results()
    del res["huey"], res["baseline"]
    goals = goals_of(res, threads=64)
    assert not goals["A"]["met"] and goals["A"]["why"] == "no peer measured"
    assert not goals["B"]["met"] and goals["B"]["why"] == "no peer measured"
    assert not goals["T"]["met"] and goals["T"]["why"] == "no baseline figure"


def test_a_figure_with_wrong_results_counts_for_nothing() -> None:
    bad = {**_run(9000, 0.1), "check": {"ok": False}}
    goals = goals_of(results(huey={"version": "3", "A": bad, "B": _rt(2.1, 6.9)}), 64)
    assert not goals["A"]["met"]  # huey's 9,000/s was wrong: nothing to compare with
    assert goals["A"]["why"] == "no peer A figure with right results"
    slow = results(**{"gpulane-online": {"skipped": "n/a"}},
                   gpulane={"B": _rt(1.2, 3.0), "T": {"error": "boom"}})
    goals = goals_of(slow, 64)
    assert not goals["B"]["met"] and not goals["T"]["met"]
    assert goals["node_cpu_online_T"]["why"] == "no sleep-online figure"


def test_the_report_prints_a_row_per_system_and_every_goal(
        capsys: pytest.CaptureFixture[str]) -> None:
    out = report(results(), argparse.Namespace(threads=64))
    printed = capsys.readouterr().out
    for row in ("gpulane sleep ", "gpulane sleep-online", "gpulane sleep @ dff7ec6",
                "huey 3.5.4"):
        assert row in printed and row.strip() in out["markdown"]
    assert printed.count(": met") + printed.count(": MISSED") == len(out["goals"]) == 5
    assert out["all_goals_met"] is False


def test_rounds_keep_each_methods_median_round_and_every_rounds_figure() -> None:
    rounds = [results(huey={"version": "3.5.4", "A": _run(a, 0.9), "B": _rt(p50, 7.0),
                            "extras": {}})
              for a, p50 in ((1000, 3.0), (1400, 1.0), (1200, 2.0))]
    rounds[2]["gpulane"]["T"] = {"error": "boom"}  # a failed round: the others still count
    merged = median_round(rounds)
    assert merged["huey"]["A"]["tasks_per_s"] == 1200 and merged["huey"]["B"]["p50_ms"] == 2.0
    assert merged["huey"]["A"]["rounds"] == [1000, 1400, 1200]
    assert merged["gpulane"]["T"]["rounds"] == [3000, 3000, None]
    assert median_round(rounds[:1]) is rounds[0]
