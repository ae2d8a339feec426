"""The start-failure circuit: opens after a run of failures, probes once, backs off."""

from __future__ import annotations

from gpulane.runtime.circuit import PresetCircuit


def test_opens_after_the_threshold_probes_once_after_the_cooldown_and_backs_off() -> None:
    c = PresetCircuit(threshold=3, cooldown_s=10, max_cooldown_s=25)
    assert not c.failed("one", now=0) and not c.failed("two", now=0)
    assert c.allows_start(now=0)
    assert c.failed("three", now=0)  # opens
    assert c.to_json(now=1)["state"] == "open" and not c.allows_start(now=9.9)
    assert c.allows_start(now=10)
    c.starting()  # the probe
    assert not c.allows_start(now=11) and c.to_json(now=11)["state"] == "half_open"
    assert c.failed("four", now=20)  # the probe failed: twice the cooldown
    assert not c.allows_start(now=39) and c.allows_start(now=40)
    c.starting()
    assert c.failed("five", now=40)  # capped at max_cooldown_s
    assert c.open_until == 65 and c.last_error == "five"
    c.starting()
    c.started()
    assert c.to_json(now=70) == {"state": "closed", "start_failures": 0, "retry_in_s": None,
                                 "last_error": "five"}
    assert c.allows_start(now=70)


def test_a_success_between_failures_resets_the_run() -> None:
    c = PresetCircuit(threshold=2)
    c.failed("x", now=0)
    c.started()
    assert not c.failed("y", now=0) and c.allows_start(now=0)
