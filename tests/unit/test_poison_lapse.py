"""A poison input whose suspicion lapses between its crashes (it waited in the queue, or its
worker took to boot, longer than SUSPECT_TTL_S) lands in a full batch again each time: without
a memory beyond the TTL it would crash its workers for ever, spending no attempt and never
being dead-lettered. Past UNSPENT_CRASHES_MAX crashed batches it spends its attempt as if it
stood alone; its batch-mates, each in one crash only, still spend nothing."""

from __future__ import annotations

from pathlib import Path

from gpulane.runtime.poison import (
    CRASHES_REMEMBERED,
    SUSPECT_TTL_S,
    UNSPENT_CRASHES_MAX,
    CrashCeiling,
)
from gpulane.runtime.worker import Worker
from gpulane.runtime.worker_process import WorkerState
from tests.unit.test_crash_ceiling import Clock
from tests.unit.test_pipeline import FakeProc, tasks
from tests.unit.test_supervisor import RecordingStore, registry


async def test_a_poison_whose_suspicion_lapses_between_crashes_still_spends_its_attempts(
        tmp_path: Path) -> None:
    store = RecordingStore()
    sup, worker, _ = registry(store, tmp_path)
    clock = Clock()
    ceiling = sup.pipeline.crash_ceilings["batched"] = CrashCeiling(clock)
    for crash in range(UNSPENT_CRASHES_MAX + 1):
        if crash:
            # Its replacement (a FakeProc is always w-1).
            worker = sup.workers["w-1"] = Worker(FakeProc(), worker.preset, ceiling)
        clock.now += SUSPECT_TTL_S + 1  # the last crash's suspicion has lapsed: no cap
        assert worker.batch_size == 2
        sup.dispatch(worker.id, tasks("poison", f"mate-{crash}"))
        worker.proc.state, worker.proc.returncode = WorkerState.EXITED, 139
        await sup._on_exit(worker.proc)
        assert store.errors[f"mate-{crash}"] is None  # one crash: nothing spent
        if crash < UNSPENT_CRASHES_MAX:
            assert store.errors["poison"] is None, f"spent at crash {crash}"
    spent = store.errors["poison"]
    assert isinstance(spent, dict) and spent["kind"] == "worker_died", spent
    assert ceiling.cap == 1  # its retry runs alone


def test_the_crash_memory_is_bounded_and_cleared_by_an_outcome() -> None:
    ceiling = CrashCeiling(Clock())
    for _ in range(UNSPENT_CRASHES_MAX):
        ceiling.crashed(["p", "q"], 2)
    assert ceiling.worn("p") and ceiling.worn("q")
    ceiling.resolved("p")
    assert not ceiling.worn("p") and ceiling.worn("q")
    for i in range(CRASHES_REMEMBERED + 10):
        ceiling.crashed([f"t{i}"], 1)
    assert len(ceiling._crashes_of) <= CRASHES_REMEMBERED
