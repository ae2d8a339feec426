"""A task's items count towards its batch (runtime/items.py): a task of N texts is N items of
the batcher's max_size, claims turn item room into tasks, and a batch cut keeps what fits."""

from __future__ import annotations

from dataclasses import dataclass

from gpulane.presets import BatchSettings
from gpulane.runtime.batcher import Batcher
from gpulane.runtime.items import fit, items_of


@dataclass
class Run:
    items: int


def test_a_task_counts_its_texts_and_anything_else_as_one() -> None:
    assert items_of({"texts": ["a"] * 32}) == 32
    assert items_of({"text": "a"}) == 1
    assert items_of({"texts": []}) == 1  # refused by its worker: still a task to send
    assert items_of({"texts": "not a list"}) == 1
    assert items_of(None) == 1 and items_of([1, 2, 3]) == 1


def test_a_batch_keeps_the_leading_tasks_that_fit_its_items() -> None:
    runs = [Run(32), Run(16), Run(32), Run(1)]
    kept, over, items = fit(runs, 64)
    assert kept == runs[:2] and over == runs[2:] and items == 48  # 32 more would pass 64
    kept, over, items = fit([Run(100), Run(1)], 64)
    assert [r.items for r in kept] == [100] and items == 100  # too big alone: runs alone
    assert fit([Run(1)] * 5, 64) == ([Run(1)] * 5, [], 5)


def test_claims_ask_for_the_item_room_over_the_mean_items_per_task() -> None:
    b = Batcher(BatchSettings(max_size=64, adaptive=False))
    assert b.tasks_for(64) == 64  # nothing seen: one item each
    b.observe(64, 0.01, 2, full=True)  # two tasks of 32 texts
    assert b.tasks_for(b.size) == 2 and b.tasks_for(16) == 1
    stats = b.to_json()
    assert stats["tasks"] == 2 and stats["items"] == 64 and stats["mean_size"] == 64


def test_adaptive_sizes_grow_in_items() -> None:
    b = Batcher(BatchSettings(max_size=64))
    b.observe(32, 0.001, 1, full=True)  # one task of 32 filled a batch of size 1
    assert b.size == 2  # doubled, in items; a 32-text task still goes alone until it fits


def test_a_task_bigger_than_the_batch_does_not_shrink_later_claims() -> None:
    b = Batcher(BatchSettings(max_size=64, adaptive=False))
    b.observe(10_000, 0.01, 1, full=True)  # one task of 10,000 texts, sent alone
    for _ in range(63):
        b.observe(1, 0.001, 1, full=False)  # then single texts
    assert b.tasks_for(b.size) == 64 // 2  # mean (64 + 63) / 64 items a task, not ~157
    assert b.to_json()["items"] == 64 + 63 and max(b.stats.sizes) == 64
