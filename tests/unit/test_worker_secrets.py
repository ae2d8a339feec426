"""A worker runs the model's code, not the node's: none of the node's settings reach its
environment, least of all its secrets (API keys in clear in GPULANE_KEYS, the old token, a
store URL that may carry a password). What the worker needs (GPULANE_TASK_ID and the like)
still does."""

from __future__ import annotations

import pytest

from gpulane.presets import Preset, Runtime
from gpulane.runtime.launchers import DeviceAssignment, DockerLauncher, ProcessLauncher

SECRETS = {"GPULANE_KEYS": "ci:s3cret-admin-key:admin", "GPULANE_TOKEN": "old-token",
           "GPULANE_KEYS_FILE": "/etc/gpulane/keys.yaml",
           "GPULANE_STORE": "redis://:hunter2@db:6379/0"}


@pytest.fixture(autouse=True)
def node_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in SECRETS.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("HOME_GROWN_VAR", "kept")


def test_a_process_worker_inherits_the_nodes_environment_but_not_its_settings() -> None:
    spec = ProcessLauncher().build(Preset(name="p", argv=("python", "w.py")),
                                   DeviceAssignment("cpu"), "p-cpu-1", {"GPULANE_TASK_ID": "t1"})
    leaked = {k for k in SECRETS if k in spec.env}
    assert not leaked, f"the worker sees the node's {sorted(leaked)}"
    assert spec.env["HOME_GROWN_VAR"] == "kept"
    assert spec.env["GPULANE_TASK_ID"] == "t1" and spec.env["GPULANE_PRESET"] == "p"


def test_neither_the_container_nor_its_docker_client_get_the_nodes_settings() -> None:
    preset = Preset(name="d", runtime=Runtime.DOCKER, image="example/w:1", command=("w",))
    spec = DockerLauncher().build(preset, DeviceAssignment("cpu"), "d-cpu-1")
    assert not {k for k in SECRETS if k in spec.env}
    assert not [a for a in spec.argv if any(v in a for v in SECRETS.values())]
