"""bench/soak.py's scenarios, small enough for every test run (the full figures are
``make chaos``): a node killed -9 and restarted and workers killed -9 while tasks pour in with
a poison input among them; and finished work purged after a short retention, the node's
in-memory tables back to their idle size.

It runs a real ``gpulane serve`` subprocess; the must-holds are the scenario's own
``problems`` (empty when every one held), so the bench and the suite judge alike.
"""

from __future__ import annotations

from pathlib import Path

from bench.soak_chaos import ChaosConfig, chaos
from bench.soak_retention import RetentionConfig, retention


def test_kills_with_a_poison_task_lose_nothing_and_isolate_it(tmp_path: Path) -> None:
    figures = chaos(ChaosConfig(seconds=8, rate=40, node_kills=1, worker_kills=6, mates=7,
                                drain_timeout_s=60), tmp_path)
    assert figures["problems"] == [], figures
    # The faults really happened, and the submitter rode the outage out on retries.
    assert figures["node_kills"] == 1 and figures["worker_kills"] >= 3, figures
    assert figures["acknowledged"] >= 100 and figures["submit_retries"] >= 1, figures
    assert figures["mates_succeeded"] == 7 and figures["poison_attempts"] == 3, figures



def test_finished_work_is_purged_after_its_retention(tmp_path: Path) -> None:
    figures = retention(RetentionConfig(tasks=3000, baseline=1000, retain_s=2, bulk=250,
                                        leases=50, purge_timeout_s=30), tmp_path)
    assert figures["problems"] == [], figures
    assert figures["leases_taken"] == 50, figures
    assert figures["purged_db"]["rows"]["tasks"] == 0, figures
    tables = figures["purged_status"]["tables"]
    assert tables["task_notifier"] == 0 and tables["leases"]["holding"] == 0, tables
