"""The crash ceiling on its own (runtime/poison.py): it halves while suspects are out, caps
every batcher that shares it, lifts when the last suspect is resolved, and forgets suspects
that never come back, on a fake clock."""

from __future__ import annotations

from gpulane.presets import BatchSettings
from gpulane.runtime.batcher import Batcher
from gpulane.runtime.poison import SUSPECT_TTL_S, CrashCeiling
from tests.unit.conftest import Clock


def test_halving_ends_at_one_and_never_rises_while_suspects_remain() -> None:
    ceiling = CrashCeiling(Clock())
    assert ceiling.cap is None
    assert ceiling.crashed([str(i) for i in range(16)], 16) == 8
    assert ceiling.crashed(["0", "1", "2", "3"], 4) == 2
    assert ceiling.crashed(["0", "1", "2", "3", "4", "5"], 6) == 2  # never raised by a crash
    assert ceiling.crashed(["0", "1"], 2) == 1
    assert ceiling.crashed(["0"], 1) == 1
    assert ceiling.crashes == 5 and ceiling.cap == 1


def test_it_lifts_once_the_last_suspect_is_resolved() -> None:
    ceiling = CrashCeiling(Clock())
    ceiling.crashed(["a", "b", "c"], 3)
    for task_id in ("a", "b"):
        ceiling.resolved(task_id)
        assert ceiling.cap == 1
    ceiling.resolved("unrelated")
    assert ceiling.cap == 1
    ceiling.resolved("c")
    assert ceiling.cap is None and not ceiling.suspects


def test_a_suspect_that_never_comes_back_is_forgotten_after_its_ttl() -> None:
    clock = Clock()
    ceiling = CrashCeiling(clock)
    ceiling.crashed(["gone"], 4)
    clock.now += SUSPECT_TTL_S - 1
    assert ceiling.cap == 2
    ceiling.crashed(["again"], 2)  # a later crash suspects anew, from now
    clock.now += 2
    assert ceiling.cap == 1 and ceiling.suspects == {"again"}
    clock.now += SUSPECT_TTL_S
    assert ceiling.cap is None


def test_a_crash_with_nothing_to_suspect_caps_nothing() -> None:
    ceiling = CrashCeiling(Clock())
    ceiling.crashed([], 8)  # every task of the batch had been cancelled
    assert ceiling.cap is None


def test_it_caps_fixed_and_adaptive_batchers_that_share_it() -> None:
    ceiling = CrashCeiling(Clock())
    fixed = Batcher(BatchSettings(max_size=16, adaptive=False), ceiling)
    adaptive = Batcher(BatchSettings(max_size=16), ceiling)
    for _ in range(5):
        adaptive.observe(adaptive.size, 0.01, full=True)
    assert (fixed.size, adaptive.size) == (16, 16)
    ceiling.crashed(["a", "b", "c", "d"], 4)
    assert (fixed.size, adaptive.size) == (2, 2)
    assert fixed.to_json()["crash_ceiling"] == 2
    for task_id in "abcd":
        ceiling.resolved(task_id)
    assert fixed.size == 16 and fixed.to_json()["crash_ceiling"] is None
