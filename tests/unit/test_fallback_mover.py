"""The fallback movers' decisions against a fake store and supervisor: which queued GPU-lane
tasks move to the CPU, why, with which event, and what a round costs when nothing waits."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, cast

from gpulane.model import DeviceWish, Task, TaskState
from gpulane.presets import Preset, PresetRegistry
from gpulane.runtime.circuit import PresetCircuit
from gpulane.runtime.measures import LaneMeasures
from gpulane.runtime.supervisor import Supervisor
from gpulane.scheduling.fallback import LOAD_GUESS_S, FallbackMover, LaneOutlook
from gpulane.scheduling.ledger import Ledger
from gpulane.store import NewEvent, QueuedTask, QueueStats, Store
from tests.unit.test_ledger import snap

NOW = 1_000_000.0


def preset(name: str = "p", **fields: Any) -> Preset:
    return Preset.model_validate({"name": name, "argv": ["python", "w.py"], **fields})


def task(n: int, *, waited_s: float = 0.0, wish: DeviceWish = DeviceWish.AUTO,
         preset_name: str = "p") -> Task:
    return Task(id=f"t{n:03d}", preset=preset_name, state=TaskState.QUEUED, input={},
                priority=50, device_wish=wish, created_at=NOW - waited_s, lane="gpu")


class FakeStore:
    def __init__(self, gpu: list[Task], cpu_queued: int = 0) -> None:
        self.gpu = gpu
        self.cpu_queued = cpu_queued
        self.queued_calls = 0
        self.moves: list[tuple[list[str], str, str, list[NewEvent]]] = []

    async def queue_stats(self) -> Mapping[str, QueueStats]:
        lanes = {"gpu": len(self.gpu), "cpu": self.cpu_queued}
        return {"p": QueueStats(len(self.gpu) + self.cpu_queued, 0, lanes)}

    async def queued(self, preset: str, lane: str, limit: int) -> list[QueuedTask]:
        self.queued_calls += 1
        return [QueuedTask(t.id, t.device_wish, t.created_at) for t in self.gpu[:limit]]

    async def move_queued(self, task_ids: Sequence[str], lane: str, reason: str,
                          events: Sequence[NewEvent] = ()) -> list[Task]:
        self.moves.append((list(task_ids), lane, reason, list(events)))
        moved = [t for t in self.gpu if t.id in task_ids]
        self.gpu = [t for t in self.gpu if t.id not in task_ids]
        return moved


class FakeSupervisor:
    def __init__(self, warm: dict[str, int] | None = None) -> None:
        self.warm = warm or {}
        self.measures = LaneMeasures()
        self.circuits: dict[tuple[str, str], PresetCircuit] = {}
        self.live_gpu: list[object] = []

    def warm_count(self, preset: str, lane: str) -> int:
        return self.warm.get(lane, 0)

    def session_workers(self, preset: str, lane: str) -> list[object]:
        return self.live_gpu if lane == "gpu" else []


class Ticks:
    """A monotonic clock that moves a second on every reading: each busy scan is due."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


def mover(store: FakeStore, sup: FakeSupervisor, *presets: Preset, gpus: int = 1,
          monotonic: Ticks | None = None) -> tuple[FallbackMover, list[tuple[str, str, int]]]:
    recorded: list[tuple[str, str, int]] = []
    registry = PresetRegistry(presets or (preset(),))
    m = FallbackMover(cast(Store, store), lambda: registry, cast(Supervisor, sup),
                      Ledger([snap(i, 24576) for i in range(gpus)], cpu_slots=2),
                      record=lambda r, p, n: recorded.append((r, p, n)), on_moved=lambda: None,
                      clock=lambda: NOW, monotonic=monotonic or Ticks())
    return m, recorded


BUSY = {"fallback": ["busy", "error"], "fallback_after_ms": 1000}


def measured(sup: FakeSupervisor, gpu_rate: float, cpu_rate: float | None) -> None:
    """Each lane warm with one worker, and its per-worker rate measured."""
    sup.warm = {"gpu": 1, "cpu": 1}
    sup.measures.batch("p", "gpu", 1, 1 / gpu_rate, full=True)
    if cpu_rate is not None:
        sup.measures.batch("p", "cpu", 1, 1 / cpu_rate, full=True)


def test_lane_outlook_start_times() -> None:
    assert LaneOutlook(0.0, 10.0, 1).start_s(20) == 2.0
    assert LaneOutlook(3.0, None, 2).start_s(1) == 3.0
    assert LaneOutlook(3.0, None, 2).start_s(2) is None  # past the first batches: unknown


async def test_no_gpu_backlog_costs_no_query() -> None:
    store = FakeStore([])
    m, recorded = mover(store, FakeSupervisor(), preset(**BUSY))
    assert await m.run_round() == 0
    assert store.queued_calls == 0 and recorded == []


async def test_busy_moves_what_would_wait_too_long_and_the_cpu_starts_sooner() -> None:
    # GPU: 2 tasks/s, CPU: 2 tasks/s, both warm; 1 s allowed. Task i waits i/2 s on the GPU.
    store = FakeStore([task(i) for i in range(10)])
    sup = FakeSupervisor()
    measured(sup, gpu_rate=2.0, cpu_rate=2.0)
    m, recorded = mover(store, sup, preset(**BUSY))
    moved = await m.run_round()
    [(ids, lane, reason, [event])] = store.moves
    assert (lane, reason, moved) == ("cpu", "gpu_busy", len(ids))
    # The first three stay (0, 0.5, 1.0 s); of the rest each moves only while the CPU
    # starts it sooner than the GPU would: both drain alike, so they share the tail.
    assert "t000" not in ids and "t001" not in ids and "t002" not in ids
    assert 0 < len(ids) < 7
    assert event.type == "fallback" and event.data["reason"] == "gpu_busy"
    assert (event.data["from"], event.data["to"], event.data["fallback_after_ms"]) == (
        "gpu", "cpu", 1000)
    assert event.data["expected_wait_ms"] > 1000
    assert recorded == [("gpu_busy", "p", len(ids))]


async def test_busy_counts_the_wait_so_far() -> None:
    store = FakeStore([task(0, waited_s=5.0), task(1)])
    sup = FakeSupervisor()
    measured(sup, gpu_rate=1.0, cpu_rate=10.0)
    m, _ = mover(store, sup, preset(**BUSY))
    await m.run_round()
    # The head waited 5 s already, but the GPU starts it now: the CPU is not sooner.
    # The second one: 1 s ahead on the GPU, 0 s on the CPU, and 0 + 1 s is not past 1 s.
    assert store.moves == []
    store.gpu = [task(0, waited_s=5.0), task(1, waited_s=0.5)]
    await m.run_round()
    assert store.moves[0][0] == ["t001"]


async def test_busy_never_moves_strict_tasks_and_presets_without_busy() -> None:
    store = FakeStore([task(i, wish=DeviceWish.GPU) for i in range(10)])
    sup = FakeSupervisor()
    measured(sup, gpu_rate=1.0, cpu_rate=10.0)
    m, _ = mover(store, sup, preset(**BUSY))
    assert await m.run_round() == 0
    store.gpu = [task(i) for i in range(10)]
    m, _ = mover(store, sup, preset(fallback_after_ms=1000))  # default policy: no busy
    assert await m.run_round() == 0 and store.moves == []
    cpu_less = preset(devices=["gpu"], **BUSY)  # no CPU to go to
    m, _ = mover(store, sup, cpu_less)
    assert await m.run_round() == 0 and store.moves == []


async def test_an_unmeasured_cpu_takes_one_task_per_worker() -> None:
    store = FakeStore([task(i) for i in range(10)])
    sup = FakeSupervisor()
    measured(sup, gpu_rate=1.0, cpu_rate=None)  # CPU warm, its rate not known yet
    m, _ = mover(store, sup, preset(**BUSY))
    await m.run_round()
    assert [len(ids) for ids, *_ in store.moves] == [1]


async def test_cpu_slots_held_by_other_presets_keep_tasks_on_the_gpu() -> None:
    store = FakeStore([task(i, waited_s=5.0) for i in range(10)])
    sup = FakeSupervisor()
    measured(sup, gpu_rate=1.0, cpu_rate=10.0)
    m, recorded = mover(store, sup, preset(**BUSY))
    m.ledger.cpu_used = m.ledger.cpu_slots  # every slot runs another preset's batch
    assert await m.run_round() == 0
    assert store.queued_calls == 0 and recorded == []
    m.ledger.cpu_used -= 1  # one comes free: the CPU starts work again
    assert await m.run_round() > 0


async def test_a_full_unmeasured_cpu_lane_costs_no_read() -> None:
    # CPU warm with one worker, its rate unknown, one task queued there already: it can start
    # no more, so the GPU queue is not read at all.
    store = FakeStore([task(i, waited_s=5.0) for i in range(10)], cpu_queued=1)
    sup = FakeSupervisor()
    measured(sup, gpu_rate=1.0, cpu_rate=None)
    m, recorded = mover(store, sup, preset(**BUSY))
    assert await m.run_round() == 0
    assert store.queued_calls == 0 and store.moves == [] and recorded == []


async def test_an_unmeasured_gpu_is_not_guessed_busy() -> None:
    store = FakeStore([task(i) for i in range(50)])
    sup = FakeSupervisor()
    sup.warm = {"gpu": 1, "cpu": 1}
    sup.measures.batch("p", "cpu", 1, 0.01, full=True)
    m, _ = mover(store, sup, preset(**BUSY))
    assert await m.run_round() == 0  # no GPU rate: only the wait so far counts


async def test_cold_lanes_count_their_load_time() -> None:
    store = FakeStore([task(0, waited_s=0.5)])
    sup = FakeSupervisor()  # nothing warm, nothing measured: both lanes wait LOAD_GUESS_S
    m, _ = mover(store, sup, preset(**BUSY))
    assert await m.run_round() == 0  # the CPU would not start it sooner
    # A CPU worker loads in 0.1 s; the GPU's load is still the guess, past the 1 s allowed.
    sup.measures.loaded("p", "cpu", 0.1)
    assert await m.run_round() == 1
    assert store.moves[0][3][0].data["expected_wait_ms"] == round((0.5 + LOAD_GUESS_S) * 1000)


async def test_an_open_gpu_circuit_moves_every_auto_task() -> None:
    store = FakeStore([task(0), task(1, wish=DeviceWish.GPU), task(2)])
    sup = FakeSupervisor()
    circuit = sup.circuits[("p", "gpu")] = PresetCircuit()
    m, recorded = mover(store, sup, preset())  # the default policy has error
    for _ in range(circuit.threshold):
        circuit.failed("boom: no CUDA")
    sup.live_gpu = [object()]  # a live GPU worker still drains the lane: nothing moves
    assert await m.run_round() == 0
    sup.live_gpu = []
    assert await m.run_round() == 2
    [(ids, lane, reason, [event])] = store.moves
    assert (ids, lane, reason) == (["t000", "t002"], "cpu", "gpu_unavailable")
    assert event.data["start_failures"] == circuit.threshold
    assert event.data["last_error"] == "boom: no CUDA" and event.data["retry_in_s"] > 0
    assert recorded == [("gpu_unavailable", "p", 2)]
    circuit.open_until = 0.0  # the cooldown is over: half open, the head probes the GPU
    store.gpu = [task(3)]
    assert await m.run_round() == 0


async def test_every_gpu_lost_moves_auto_tasks_unless_another_node_has_one() -> None:
    store = FakeStore([task(0), task(1)])
    m, recorded = mover(store, FakeSupervisor(), preset(), gpus=2)
    for acct in m.ledger.gpus.values():
        acct.lost = True
    m.elsewhere = lambda: True
    assert await m.run_round() == 0
    m.elsewhere = lambda: False
    assert await m.run_round() == 2
    assert store.moves[0][2] == "device_lost"
    assert store.moves[0][3][0].data["lost_gpus"] == [0, 1]
    assert recorded == [("device_lost", "p", 2)]


async def test_a_paused_node_or_one_without_gpus_moves_nothing() -> None:
    store = FakeStore([task(i) for i in range(10)])
    sup = FakeSupervisor()
    measured(sup, gpu_rate=1.0, cpu_rate=10.0)
    m, _ = mover(store, sup, preset(**BUSY))
    m.paused = lambda: True
    assert await m.run_round() == 0
    m, _ = mover(store, sup, preset(**BUSY), gpus=0)
    assert await m.run_round() == 0 and store.queued_calls == 0


async def test_a_busy_scan_runs_once_per_tick_however_often_the_loop_wakes() -> None:
    store = FakeStore([task(i) for i in range(10)])
    sup = FakeSupervisor()
    measured(sup, gpu_rate=1.0, cpu_rate=10.0)
    clock = Ticks()
    m, _ = mover(store, sup, preset(**BUSY), monotonic=clock)
    await m.run_round()
    assert store.queued_calls == 1
    clock.now -= 1.0 - 0.05  # the next reading is 50 ms after the last scan
    await m.run_round()
    assert store.queued_calls == 1  # a tick is min(250 ms, fallback_after_ms / 4)
    await m.run_round()
    assert store.queued_calls == 2
