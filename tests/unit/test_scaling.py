"""Scale-out by cost (scheduling/scaling.py): the rule, the backlog it reads, the CPU cap."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from gpulane.presets import Preset
from gpulane.runtime.launchers import DeviceAssignment
from gpulane.runtime.measures import LaneMeasures
from gpulane.scheduling.scaling import (
    LOAD_GUESS_DIVISOR,
    ScaleOut,
    backlog_of,
    cpu_room,
    wants_another,
)
from gpulane.store import QueueStats


def test_a_lane_without_workers_gets_one() -> None:
    assert wants_another(live=0, loading=0, backlog=0, drain_rate=None, load_s=5.0, cap=2)
    assert not wants_another(live=0, loading=0, backlog=9, drain_rate=None, load_s=5.0, cap=0)


def test_a_backlog_that_drains_before_a_load_gets_no_worker() -> None:
    # 64 queued, one worker at 100 tasks/s: drained in 0.64 s, a load takes 5 s.
    assert not wants_another(live=1, loading=0, backlog=64, drain_rate=100.0, load_s=5.0,
                             cap=2)


def test_a_backlog_that_would_outlast_a_load_gets_one_more() -> None:
    # 600 queued, one worker at 100 tasks/s: 6 s of work, longer than the 5 s load.
    assert wants_another(live=1, loading=0, backlog=600, drain_rate=100.0, load_s=5.0, cap=2)
    # Two workers halve the drain time: the same backlog no longer pays a third.
    assert not wants_another(live=2, loading=0, backlog=600, drain_rate=100.0, load_s=5.0,
                             cap=3)


def test_one_worker_of_a_lane_loads_at_a_time() -> None:
    assert not wants_another(live=2, loading=1, backlog=10_000, drain_rate=1.0, load_s=5.0,
                             cap=8)


def test_no_second_worker_before_the_first_measured_a_rate() -> None:
    assert not wants_another(live=1, loading=0, backlog=10_000, drain_rate=None, load_s=1.0,
                             cap=8)


def test_the_cap_bounds_the_workers() -> None:
    assert not wants_another(live=2, loading=0, backlog=10_000, drain_rate=1.0, load_s=5.0,
                             cap=2)


def test_the_backlog_is_the_lanes_counter_else_the_whole_queue() -> None:
    assert backlog_of(QueueStats(30, 0, {"gpu": 20, "cpu": 10}), "gpu") == 20
    assert backlog_of(QueueStats(30, 0, {"cpu": 30}), "gpu") == 0  # a lane with none: absent
    assert backlog_of(QueueStats(30, 0), "gpu") == 30  # a store that does not count lanes
    assert backlog_of(None, "gpu") == 0


@dataclass
class FakeWorker:
    """A WorkerView with only what the scaling rule reads."""

    id: str
    loading: bool = False
    busy: bool = False
    simulated: bool = True
    session: bool = True
    alive: bool = True
    kind: str = "gpu"
    device: DeviceAssignment = field(init=False)

    def __post_init__(self) -> None:
        self.device = (DeviceAssignment("cpu") if self.kind == "cpu"
                       else DeviceAssignment("gpu", 0, "GPU-0", self.simulated))


def test_simulated_gpu_workers_are_capped_by_the_cores() -> None:
    busy = [FakeWorker("a", busy=True), FakeWorker("b", loading=True), FakeWorker("c")]
    assert not cpu_room(busy, cores=2)  # two working on two cores: a third only time-slices
    assert cpu_room(busy, cores=3)
    real = [FakeWorker("a", busy=True, simulated=False), FakeWorker("b", busy=True)]
    assert cpu_room(real, cores=2)  # a real GPU's worker computes on its GPU


def test_cpu_lane_workers_at_work_count_against_the_cores() -> None:
    # One simulated-GPU worker busy and one CPU-lane worker busy (the busy fallback's): both
    # on the host's two cores, so no second simulated-GPU worker loads.
    working = [FakeWorker("g", busy=True), FakeWorker("c", busy=True, kind="cpu")]
    assert not cpu_room(working, cores=2)
    assert cpu_room([FakeWorker("g", busy=True), FakeWorker("c", kind="cpu")], cores=2)


class FakeStore:
    def __init__(self, stats: dict[str, QueueStats]) -> None:
        self.stats = stats
        self.reads = 0

    async def queue_stats(self) -> dict[str, QueueStats]:
        self.reads += 1
        return self.stats


class FakeSupervisor:
    def __init__(self, workers: list[FakeWorker]) -> None:
        self.workers = workers
        self.measures = LaneMeasures()

    def live_workers(self) -> list[FakeWorker]:
        return [w for w in self.workers if w.alive]


def _scale(workers: list[FakeWorker], queued: int, cores: int = 16) -> tuple[ScaleOut, Any]:
    store = FakeStore({"embed": QueueStats(queued, 0, {"gpu": queued})})
    sup = FakeSupervisor(workers)
    scale = ScaleOut(store, sup)  # type: ignore[arg-type]
    scale.cores = cores
    return scale, sup


PRESET = Preset(name="embed", argv=("python", "w.py"), vram_mb=1024, start_timeout_s=120)


async def test_scale_out_reads_the_measures_and_the_backlog() -> None:
    one = [FakeWorker("w1", busy=True)]
    scale, sup = _scale(one, queued=600)
    await scale.refresh()
    assert not scale.may_add(PRESET, "gpu", one, cap=2)  # no rate measured yet
    sup.measures.batch("embed", "gpu", 64, 0.5, full=True)  # 128 tasks/s
    sup.measures.loaded("embed", "gpu", 4.0)
    assert scale.may_add(PRESET, "gpu", one, cap=2)  # 600 / 128 = 4.7 s of work > 4 s load
    scale, sup = _scale(one, queued=500)
    sup.measures.batch("embed", "gpu", 64, 0.5, full=True)
    sup.measures.loaded("embed", "gpu", 4.0)
    await scale.refresh()
    assert not scale.may_add(PRESET, "gpu", one, cap=2)  # 3.9 s of work: drained first
    assert not scale.may_add(PRESET, "gpu", [*one, FakeWorker("w2", loading=True)], cap=3)


async def test_an_unmeasured_load_is_guessed_from_the_start_timeout() -> None:
    one = [FakeWorker("w1", busy=True)]
    guess_s = PRESET.start_timeout_s / LOAD_GUESS_DIVISOR  # 30 s
    scale, sup = _scale(one, queued=int(100 * guess_s) + 1)
    sup.measures.batch("embed", "gpu", 100, 1.0, full=True)  # 100 tasks/s
    await scale.refresh()
    assert scale.may_add(PRESET, "gpu", one, cap=2)
    scale, sup = _scale(one, queued=int(100 * guess_s) - 1)
    sup.measures.batch("embed", "gpu", 100, 1.0, full=True)
    await scale.refresh()
    assert not scale.may_add(PRESET, "gpu", one, cap=2)


async def test_a_lane_that_would_pay_waits_for_a_free_core_on_simulated_gpus() -> None:
    one = [FakeWorker("w1", busy=True), FakeWorker("other", busy=True)]
    scale, sup = _scale(one, queued=10_000, cores=2)
    sup.measures.batch("embed", "gpu", 10, 1.0, full=True)
    sup.measures.loaded("embed", "gpu", 2.0)
    await scale.refresh()
    assert not scale.may_add(PRESET, "gpu", one[:1], cap=2)  # both cores are working
    scale.cores = 4
    assert scale.may_add(PRESET, "gpu", one[:1], cap=2)


async def test_the_backlog_is_read_only_while_a_lane_has_session_workers() -> None:
    scale, sup = _scale([], queued=5)
    await scale.refresh()
    assert scale._stats == {}  # nobody would look at it
    sup.workers.append(FakeWorker("w1"))
    await scale.refresh()
    await scale.refresh()  # fresh for BACKLOG_FRESH_S: not read again
    assert scale.store.reads == 1  # type: ignore[attr-defined]


async def test_in_a_fleet_a_node_weighs_only_its_share_of_the_queue() -> None:
    # 600 queued fleet-wide, 128 tasks/s per worker, 4 s loads: alone, one worker would not
    # clear it before a new one is ready (4.7 s); with two more workers on other nodes
    # draining the same queue this node's share is 200 tasks, 1.6 s of work.
    one = [FakeWorker("w1", busy=True)]
    scale, sup = _scale(one, queued=600)
    sup.measures.batch("embed", "gpu", 64, 0.5, full=True)
    sup.measures.loaded("embed", "gpu", 4.0)
    await scale.refresh()
    assert scale.may_add(PRESET, "gpu", one, cap=2)
    scale.elsewhere = lambda preset, lane: 2 if (preset, lane) == ("embed", "gpu") else 0
    assert not scale.may_add(PRESET, "gpu", one, cap=2)


def test_a_node_registers_the_workers_it_serves_each_lane_with() -> None:
    from gpulane.fleet import NodeInfo

    info = NodeInfo(name="a", url=None, started_at=1.0, heartbeat_at=2.0,
                    serving={"embed/gpu": 2})
    assert NodeInfo.from_json(info.to_json()).serving == {"embed/gpu": 2}
    old = info.to_json()
    del old["serving"]  # an entry from a node of an older release
    assert NodeInfo.from_json(old).serving == {}
