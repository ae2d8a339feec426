"""Lost GPUs where routing reads capacity: the ledger's all_lost, the fleet view's GPU totals
(another node's lost GPUs attract no work) and route()'s device_lost at submit."""

from __future__ import annotations

from typing import Any

import pytest

from gpulane.devices import DeviceSnapshot
from gpulane.fleet import NodeInfo
from gpulane.model import DeviceWish, FallbackReason
from gpulane.presets import Preset
from gpulane.scheduling.fleet_view import FleetView
from gpulane.scheduling.ledger import Ledger
from gpulane.scheduling.router import CPU_LANE, GPU_LANE, Route, route

AUTO, GPU = DeviceWish.AUTO, DeviceWish.GPU


def snap(index: int, health: str = "ok") -> DeviceSnapshot:
    return DeviceSnapshot(index=index, uuid=f"GPU-{index}", name="t", total_vram_mb=24576,
                          used_vram_mb=None, free_vram_mb=None, utilization_pct=None,
                          memory_utilization_pct=None, temperature_c=None, power_w=None,
                          health=health)


def preset(**extra: Any) -> Preset:
    return Preset.model_validate({"name": "p", "argv": ["python", "w.py"],
                                  "devices": "gpu,cpu", "vram_mb": 8000, **extra})


def test_all_lost_needs_every_gpu_lost() -> None:
    ledger = Ledger([snap(0), snap(1)], cpu_slots=2)
    assert not ledger.all_lost
    ledger.observe([snap(0, "lost")])
    assert not ledger.all_lost  # gpu 1 still runs work
    ledger.observe([snap(1, "lost")])
    assert ledger.all_lost
    ledger.observe([snap(0)])
    assert not ledger.all_lost
    assert not Ledger([], cpu_slots=2).all_lost  # a node without GPUs lost none


def test_the_fleet_view_leaves_lost_gpus_and_all_lost_nodes_out() -> None:
    view = FleetView(None, "me")

    def node(name: str, *healths: str, draining: bool = False) -> NodeInfo:
        return NodeInfo(name=name, url=None, started_at=0.0, heartbeat_at=0.0,
                        draining=draining,
                        devices=[snap(i, h).to_json() for i, h in enumerate(healths)])
    view.others = [node("a", "ok", "lost"), node("b", "lost"), node("c"),
                   node("d", "ok", draining=True)]
    assert view.gpu_totals() == [[24576]]
    view.others = [node("b", "lost", "lost")]
    assert view.gpu_totals() == [] and not any(view.gpu_totals())


def test_every_gpu_lost_sends_auto_tasks_to_the_cpu_at_submit() -> None:
    totals = [24576, 24576]
    assert route(preset(), AUTO, totals, devices_lost=True) == \
        Route(CPU_LANE, FallbackReason.DEVICE_LOST)
    assert route(preset(), AUTO, totals, devices_lost=False) == Route(GPU_LANE)


@pytest.mark.parametrize("fallback", [["no_gpu", "oom"], False])
def test_lost_gpus_keep_strict_tasks_and_policies_without_error_waiting(
        fallback: object) -> None:
    totals = [24576]
    assert route(preset(), GPU, totals, devices_lost=True) == Route(GPU_LANE)
    assert route(preset(fallback=fallback), AUTO, totals, devices_lost=True) == Route(GPU_LANE)
