"""The node's fallback log (scheduling/fallbacks.py): counts, per-minute rates over 1 and 15
minutes, and a size bounded by time, not by how many tasks fell back."""

from __future__ import annotations

from typing import Any

from gpulane.model import TaskSpec
from gpulane.scheduling.fallbacks import BUCKET_S, WINDOWS_S, FallbackLog
from tests.unit.conftest import Clock


def test_counts_and_rates_by_reason_and_preset() -> None:
    clock = Clock(10_000.0)
    log = FallbackLog(clock)
    log.record("gpu_busy", "embed", 30)
    clock.now += 120  # two minutes on: out of the 1 m window, inside the 15 m one
    log.record("gpu_busy", "embed", 6)
    log.record("gpu_oom", "faces")
    log.record("gpu_oom", "faces", 0)  # nothing fell back: nothing counted
    view: dict[str, Any] = log.view()
    assert view["total"] == 37
    reasons = view["reasons"]
    assert reasons["gpu_busy"] == {"count": 36, "per_min": {"1m": 6.0, "15m": 2.4},
                                   "presets": {"embed": 36}}
    assert reasons["gpu_oom"]["count"] == 1
    clock.now += WINDOWS_S["15m"] + BUCKET_S
    later: dict[str, Any] = log.view()
    assert later["reasons"]["gpu_busy"]["per_min"] == {"1m": 0.0, "15m": 0.0}
    assert log.totals == {"gpu_busy": 36, "gpu_oom": 1}  # counts since start stay


def test_the_log_stays_small_however_many_fall_back() -> None:
    clock = Clock(10_000.0)
    log = FallbackLog(clock)
    for _ in range(2000):  # 2,000 bulk submits of 500 CPU-bound tasks each, 0.9 s apart
        log.submitted([TaskSpec(preset="p", input=None, lane="cpu", fallback_reason="no_gpu")
                       for _ in range(5)])
        log.record("no_gpu", "p", 495)
        clock.now += 0.9
    assert log.totals == {"no_gpu": 1_000_000}
    kept = log._recent["no_gpu"]
    assert len(kept) <= WINDOWS_S["15m"] / BUCKET_S + 1  # buckets, not one entry per task
    view: dict[str, Any] = log.view()
    per_min = view["reasons"]["no_gpu"]["per_min"]
    assert 30_000 <= per_min["1m"] <= 35_000  # 500 per 0.9 s
