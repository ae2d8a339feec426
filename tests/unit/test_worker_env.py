"""The environment the node gives a worker, by device kind."""

from __future__ import annotations

import pytest

from gpulane.presets import Preset
from gpulane.runtime.launchers import DeviceAssignment, worker_env

CPU = DeviceAssignment("cpu")


def preset(**env: str) -> Preset:
    return Preset(name="p", argv=("python", "w.py"), env=env)


def test_cpu_workers_sleep_wait_in_openmp_so_they_leave_shared_cores_alone(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    assert worker_env(preset(), CPU, None)["OMP_WAIT_POLICY"] == "PASSIVE"
    simulated = DeviceAssignment.gpus([0], ["GPU-0"], simulated=True)
    assert worker_env(preset(), simulated, None)["OMP_WAIT_POLICY"] == "PASSIVE"
    real_gpu = DeviceAssignment.gpus([0], ["GPU-0"])
    assert "OMP_WAIT_POLICY" not in worker_env(preset(), real_gpu, None)


def test_the_preset_or_the_nodes_own_environment_choose_the_wait_policy(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    assert worker_env(preset(OMP_WAIT_POLICY="ACTIVE"), CPU, None)["OMP_WAIT_POLICY"] == "ACTIVE"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    # Not set here: the worker inherits the node's own value (ProcessLauncher merges it).
    assert "OMP_WAIT_POLICY" not in worker_env(preset(), CPU, None)
