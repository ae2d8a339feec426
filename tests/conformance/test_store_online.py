"""The conformance suite against the online lane's memory tier (store/memory.py behind
store/tiered.py): every test of the store's hot path, run on a tiered store that keeps
every task in memory (as if each preset were ``durable: false``) and never spills on its
own (a window of an hour).

What it leaves out, and why, is in ``NOT_IN_MEMORY``: upkeep that is the durable tier's
alone by design (reaping, recovery, retention, ageing), and tests that reopen a store's data.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import AsyncIterator, Sequence

import pytest
from tests.conformance import test_store, test_store_bounded, test_store_lanes, test_store_many

from gpulane.model import Task, TaskSpec
from gpulane.store.memory import MemoryStore
from gpulane.store.sqlite import SqliteStore
from gpulane.store.sqlite_adopt import adopt
from gpulane.store.tiered import OnlineLimits, TieredStore

_AGEING = ("ageing is the durable tier's: an online task is queued for less than the spill "
           "window")
_LISTING = ("GET /v1/tasks lists the durable tier: an online task is listed once it is written "
            "there (docs/reliability.md)")
_REAP = ("reaping is the durable tier's: a running online task past the window is written "
         "there and reaped there; a crash loses the younger ones (test_online_crash.py)")
_RECOVER = ("recovery is the durable tier's: memory is empty after a restart (what it held is "
            "what a crash loses)")
_PURGE = ("retention is the durable tier's: memory forgets results after online_keep_s "
          "(tests/unit/test_store_tiered.py)")
NOT_IN_MEMORY: dict[str, str] = {
    "test_ageing_is_capped_and_keeps_the_asked_priority": _AGEING,
    "test_ageing_lifts_long_waiting_work_above_fresh_work": _AGEING,
    "test_move_queued_keeps_an_aged_tasks_place": _AGEING,
    "test_queued_lists_a_queue_in_claim_order": _AGEING,
    "test_list_tasks_newest_first_and_filtered": _LISTING,
    "test_list_tasks_pages_to_the_end": _LISTING,
    "test_list_tasks_pages_within_a_filter": _LISTING,
    "test_submit_many_is_all_or_nothing_on_a_conflict": _LISTING,
    "test_recover_requeues_only_that_nodes_running_tasks": _RECOVER,
    "test_lane_and_queue_counts_stay_exact_on_every_path": _REAP,
    "test_reap_fails_an_attempt_that_was_the_last_one": _REAP,
    "test_reap_leaves_queued_and_finished_tasks_alone": _REAP,
    "test_reap_requeues_attempts_unheard_of_past_the_ttl_and_spends_them": _REAP,
    "test_purge_deletes_what_finished_before_the_cutoff_with_its_events_and_key": _PURGE,
    "test_purge_empties_the_store_in_batches_and_keeps_counters": _PURGE,
    "test_purge_with_max_batches_leaves_the_rest_for_the_next_call": _PURGE,
}
"""Test name -> why it does not apply to the memory tier. Each was checked to fail only at
the step named (an age_queued, a list_tasks, a reap, a recover, a purge)."""


class AllOnline(TieredStore):
    """A tiered store that routes every spec to memory."""

    async def submit_many(self, specs: Sequence[TaskSpec]) -> list[tuple[Task, bool]]:
        return await super().submit_many([dataclasses.replace(s, durable=False)
                                          for s in specs])


@pytest.fixture
async def store() -> AsyncIterator[AllOnline]:
    sqlite = SqliteStore(":memory:")
    s = AllOnline(sqlite, lambda held: adopt(sqlite, held), OnlineLimits(3600.0, 3600.0, 10**6),
                  MemoryStore())
    await s.open()
    try:
        yield s
    finally:
        await s.close()


for _module in (test_store, test_store_lanes, test_store_bounded, test_store_many):
    for _name in dir(_module):
        _fn = getattr(_module, _name)
        if not _name.startswith("test_") or not callable(_fn):
            continue
        if "store" not in inspect.signature(_fn).parameters:  # another backend fixture's
            continue
        if _name in NOT_IN_MEMORY:
            _fn = pytest.mark.skip(reason=NOT_IN_MEMORY[_name])(_fn)
        globals()[_name] = _fn
