"""Whole GPUs: gpus: N presets (validation, routing, placement, worker env, docker argv), the
ledger's whole-device holdings, and immediate leases that clear N devices at once."""

from __future__ import annotations

import asyncio
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError as PydanticValidationError

from gpulane.api.requests import LeaseBody
from gpulane.api.validation import request_error
from gpulane.devices import DeviceSnapshot
from gpulane.errors import RequestError, ValidationError
from gpulane.model import DeviceWish
from gpulane.presets import Mode, Preset, check_file
from gpulane.runtime.launchers import DeviceAssignment, DockerLauncher, worker_env
from gpulane.scheduling.leases import (
    Lease,
    LeaseManager,
    LeaseRequest,
    LeaseState,
    LeaseTimeout,
    _cheapest,
)
from gpulane.scheduling.ledger import Holding, Ledger
from gpulane.scheduling.router import CPU_LANE, GPU_LANE, FallbackReason, Route, route
from gpulane.scheduling.scheduler import Scheduler

GIB = 1024


def snap(index: int, total: int = 24 * GIB, free: int | None = None) -> DeviceSnapshot:
    return DeviceSnapshot(index=index, uuid=f"GPU-{index}", name="test", total_vram_mb=total,
                          used_vram_mb=None if free is None else total - free,
                          free_vram_mb=free, utilization_pct=None,
                          memory_utilization_pct=None, temperature_c=None, power_w=None)


def ledger(n: int, total: int = 24 * GIB) -> Ledger:
    return Ledger([snap(i, total) for i in range(n)], cpu_slots=2)


def preset(gpus: int = 2, **fields: Any) -> Preset:
    return Preset(name=fields.pop("name", "multi"), argv=("python", "w.py"), gpus=gpus,
                  **fields)


# -- ledger -----------------------------------------------------------------------------------


def test_acquire_whole_is_all_or_none_and_release_frees_every_device() -> None:
    led = ledger(3)
    assert led.acquire("slice", 2, 1024)
    assert not led.acquire_whole("w", [0, 2])  # gpu 2 is not empty: nothing is taken
    assert led.holders(0) == []
    assert led.acquire_whole("w", [0, 1])
    assert led.acquire_whole("w", [0, 1])  # a retry by the same holder is fine
    assert [led.gpus[d].declared_mb for d in (0, 1)] == [24 * GIB, 24 * GIB]
    assert led.empty_devices() == []
    led.release("w")
    assert led.empty_devices() == [0, 1]


def test_a_whole_device_takes_no_slices_not_even_zero_mb() -> None:
    led = ledger(2)
    assert led.acquire_whole("lease-1", [0])
    assert led.fits(0) == [1]
    assert not led.acquire("w", 0, 0)
    assert led.acquire("w", 1, 0)


def test_the_drivers_own_reservation_still_counts_as_empty() -> None:
    led = Ledger([snap(0, 80 * GIB, free=80 * GIB - 500), snap(1, 80 * GIB, free=60 * GIB),
                  snap(2, 0)], cpu_slots=1)
    assert led.empty_devices() == [0]  # gpu 1 is used outside gpulane; gpu 2 is lost
    assert led.acquire_whole("w", [0])
    assert not led.acquire_whole("x", [1])
    assert led.empty_devices(min_total_mb=90 * GIB) == []


# -- presets and routing ----------------------------------------------------------------------


def test_gpus_defaults_to_one_and_is_validated_with_file_and_line(tmp_path: Path) -> None:
    assert preset(gpus=1).gpus == 1 and Preset(name="p", argv=("x",)).gpus == 1
    path = tmp_path / "p.yaml"
    path.write_text(textwrap.dedent("""
        presets:
          - name: zero
            argv: [python, w.py]
            gpus: 0
          - name: flag
            argv: [python, w.py]
            gpus: true
          - name: cpu-only
            argv: [python, w.py]
            devices: [cpu]
            gpus: 2
          - name: ok
            argv: [python, w.py]
            gpus: 4
        """).lstrip())
    problems = check_file(path)
    assert len(problems) == 3, problems
    assert problems[0].startswith(f"{path}:4: field 'gpus' of preset 'zero': must be a whole "
                                  "number of GPUs from 1 to 64, got 0; fix: use 1")
    assert problems[1].startswith(f"{path}:7: field 'gpus' of preset 'flag':")
    assert problems[2] == (f"{path}:11: field 'gpus' of preset 'cpu-only': asks for 2 GPUs "
                           "but devices is [cpu]; fix: add gpu to devices, or remove gpus")


def test_route_needs_n_devices_that_each_hold_vram() -> None:
    assert route(preset(2), DeviceWish.AUTO, [24576, 24576]) == Route(GPU_LANE)
    assert route(preset(3), DeviceWish.AUTO, [24576, 24576]) == \
        Route(CPU_LANE, FallbackReason.NOT_ENOUGH_GPUS)
    # Two GPUs, but only one big enough for vram_mb: not enough of them.
    assert route(preset(2, vram_mb=20000), DeviceWish.AUTO, [24576, 16384]) == \
        Route(CPU_LANE, FallbackReason.NOT_ENOUGH_GPUS)
    assert route(preset(2, vram_mb=30000), DeviceWish.AUTO, [24576, 24576]) == \
        Route(CPU_LANE, FallbackReason.VRAM_EXCEEDS_LARGEST_GPU)
    assert route(preset(2), DeviceWish.AUTO, []) == Route(CPU_LANE, FallbackReason.NO_GPU)
    with pytest.raises(RequestError) as exc:
        route(preset(3, devices="gpu"), DeviceWish.AUTO, [24576, 24576])
    assert exc.value.code == "not_enough_gpus" and exc.value.field == "gpus"
    assert "gpus=3" in exc.value.message and exc.value.extra == {"gpus_here": 2}
    with pytest.raises(RequestError) as exc:
        route(preset(3), DeviceWish.GPU, [24576, 24576])
    assert exc.value.code == "not_enough_gpus"


# -- worker env and docker --------------------------------------------------------------------


def test_worker_env_names_every_gpu() -> None:
    device = DeviceAssignment.gpus([0, 1], ["GPU-0", "GPU-1"])
    env = worker_env(preset(), device, None)
    assert env["CUDA_VISIBLE_DEVICES"] == "0,1"
    assert env["GPU_DEVICE"] == "cuda:0" and env["GPULANE_DEVICE"] == "gpu:0,1"
    assert device.name == "gpu:0,1" and device.gpu_indexes == (0, 1)
    one = DeviceAssignment.gpus([3], ["GPU-3"])
    assert one == DeviceAssignment("gpu", 3, "GPU-3") and one.visible_devices == "3"
    assert DeviceAssignment("cpu").visible_devices == "" and DeviceAssignment("cpu").name == "cpu"


def test_docker_gets_every_gpu_quoted_and_renumbered() -> None:
    p = Preset(name="trainer", runtime="docker", image="img", gpus=2)
    spec = DockerLauncher().build(p, DeviceAssignment.gpus([1, 2], ["a", "b"]), "t-1")
    argv = spec.argv
    assert argv[argv.index("--gpus") + 1] == '"device=1,2"'  # docker splits on bare commas
    assert "CUDA_VISIBLE_DEVICES" in argv and "GPULANE_DEVICE" in argv  # -e KEY: from env
    assert spec.env["CUDA_VISIBLE_DEVICES"] == "0,1" and spec.env["GPULANE_DEVICE"] == "gpu:1,2"


# -- scheduler placement ----------------------------------------------------------------------


@dataclass
class FakeWorker:
    id: str
    device: DeviceAssignment
    idle: bool = True
    preset_name: str = "other"
    last_used: float = 0.0


@dataclass
class FakePipeline:
    """What the scheduler hooks into on the supervisor's pipeline (its on_freed and
    on_next_open notices); these tests never free or open a batch."""

    on_freed: Any = None
    on_next_open: Any = None


@dataclass
class FakeSupervisor:
    workers: dict[str, FakeWorker] = field(default_factory=dict)
    stopped: list[str] = field(default_factory=list)
    pipeline: FakePipeline = field(default_factory=FakePipeline)

    def next_worker_id(self, preset: Preset, device: DeviceAssignment) -> str:
        return f"{preset.name}-{device.name}"

    def session_workers(self, preset: str, lane: str) -> list[FakeWorker]:
        return [w for w in self.workers.values() if w.device.kind == lane]

    def worker(self, worker_id: str) -> FakeWorker | None:
        return self.workers.get(worker_id)

    def idle_gpu_workers(self, device: int | None) -> list[FakeWorker]:
        return [w for w in self.workers.values()
                if w.idle and (device is None or w.device.index == device)]

    def stop(self, worker_id: str) -> None:
        self.stopped.append(worker_id)


def scheduler(led: Ledger, sup: FakeSupervisor | None = None) -> Scheduler:
    return Scheduler(store=None, registry=None, ledger=led,  # type: ignore[arg-type]
                     supervisor=sup or FakeSupervisor(), node="test")  # type: ignore[arg-type]


async def test_reserve_takes_n_whole_empty_devices() -> None:
    led = ledger(4)
    assert led.acquire("slice-worker", 0, 1024)
    sched = scheduler(led)
    got = sched._reserve(preset(2, mode=Mode.ONEOFF), GPU_LANE)
    assert got is not None
    device, wid = got
    assert device.gpu_indexes == (1, 2) and device.uuids == ("GPU-1", "GPU-2")
    assert wid == "multi-gpu:1,2"
    assert {h.holder for h in led.holders(1)} == {wid} and led.holders(1)[0].whole
    assert led.fits(1) == [0, 3]  # the whole devices take nothing else
    assert sched._reserve(preset(2, name="other"), GPU_LANE) is None  # only gpu 3 is empty
    led.release(wid)  # the worker exited
    assert led.empty_devices() == [1, 2, 3]


async def test_reserve_keeps_off_devices_cleared_for_a_lease_and_small_ones() -> None:
    led = Ledger([snap(0), snap(1), snap(2, 8 * GIB), snap(3)], cpu_slots=1)
    sched = scheduler(led)
    sched.reserved = lambda: {0}
    got = sched._reserve(preset(2, vram_mb=16 * GIB), GPU_LANE)
    assert got is not None and got[0].gpu_indexes == (1, 3)


async def test_reserve_evicts_idle_session_workers_only_when_that_would_be_enough() -> None:
    led = ledger(2)
    sup = FakeSupervisor()
    sup.workers["idle"] = FakeWorker("idle", DeviceAssignment("gpu", 1, "GPU-1"))
    assert led.acquire("idle", 1, 4096)
    sched = scheduler(led, sup)
    assert sched._reserve(preset(2), GPU_LANE) is None
    assert sup.stopped == ["idle"]  # gpu 1 would then be empty, beside the empty gpu 0
    # A busy worker (or a lease) on the other device: evicting would not be enough.
    sup.stopped.clear()
    sup.workers["idle"].idle = False
    assert sched._reserve(preset(2), GPU_LANE) is None
    assert sup.stopped == []


async def test_worker_limits_and_replica_counts_for_whole_gpu_presets() -> None:
    sup = FakeSupervisor()
    sup.workers["w"] = FakeWorker("w", DeviceAssignment.gpus([0, 1], ["GPU-0", "GPU-1"]))
    sched = scheduler(ledger(5), sup)
    assert sched.queues.max_workers(preset(2), GPU_LANE) == 2
    assert sched.queues.max_workers(preset(2, replicas=3), CPU_LANE) == 3
    assert sched.queues.max_workers(preset(1, replicas=2), GPU_LANE) == 10
    assert [sched._count_on(preset(2), d) for d in range(3)] == [1, 1, 0]


# -- leases: choosing the devices to clear ----------------------------------------------------


def h(holder: str, device: int, priority: int = 10, kind: str = "lease") -> Holding:
    return Holding(holder, device, 1024, priority, True, kind)


def test_cheapest_set_counts_a_holder_that_spans_devices_once() -> None:
    # X (priority 10) holds devices 0 and 1 whole; Y (priority 5) holds device 2; 3 is empty.
    x0, x1, y = h("X", 0), h("X", 1), h("Y", 2, priority=5)
    plans = {0: [x0], 1: [x1], 2: [y]}
    devices, chosen = _cheapest(plans, 2)  # type: ignore[misc]
    assert devices == [0, 1] and [c.holder for c in chosen] == ["X"]  # (10, 1) beats (15, 2)
    devices, chosen = _cheapest({**plans, 3: []}, 2)  # type: ignore[misc]
    assert devices == [2, 3] and [c.holder for c in chosen] == ["Y"]
    devices, chosen = _cheapest({**plans, 3: []}, 1)  # type: ignore[misc]
    assert devices == [3] and chosen == []
    assert _cheapest(plans, 4) is None


def test_cheapest_prefers_fewer_holders_then_lower_indexes() -> None:
    plans = {0: [h("a", 0, 10), h("b", 0, 10)], 1: [h("c", 1, 20)], 2: [h("d", 2, 20)]}
    devices, _ = _cheapest(plans, 1)  # type: ignore[misc]
    assert devices == [1]  # sum 20 either way; one holder beats two, gpu 1 before gpu 2


def test_cheapest_stays_greedy_and_sane_on_a_huge_node() -> None:
    plans = {d: [h(f"w{d}", d, priority=d)] for d in range(64)}
    devices, chosen = _cheapest(plans, 32)  # type: ignore[misc]
    assert devices == list(range(32)) and len(chosen) == 32


# -- leases: an immediate request for N whole devices -----------------------------------------


class Rig:
    def __init__(self, n: int = 4) -> None:
        self.workers_preempted: list[tuple[str, float]] = []
        self.mgr = LeaseManager(ledger(n), on_change=lambda: None,
                                preempt_worker=lambda w, g: self.workers_preempted.append((w, g)))

    async def take(self, priority: int = 10, preemptible: bool = True, *, gpus: int = 0,
                   vram: int = 0, device: int | None = None, grace_s: float = 5.0) -> Lease:
        req = LeaseRequest("svc", vram, gpus, device, priority, 30.0, preemptible, grace_s)
        return await self.mgr.acquire(req, 0)

    def urgent(self, gpus: int, grace_s: float = 5.0) -> asyncio.Task[Lease]:
        req = LeaseRequest("urgent", 0, gpus, None, 100, 30.0, False, grace_s)
        return asyncio.create_task(self.mgr.acquire(req, 10))

    def state(self, lease: Lease) -> LeaseState:
        return self.mgr.leases[lease.id].state


async def test_immediate_gpus_2_pauses_the_cheapest_pair_and_resumes_them() -> None:
    rig = Rig(4)
    cheap = [await rig.take(10, vram=8 * GIB, device=d) for d in (0, 1)]
    dear = [await rig.take(50, vram=8 * GIB, device=d) for d in (2, 3)]
    task = rig.urgent(2)
    await asyncio.sleep(0)
    assert [rig.state(lz) for lz in cheap] == [LeaseState.PREEMPTING] * 2
    assert [rig.state(lz) for lz in dear] == [LeaseState.GRANTED] * 2
    assert rig.mgr.reserved_devices() == {0, 1}
    # Nothing else may take the devices being cleared, even where room is left.
    with pytest.raises(LeaseTimeout):
        await rig.take(70, vram=1024, device=0)
    rig.mgr.release(cheap[0].id, cheap[0].token)
    await asyncio.sleep(0)
    assert not task.done()  # one of two devices is clear: not yet
    rig.mgr.release(cheap[1].id, cheap[1].token)
    urgent = await task
    assert urgent.state is LeaseState.GRANTED and urgent.devices == [0, 1]
    assert urgent.paused == {cheap[0].id, cheap[1].id}
    rig.mgr.release(urgent.id, urgent.token)
    for lz in cheap:  # released holders are told they may come back
        assert [e["event"] for e in lz.events][-2:] == ["released", "resume"]
    assert rig.mgr.reserved_devices() == set()


async def test_a_holder_that_does_not_let_go_is_revoked_on_every_device() -> None:
    rig = Rig(2)
    both = await rig.take(10, gpus=2, grace_s=0.05)
    task = rig.urgent(2)
    await asyncio.sleep(0)
    assert rig.state(both) is LeaseState.PREEMPTING
    await asyncio.sleep(0.1)
    rig.mgr.expire_now()
    urgent = await task
    assert rig.state(both) is LeaseState.REVOKED and urgent.devices == [0, 1]


async def test_a_multi_gpu_worker_is_preempted_once() -> None:
    rig = Rig(3)
    assert rig.mgr.ledger.acquire_whole("trainer-w", [0, 1], priority=50)
    assert rig.mgr.ledger.acquire("other-w", 2, 20 * GIB, priority=80)
    task = rig.urgent(2, grace_s=1.5)
    await asyncio.sleep(0)
    assert rig.workers_preempted == [("trainer-w", 1.5)]  # devices 0 and 1 for one worker
    rig.mgr.ledger.release("trainer-w")  # the worker exited
    rig.mgr.grant()  # (the node's on-change does this)
    assert (await task).devices == [0, 1]


async def test_no_partial_preemption_when_n_devices_cannot_be_cleared() -> None:
    rig = Rig(3)
    a = await rig.take(10, vram=1024, device=0)
    await rig.take(10, preemptible=False, vram=1024, device=1)
    await rig.take(100, vram=1024, device=2)  # preemptible, but not of lower priority
    task = rig.urgent(2)
    await asyncio.sleep(0)
    assert rig.state(a) is LeaseState.GRANTED and rig.mgr.reserved_devices() == set()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_two_urgent_requests_do_not_clear_the_same_devices() -> None:
    rig = Rig(4)
    holders = [await rig.take(10, vram=1024, device=d) for d in range(4)]
    first, second = rig.urgent(2), rig.urgent(2)
    await asyncio.sleep(0)
    owners = rig.mgr._reserved
    assert sorted(owners) == [0, 1, 2, 3] and len(set(owners.values())) == 2
    for lz in holders:
        rig.mgr.release(lz.id, lz.token)
    assert sorted([*(await first).devices, *(await second).devices]) == [0, 1, 2, 3]


async def test_a_lease_paused_by_two_urgent_leases_resumes_after_both() -> None:
    rig = Rig(2)
    both = await rig.take(10, gpus=2, grace_s=30)
    one = rig.urgent(1)
    await asyncio.sleep(0)
    two = rig.urgent(1)
    await asyncio.sleep(0)
    assert rig.mgr.reserved_devices() == {0, 1}
    rig.mgr.release(both.id, both.token)
    a, b = await one, await two
    rig.mgr.release(a.id, a.token)
    assert [e["event"] for e in both.events].count("resume") == 0  # b still holds its part
    rig.mgr.release(b.id, b.token)
    assert [e["event"] for e in both.events].count("resume") == 1


def _lease_request(mgr: LeaseManager, body: dict[str, Any]) -> LeaseRequest:
    """The API's way in: the request model checks each field, the manager what the node has."""
    try:
        lz = LeaseBody.model_validate(body)
        req = LeaseRequest(lz.holder, lz.vram_mib(), lz.gpus, lz.device, int(lz.priority),
                           float(lz.ttl_s), lz.preemptible, float(lz.grace_s))
    except PydanticValidationError as exc:
        raise request_error(exc.errors(), LeaseBody) from None
    mgr.check(req)
    return req


def test_device_and_gpus_together_are_refused() -> None:
    mgr = Rig(2).mgr
    with pytest.raises(ValidationError) as exc:
        _lease_request(mgr, {"holder": "x", "gpus": 2, "device": 0})
    assert exc.value.field == "device"
    req = _lease_request(mgr, {"holder": "x", "gpus": 1, "device": 1})
    assert req.gpus == 1 and req.device == 1
    with pytest.raises(RequestError) as too_many:
        _lease_request(mgr, {"holder": "x", "gpus": 3})
    assert too_many.value.status == 400 and too_many.value.code == "not_enough_gpus"
    assert too_many.value.extra == {"gpus_here": 2} and "at most 2" in too_many.value.message
    with pytest.raises(ValidationError):
        _lease_request(mgr, {"holder": "x", "gpus": 65})
