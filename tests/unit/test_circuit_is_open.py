"""PresetCircuit.is_open(): open only while cooling down (the router sends auto tasks of a
preset whose GPU circuit is open to the CPU, and back once it is half-open)."""

from __future__ import annotations

from gpulane.runtime.circuit import PresetCircuit


def test_open_only_during_the_cooldown() -> None:
    c = PresetCircuit(threshold=2, cooldown_s=10.0)
    assert not c.is_open(now=0.0)
    c.failed("boom", now=0.0)
    assert not c.is_open(now=0.0)  # below the threshold: closed
    c.failed("boom", now=0.0)
    assert c.is_open(now=5.0) and c.to_json(now=5.0)["state"] == "open"
    assert not c.is_open(now=10.0)  # the cooldown is over: half-open
    assert c.to_json(now=10.0)["state"] == "half_open"


def test_a_probe_under_way_is_half_open_and_a_start_closes_it() -> None:
    c = PresetCircuit(threshold=1, cooldown_s=10.0)
    c.failed("boom", now=0.0)
    c.starting()
    assert not c.is_open(now=1.0)
    c.started()
    assert not c.is_open(now=1.0)
