"""The status view's VRAM by holder (scheduling/status.py), which the dashboard draws as a bar:
declared VRAM by kind of holder, and outside use as the driver reports it beyond the
declarations (a simulated GPU reports only outside use)."""

from __future__ import annotations

from gpulane.devices import DeviceSnapshot
from gpulane.scheduling.ledger import Ledger
from gpulane.scheduling.status import gpus_status, held_by_kind, outside_use_mb


def reading(used_mb: int | None, *, simulated: bool = False) -> DeviceSnapshot:
    return DeviceSnapshot(index=0, uuid="GPU-0", name="test", total_vram_mb=24000,
                          used_vram_mb=used_mb,
                          free_vram_mb=None if used_mb is None else 24000 - used_mb,
                          utilization_pct=None, memory_utilization_pct=None,
                          temperature_c=None, power_w=None, simulated=simulated)


def test_declared_vram_is_split_by_kind_of_holder() -> None:
    ledger = Ledger([reading(0)], cpu_slots=1)
    assert ledger.acquire("w1", 0, 3000) and ledger.acquire("w2", 0, 1000)
    assert ledger.acquire("lease-1", 0, 8000, kind="lease")
    assert held_by_kind(ledger.gpus[0]) == {"worker": 4000, "lease": 8000, "clearing": 0}
    assert held_by_kind(None) == {"worker": 0, "lease": 0, "clearing": 0}


def test_outside_use_is_what_the_driver_sees_beyond_the_declarations() -> None:
    ledger = Ledger([reading(0)], cpu_slots=1)
    assert ledger.acquire("w1", 0, 4000)
    acct = ledger.gpus[0]
    assert outside_use_mb(reading(10000), acct) == 6000  # NVML counts the worker's too
    assert outside_use_mb(reading(3000), acct) == 0  # a worker still loading: not negative
    assert outside_use_mb(reading(None), acct) is None  # N/A stays N/A
    # A simulated GPU reports only the use it pretends others make.
    assert outside_use_mb(reading(2000, simulated=True), acct) == 2000


def test_the_status_devices_carry_the_split() -> None:
    snap = reading(5000)
    ledger = Ledger([snap], cpu_slots=1)
    assert ledger.acquire("lease-1", 0, 2000, kind="lease")
    (gpu,) = gpus_status([snap], ledger, [])
    assert gpu["held_vram_mb"] == {"worker": 0, "lease": 2000, "clearing": 0}
    assert gpu["outside_vram_mb"] == 3000
