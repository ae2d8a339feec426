"""Clearing room for an immediate task (scheduling/task_preemption.py), on a bare ledger."""

from __future__ import annotations

from dataclasses import dataclass

from gpulane.devices import DeviceSnapshot
from gpulane.presets import Preset
from gpulane.runtime.launchers import DeviceAssignment
from gpulane.scheduling.ledger import Ledger
from gpulane.scheduling.task_preemption import CLEARING_SLACK_S, TaskPreemption

GPU_MB = 24576
BIG = Preset(name="big", argv=("python", "w.py"), devices=("gpu",), vram_mb=20000)


@dataclass
class View:
    id: str
    alive: bool = True


class FakeSupervisor:
    def __init__(self) -> None:
        self.views: dict[str, View] = {}
        self.preempted: list[tuple[str, float]] = []
        self.ids = 0

    def worker(self, wid: str) -> View | None:
        return self.views.get(wid)

    def preempt(self, wid: str, grace_s: float) -> None:
        self.preempted.append((wid, grace_s))
        self.views[wid].alive = False  # draining: it takes no new work

    def next_worker_id(self, preset: Preset, device: DeviceAssignment) -> str:
        self.ids += 1
        return f"{preset.name}-{device.name}-{self.ids}"


def _setup() -> tuple[Ledger, FakeSupervisor, TaskPreemption]:
    ledger = Ledger([DeviceSnapshot(i, f"GPU-{i}", "sim", GPU_MB, 0, None, None, None, None,
                                    None, simulated=True) for i in range(2)], cpu_slots=2)
    sup = FakeSupervisor()
    # gpu:0: a background worker and a lease (never a task's victim); gpu:1: a normal worker
    # and a non-preemptible one, so only gpu:0 can be cleared, and only of its worker.
    for wid, device, mb, prio, pre in (("bg", 0, 8000, 10, True), ("n1", 1, 8000, 50, True),
                                       ("keep", 1, 8000, 10, False)):
        ledger.acquire(wid, device, mb, priority=prio, preemptible=pre)
        sup.views[wid] = View(wid)
    ledger.acquire("lease-x", 0, 4000, priority=10, kind="lease")
    return ledger, sup, TaskPreemption(ledger, sup, grace_s=5.0)  # type: ignore[arg-type]


def _two_background() -> tuple[Ledger, FakeSupervisor, TaskPreemption, list[bool]]:
    """gpu:0 holding two background workers of 10,000 MB each (BIG needs both gone), and the
    list each on_release call appends to."""
    ledger = Ledger([DeviceSnapshot(0, "GPU-0", "sim", GPU_MB, 0, None, None, None, None,
                                    None, simulated=True)], cpu_slots=2)
    sup = FakeSupervisor()
    for wid in ("bg1", "bg2"):
        ledger.acquire(wid, 0, 10000, priority=10)
        sup.views[wid] = View(wid)
    pre = TaskPreemption(ledger, sup, grace_s=5.0)  # type: ignore[arg-type]
    released: list[bool] = []
    pre.on_release = lambda: released.append(True)
    return ledger, sup, pre, released


def test_the_cheapest_lower_priority_workers_on_one_device_are_preempted() -> None:
    _ledger, sup, pre = _setup()
    assert pre.preempt_for(BIG, 90, lease_reserved=set())
    assert sup.preempted == [("bg", 5.0)]  # not the lease, not the normal worker's device
    assert pre.reserved_devices() == {0} and pre.reserved_devices("big") == set()
    assert not pre.preempt_for(BIG, 90, lease_reserved=set())  # once while it drains
    assert len(sup.preempted) == 1


def test_nothing_is_preempted_for_equal_priority_or_on_a_lease_reserved_device() -> None:
    _ledger, sup, pre = _setup()
    assert not pre.preempt_for(BIG, 10, lease_reserved=set())
    assert not pre.preempt_for(BIG, 90, lease_reserved={0})
    assert sup.preempted == []


def test_freed_room_is_held_for_the_new_worker_until_taken() -> None:
    ledger, _sup, pre = _setup()
    pre.preempt_for(BIG, 90, lease_reserved=set())
    assert pre.take("big") is None  # the victim still drains
    ledger.release("bg")  # its exit
    pre.hold_freed_room()
    # Held in the ledger at the task's priority: a lease or another preset finds no room.
    assert ledger.gpus[0].free_mb < 1024
    device, wid = pre.take("big") or (None, None)
    assert device is not None and device.index == 0 and wid is not None
    assert [h.priority for h in ledger.holders(0) if h.holder == wid] == [90]
    assert not pre.clearing("big") and pre.reserved_devices() == set()


def test_a_clearing_whose_room_never_came_is_given_up() -> None:
    ledger, _sup, pre = _setup()
    released: list[bool] = []
    pre.on_release = lambda: released.append(True)
    pre.preempt_for(BIG, 90, lease_reserved=set())
    ledger.release("bg")
    pre.hold_freed_room()
    pre.expire(now=pre.clearings["big"].until + CLEARING_SLACK_S)
    assert not pre.clearing("big") and released == [True]
    assert ledger.gpus[0].free_mb == GPU_MB - 4000  # the held room went back


def test_a_lost_gpu_is_never_cleared() -> None:
    ledger, sup, pre = _setup()
    ledger.gpus[0].lost = True
    assert not pre.preempt_for(BIG, 90, lease_reserved=set())
    assert sup.preempted == []


def test_room_freed_in_part_is_held_so_a_lease_cannot_take_it() -> None:
    ledger, sup, pre, released = _two_background()
    assert pre.preempt_for(BIG, 90, lease_reserved=set())
    assert sorted(w for w, _ in sup.preempted) == ["bg1", "bg2"]
    ledger.release("bg1")  # the first victim exits: 14,576 MB free, not yet enough
    pre.hold_freed_room()
    assert ledger.fits(4000) == []  # a lease of 4,000 MB finds no room there now
    assert [(h.kind, h.vram_mb, h.preemptible) for h in ledger.holders(0)
            if h.holder != "bg2"] == [("clearing", GPU_MB - 10000, False)]
    assert not ledger.acquire("lease-y", 0, 4000, kind="lease")
    assert pre.take("big") is None
    ledger.release("bg2")  # the second one exits: the whole room goes to the new worker
    pre.hold_freed_room()
    device, wid = pre.take("big") or (None, None)
    assert device is not None and wid is not None
    assert [(h.holder, h.vram_mb) for h in ledger.holders(0)] == [(wid, 20000)]
    assert released == []


def test_a_clearing_given_up_releases_the_part_it_held() -> None:
    ledger, _sup, pre, released = _two_background()
    pre.preempt_for(BIG, 90, lease_reserved=set())
    ledger.release("bg1")
    pre.hold_freed_room()
    pre.expire(now=pre.clearings["big"].until)  # bg2 outlived its grace and more
    assert not pre.clearing("big") and released == [True]
    assert [h.holder for h in ledger.holders(0)] == ["bg2"]
    assert ledger.gpus[0].free_mb == GPU_MB - 10000
