"""The batch policy: fixed and adaptive sizes, the latency target, waits, the OOM ceiling."""

from __future__ import annotations

from gpulane.presets import BatchSettings
from gpulane.runtime.batcher import Batcher


def test_fixed_batches_take_max_size_and_never_move() -> None:
    b = Batcher(BatchSettings(max_size=16, adaptive=False, max_wait_ms=5))
    assert b.size == 16 and b.waits
    b.observe(16, 10.0, full=True)
    b.observe(1, 0.001, full=False)
    assert b.size == 16
    assert b.to_json()["mode"] == "fixed"


def test_a_batch_of_one_is_never_adaptive_and_never_waits() -> None:
    b = Batcher(BatchSettings(max_size=1, max_wait_ms=50))
    assert not b.adaptive and b.size == 1 and not b.waits


def test_adaptive_starts_at_one_and_doubles_while_batches_come_back_full() -> None:
    b = Batcher(BatchSettings(max_size=48))
    sizes = [b.size]
    for _ in range(8):
        b.observe(b.size, 0.001, full=True)
        sizes.append(b.size)
    assert sizes == [1, 2, 4, 8, 16, 32, 48, 48, 48]


def test_adaptive_holds_its_size_when_batches_are_not_full() -> None:
    b = Batcher(BatchSettings(max_size=64))
    for _ in range(3):
        b.observe(b.size, 0.001, full=True)
    b.observe(3, 0.001, full=False)
    assert b.size == 8


def test_growth_stops_where_the_latency_target_would_be_crossed() -> None:
    b = Batcher(BatchSettings(max_size=256, target_latency_ms=100))
    for _ in range(4):
        b.observe(b.size, 0.010, full=True)  # 10 ms per batch: far under the target
    assert b.size == 16
    b.observe(16, 0.080, full=True)  # 80 ms: room for 16 * 100 / 80 = 20, not 32
    assert b.size == 20


def test_an_overshoot_shrinks_in_proportion() -> None:
    b = Batcher(BatchSettings(max_size=64, target_latency_ms=50, adaptive=True))
    for _ in range(6):
        b.observe(b.size, 0.001, full=True)
    assert b.size == 64
    b.observe(64, 0.200, full=True)  # 4x over: a quarter of the size
    assert b.size == 16
    b.observe(16, 0.051, full=True)  # just over: at least one smaller
    assert b.size == 15


def test_a_wait_that_brought_nothing_halves_the_size_and_soon_stops_waiting() -> None:
    b = Batcher(BatchSettings(max_size=32, max_wait_ms=5))
    assert not b.waits  # a lone caller pays no wait
    for _ in range(2):
        b.observe(b.size, 0.001, full=True)
    assert b.size == 4 and b.waits
    b.waited_in_vain()
    b.waited_in_vain()
    assert b.size == 1 and not b.waits


def test_oom_sets_a_ceiling_at_half_the_batch_for_good() -> None:
    b = Batcher(BatchSettings(max_size=64))
    for _ in range(7):
        b.observe(b.size, 0.001, full=True)
    assert b.size == 64
    b.oom(64)
    assert b.size == 32 and b.ceiling == 32
    for _ in range(3):
        b.observe(b.size, 0.001, full=True)
    assert b.size == 32  # growth stops at the ceiling
    b.oom(1)
    assert b.size == 1 and b.ceiling == 1
    assert b.to_json()["ooms"] == 2
