"""The capacity ledger: VRAM per GPU (declared and measured) and CPU slots."""

from __future__ import annotations

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from gpulane.devices import DeviceSnapshot, SimulatedGpu, SimulatedProvider
from gpulane.scheduling.ledger import Ledger


def snap(index: int, total: int, free: int | None = None) -> DeviceSnapshot:
    return DeviceSnapshot(index=index, uuid=f"GPU-{index}", name="test", total_vram_mb=total,
                          used_vram_mb=None if free is None else total - free,
                          free_vram_mb=free, utilization_pct=None,
                          memory_utilization_pct=None, temperature_c=None, power_w=None)


def ledger(*totals: int, cpu_slots: int = 2) -> Ledger:
    return Ledger([snap(i, t) for i, t in enumerate(totals)], cpu_slots=cpu_slots)


# -- fits and acquire -------------------------------------------------------------------------


def test_fits_orders_fullest_first() -> None:
    led = ledger(24000, 16000, 80000)
    assert led.fits(1000) == [1, 0, 2]
    assert led.fits(20000) == [0, 2]
    assert led.fits(80000) == [2]
    assert led.fits(80001) == []
    assert led.acquire("w1", 2, 70000)  # 10000 left on gpu 2: now the fullest
    assert led.fits(1000) == [2, 1, 0]
    assert led.fits(12000) == [1, 0]


def test_fits_breaks_ties_by_index() -> None:
    led = ledger(8000, 8000, 8000)
    assert led.fits(100) == [0, 1, 2]
    assert led.acquire("a", 1, 100)
    assert led.fits(100) == [1, 0, 2]


def test_acquire_refuses_more_than_is_free() -> None:
    led = ledger(10000)
    assert led.acquire("a", 0, 6000)
    assert not led.acquire("b", 0, 4001)
    assert led.gpus[0].declared_mb == 6000 and led.gpus[0].free_mb == 4000
    assert led.acquire("b", 0, 4000)  # exactly what is left
    assert led.gpus[0].free_mb == 0
    assert led.fits(1) == []
    assert not led.acquire("c", 0, 1)
    assert led.acquire("d", 0, 0)  # a CPU-sized holder still fits


def test_acquire_is_idempotent_per_holder() -> None:
    led = ledger(10000)
    assert led.acquire("a", 0, 6000)
    assert led.acquire("a", 0, 6000)  # a retry does not count twice
    assert led.gpus[0].declared_mb == 6000


def test_release_frees_the_room_and_ignores_unknown_holders() -> None:
    led = ledger(10000, 10000)
    assert led.acquire("a", 0, 7000)
    assert led.acquire("b", 1, 2000)
    led.release("a")
    led.release("a")
    led.release("nobody")
    assert led.gpus[0].free_mb == 10000 and led.gpus[1].free_mb == 8000
    assert led.acquire("c", 0, 10000)


def test_gpu_totals() -> None:
    assert ledger(24576, 16384).gpu_totals_mb() == [24576, 16384]
    assert ledger().gpu_totals_mb() == []
    assert ledger().fits(0) == []


# -- measured free VRAM -----------------------------------------------------------------------


def test_measured_free_below_declared_free_is_respected() -> None:
    led = ledger(24000, 24000)
    led.observe([snap(0, 24000, free=5000)])  # something outside gpulane holds 19000
    assert led.gpus[0].free_mb == 5000
    assert led.fits(6000) == [1]
    assert led.fits(1000) == [0, 1]
    assert not led.acquire("w", 0, 6000)
    assert led.acquire("w", 0, 5000)


def test_measured_free_above_declared_free_does_not_add_room() -> None:
    led = ledger(24000)
    assert led.acquire("w", 0, 20000)
    led.observe([snap(0, 24000, free=24000)])  # the worker has not loaded yet
    assert led.gpus[0].free_mb == 4000
    assert not led.acquire("x", 0, 5000)


def test_measured_free_na_or_negative_room_and_unknown_gpus() -> None:
    led = ledger(24000)
    led.observe([snap(0, 24000, free=1000)])
    led.observe([snap(0, 24000, free=None)])  # N/A: back to the declared view
    assert led.gpus[0].free_mb == 24000
    assert led.acquire("w", 0, 10000)
    led.observe([snap(0, 24000, free=0), snap(7, 1000, free=1000)])  # gpu 7 is not ours
    assert led.gpus[0].free_mb == 0 and 7 not in led.gpus
    assert led.fits(1) == []


def test_initial_snapshot_counts_as_measured() -> None:
    led = Ledger([snap(0, 24000, free=3000)], cpu_slots=1)
    assert led.gpus[0].free_mb == 3000


def test_simulated_external_use_reaches_the_ledger() -> None:
    sim = SimulatedProvider([SimulatedGpu(0, 24576), SimulatedGpu(1, 24576)])
    led = Ledger(sim.snapshot(), cpu_slots=1)
    sim.set_external_use(0, 20480)
    led.observe(sim.snapshot())
    assert led.fits(8192) == [1]
    assert led.fits(2048) == [0, 1]


# -- CPU slots --------------------------------------------------------------------------------


def test_cpu_slots() -> None:
    led = ledger(cpu_slots=2)
    assert led.acquire_cpu() and led.acquire_cpu()
    assert not led.acquire_cpu()
    assert led.cpu_used == 2
    led.release_cpu()
    assert led.acquire_cpu()
    for _ in range(5):
        led.release_cpu()
    assert led.cpu_used == 0  # an extra release never makes room that is not there
    assert led.acquire_cpu() and led.acquire_cpu() and not led.acquire_cpu()


# -- never over-committed, whatever the order of calls ----------------------------------------

TOTALS = (24576, 16384, 8192)
HOLDERS = st.sampled_from([f"h{i}" for i in range(6)])
DEVICES = st.integers(0, len(TOTALS) - 1)


class LedgerMachine(RuleBasedStateMachine):
    """Random acquire/release/observe/cpu sequences against a simple model."""

    def __init__(self) -> None:
        super().__init__()
        self.ledger = Ledger([snap(i, t) for i, t in enumerate(TOTALS)], cpu_slots=3)
        self.held: dict[tuple[str, int], int] = {}  # (holder, device) -> MB
        self.cpu = 0

    @rule(holder=HOLDERS, device=DEVICES, vram=st.integers(0, 30000))
    def acquire(self, holder: str, device: int, vram: int) -> None:
        acct = self.ledger.gpus[device]
        free_before, already = acct.free_mb, (holder, device) in self.held
        ok = self.ledger.acquire(holder, device, vram)
        if already:
            assert ok
        else:
            assert ok == (vram <= free_before)
            if ok:
                self.held[holder, device] = vram

    @rule(holder=HOLDERS)
    def release(self, holder: str) -> None:
        self.ledger.release(holder)
        self.held = {k: v for k, v in self.held.items() if k[0] != holder}

    @rule(device=DEVICES, data=st.data())
    def observe(self, device: int, data: st.DataObject) -> None:
        free = data.draw(st.none() | st.integers(0, TOTALS[device]))
        self.ledger.observe([snap(device, TOTALS[device], free)])

    @rule(vram=st.integers(0, 30000))
    def fits(self, vram: int) -> None:
        got = self.ledger.fits(vram)
        accts = self.ledger.gpus
        assert sorted(got) == sorted(i for i, a in accts.items() if a.free_mb >= vram)
        frees = [accts[i].free_mb for i in got]
        assert frees == sorted(frees)  # fullest first

    @rule(take=st.booleans())
    def cpu(self, take: bool) -> None:
        if take:
            assert self.ledger.acquire_cpu() == (self.cpu < 3)
            self.cpu = min(self.cpu + 1, 3)
        else:
            self.ledger.release_cpu()
            self.cpu = max(self.cpu - 1, 0)

    @invariant()
    def never_over_committed(self) -> None:
        for i, acct in self.ledger.gpus.items():
            mine = {h.holder: h.vram_mb for h in acct.holdings.values()}
            assert mine == {h: mb for (h, d), mb in self.held.items() if d == i}
            assert acct.declared_mb == sum(mine.values()) <= acct.total_vram_mb
            assert 0 <= acct.free_mb <= acct.total_vram_mb - acct.declared_mb
            if acct.measured_free_mb is not None:
                assert acct.free_mb <= acct.measured_free_mb
        assert 0 <= self.ledger.cpu_used == self.cpu <= self.ledger.cpu_slots


LedgerMachine.TestCase.settings = settings(
    max_examples=30, stateful_step_count=25, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])
test_ledger_is_never_over_committed = LedgerMachine.TestCase
