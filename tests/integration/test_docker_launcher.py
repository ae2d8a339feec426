"""The docker launcher, through a stand-in ``docker`` executable first on PATH.

No Docker engine runs here, so the stand-in checks the arguments gpulane builds and then runs
the container's command locally, mapping the image's /app to the test workers folder.
"""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

import httpx
import pytest

from gpulane.presets import Preset
from gpulane.runtime.launchers import DeviceAssignment, DockerLauncher
from tests.integration.conftest import submit, wait_done

WORKERS = Path(__file__).parent / "workers"

FAKE_DOCKER = """#!{python}
import json, os, sys
args = sys.argv[1:]
with open({log!r}, "a") as fh:
    fh.write(json.dumps(args) + "\\n")
assert args[:4] == ["run", "--rm", "-i", "--name"], args
i, env = 5, {{}}
while args[i].startswith("-"):
    flag, value = args[i], args[i + 1]
    if flag == "-e":
        k, _, v = value.partition("=")
        env[k] = v
    i += 2
image, cmd = args[i], args[i + 1:]
cmd = [c.replace("/app/", {workers!r} + "/") for c in cmd]
if cmd and cmd[0] == "python":
    cmd[0] = sys.executable
os.execve(cmd[0], cmd, {{**os.environ, **env}})
"""


@pytest.fixture
def fake_docker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    log = tmp_path / "docker-calls.jsonl"
    script = bindir / "docker"
    script.write_text(FAKE_DOCKER.format(python=sys.executable, log=str(log),
                                         workers=str(WORKERS)))
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    return log


def test_docker_argv_shape() -> None:
    preset = Preset(name="whisper", runtime="docker", image="org/whisper:1",
                    command=("python", "serve.py"), model_path="/srv/models/whisper",
                    env={"HF_HOME": "/cache"})
    spec = DockerLauncher().build(preset, DeviceAssignment("gpu", 1, "GPU-x"), "whisper-gpu1-7")
    argv = spec.argv
    assert argv[:6] == ["docker", "run", "--rm", "-i", "--name", "gpulane-whisper-gpu1-7"]
    assert argv[argv.index("--gpus") + 1] == "device=1"
    assert argv[argv.index("-v") + 1] == "/srv/models/whisper:/models"
    envs = dict(a.split("=", 1) for a, flag in zip(argv[1:], argv, strict=False) if flag == "-e")
    assert envs["MODEL_PATH"] == "/models" and envs["MODEL_NAME"] == "whisper"
    assert envs["CUDA_VISIBLE_DEVICES"] == "0" and envs["HF_HOME"] == "/cache"
    assert argv[-3:] == ["org/whisper:1", "python", "serve.py"]


def test_docker_on_cpu_has_no_gpus_flag() -> None:
    preset = Preset(name="w", runtime="docker", image="img")
    argv = DockerLauncher().build(preset, DeviceAssignment("cpu"), "w-cpu-1").argv
    assert "--gpus" not in argv and "-v" not in argv and argv[-1] == "img"


async def test_docker_preset_runs_through_the_service(api: httpx.AsyncClient,
                                                      fake_docker: Path) -> None:
    done = await wait_done(api, (await submit(api, "docker-behave", {"action": "env"}))["id"])
    assert done["state"] == "succeeded", done
    env = done["output"]
    assert env["MODEL_PATH"] == "/models" and env["EXTRA"] == "in-container"
    assert env["CUDA_VISIBLE_DEVICES"] == "0"
    calls = [json.loads(line) for line in fake_docker.read_text().splitlines()]
    gpu = done["placement"]["device"].split(":")[1]
    assert calls[0][calls[0].index("--gpus") + 1] == f"device={gpu}"
    assert "/srv/models/behave:/models" in calls[0]
