"""How many items one task brings to a batch: a task of ``{"texts": [...]}`` is that many.

A session worker's batch is bounded in items, not tasks (the batcher's ``max_size``): a task
of 32 texts is 32 of a batch of 64, so a request's list counts towards the batch as if its
texts had come one by one. Claims are made in tasks (the store knows nothing of inputs), so
the batcher turns its item budget into a number of tasks by the mean items per task it has
seen; a batch that was claimed too big sends what fits and requeues the rest unspent.
"""

from __future__ import annotations

from typing import Any, Protocol, TypeVar

BATCH_INPUT_KEY = "texts"
"""The input field whose list is a task's items (the embed preset's batch input)."""


def items_of(task_input: Any) -> int:
    """How many items a task's input holds: the length of its ``texts`` list, else 1."""
    if isinstance(task_input, dict):
        texts = task_input.get(BATCH_INPUT_KEY)
        if isinstance(texts, list) and texts:
            return len(texts)
    return 1


class Counted(Protocol):
    @property
    def items(self) -> int: ...


C = TypeVar("C", bound=Counted)


def fit(runs: list[C], size: int) -> tuple[list[C], list[C], int]:
    """The leading runs that fit ``size`` items, the rest, and the items of those that fit.
    The first always fits, so that a task bigger than the batch still runs, alone."""
    total = 0
    for n, run in enumerate(runs):
        if n and total + run.items > size:
            return runs[:n], runs[n:], total
        total += run.items
    return runs, [], total
