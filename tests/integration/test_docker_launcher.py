"""The docker launcher, through a stand-in ``docker`` executable first on PATH.

No Docker engine runs here, so the stand-in checks the arguments gpulane builds and then runs
the container's command locally, mapping the image's /app to the test workers folder. Its
``ps`` answers the container ids listed in a file beside its log, and its ``kill`` logs them.
Containers are hardened (their GPUs only, not root, no capabilities, no privilege gain) and
labelled, and a node that starts kills those its dead predecessor left.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import stat
import sys
from pathlib import Path

import httpx
import pytest

from gpulane.presets import Preset
from gpulane.runtime import launchers
from gpulane.runtime.containers import kill_leftovers
from gpulane.runtime.launchers import DeviceAssignment, DockerLauncher
from gpulane.runtime.supervisor import Supervisor
from tests.integration.conftest import submit, wait_done
from tests.unit.test_pipeline import Listener

WORKERS = Path(__file__).parent / "workers"

FAKE_DOCKER = """#!{python}
import json, os, sys
args = sys.argv[1:]
with open({log!r}, "a") as fh:
    fh.write(json.dumps(args) + "\\n")
if args[0] == "ps":
    running = {log!r} + ".running"
    print(open(running).read() if os.path.exists(running) else "", end="")
    sys.exit(0)
if args[0] == "kill":
    sys.exit(0)
assert args[:4] == ["run", "--rm", "-i", "--name"], args
i, env = 5, {{}}
while args[i].startswith("-"):
    flag, value = args[i], args[i + 1]
    if flag == "-e":  # KEY=VALUE, or KEY alone: taken from this client's environment
        k, eq, v = value.partition("=")
        env[k] = v if eq else os.environ[k]
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
    passed = [a for a, flag in zip(argv[1:], argv, strict=False) if flag == "-e"]
    assert all("=" not in a for a in passed)  # no value on the command line (ps shows it)
    envs = {k: spec.env[k] for k in passed}  # docker copies them from its own environment
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


def _flag(argv: list[str], flag: str) -> list[str]:
    """Every value given to ``flag``."""
    return [value for name, value in itertools.pairwise(argv) if name == flag]


def test_a_container_is_hardened_and_labelled() -> None:
    preset = Preset(name="w", runtime="docker", image="img")
    argv = DockerLauncher().build(preset, DeviceAssignment("gpu", 3, "GPU-x"), "w-gpu3-1",
                                  labels={"gpulane.node": "box", "gpulane.data_dir": "/d"}).argv
    assert _flag(argv, "--gpus") == ["device=3"]
    assert _flag(argv, "--cap-drop") == ["ALL"]
    assert _flag(argv, "--security-opt") == ["no-new-privileges"]
    assert sorted(_flag(argv, "--label")) == ["gpulane.data_dir=/d", "gpulane.node=box",
                                              "gpulane.worker=w-gpu3-1"]
    [user] = _flag(argv, "--user")
    assert user == (f"{os.getuid()}:{os.getgid()}" if os.getuid() else "65534:65534")
    assert argv.index("img") > max(argv.index(f) for f in ("--user", "--cap-drop", "--label"))


def test_several_gpus_are_named_never_all() -> None:
    preset = Preset(name="w", runtime="docker", image="img", gpus=2)
    argv = DockerLauncher().build(preset, DeviceAssignment.gpus([1, 2], ["a", "b"]),
                                  "w-gpu12-1").argv
    assert _flag(argv, "--gpus") == ['"device=1,2"'] and "all" not in " ".join(argv)


def test_a_root_node_runs_containers_as_nobody_unless_the_preset_names_a_user(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(launchers.os, "getuid", lambda: 0)
    plain = Preset(name="w", runtime="docker", image="img")
    named = Preset(name="w", runtime="docker", image="img", user="1000:1000")
    cpu = DeviceAssignment("cpu")
    assert _flag(DockerLauncher().build(plain, cpu, "w-1").argv, "--user") == ["65534:65534"]
    assert _flag(DockerLauncher().build(named, cpu, "w-1").argv, "--user") == ["1000:1000"]


def test_a_preset_user_that_looks_like_a_flag_is_refused() -> None:
    with pytest.raises(ValueError, match="user"):
        Preset(name="w", runtime="docker", image="img", user="--privileged")


async def test_a_starting_node_kills_the_containers_its_dead_predecessor_left(
        fake_docker: Path, tmp_path: Path) -> None:
    Path(f"{fake_docker}.running").write_text("c0ffee\nbeef42\n")
    sup = Supervisor(object(), "box",  # type: ignore[arg-type]
                     scratch_dir=str(tmp_path / "data" / "scratch"), stderr_tail_lines=5,
                     shutdown_grace_s=1.0, listener=Listener())
    sup.start_reaper()
    try:
        assert sup._leftovers is not None
        assert await sup._leftovers == ["c0ffee", "beef42"]
    finally:
        await sup.stop_all()
    ps, kill = [json.loads(line) for line in fake_docker.read_text().splitlines()]
    assert ps[:2] == ["ps", "-q"]
    assert sorted(_flag(ps, "--filter")) == [f"label=gpulane.data_dir={tmp_path / 'data'}",
                                             "label=gpulane.node=box"]
    assert kill == ["kill", "c0ffee", "beef42"]


async def test_without_docker_the_cleanup_is_skipped_quietly(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no docker here
    caplog.set_level(logging.DEBUG)
    assert await kill_leftovers({"gpulane.node": "box"}) == []
    assert caplog.records == []


async def test_a_failing_docker_is_logged_and_the_node_runs_on(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    docker = tmp_path / "docker"
    docker.write_text("#!/bin/sh\necho 'Cannot connect to the Docker daemon' >&2\nexit 1\n")
    docker.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    caplog.set_level(logging.INFO, "gpulane.supervisor")
    assert await kill_leftovers({"gpulane.node": "box"}) == []
    assert "Cannot connect to the Docker daemon" in caplog.text


async def test_a_hanging_docker_is_killed_and_reaped_when_the_node_stops(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pidfile = tmp_path / "docker.pid"
    docker = tmp_path / "docker"
    docker.write_text(f"#!/bin/sh\necho $$ > {pidfile}\nexec sleep 3600\n")
    docker.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    sup = Supervisor(object(), "box",  # type: ignore[arg-type]
                     scratch_dir=str(tmp_path / "data" / "scratch"), stderr_tail_lines=5,
                     shutdown_grace_s=1.0, listener=Listener())
    sup.start_reaper()
    deadline = asyncio.get_running_loop().time() + 20
    while not pidfile.exists() or not pidfile.read_text().strip():
        assert asyncio.get_running_loop().time() < deadline, "docker ps never ran"
        await asyncio.sleep(0.01)
    pid = int(pidfile.read_text())
    await sup.stop_all()  # cancels the cleanup mid-call
    assert not Path(f"/proc/{pid}").exists()  # killed and reaped, not left behind


def test_docker_values_travel_in_the_clients_environment_not_its_argv() -> None:
    preset = Preset(name="w", runtime="docker", image="img", env={"HF_TOKEN": "hf_secret"})
    spec = DockerLauncher().build(preset, DeviceAssignment("cpu"), "w-cpu-1",
                                  {"GPULANE_INPUT_FILE": "/data/scratch/t1.input.json"})
    assert not [a for a in spec.argv if "hf_secret" in a]  # ps would show it to anyone
    assert spec.argv[spec.argv.index("HF_TOKEN") - 1] == "-e"
    assert spec.env["HF_TOKEN"] == "hf_secret"
    # A large one-off input: the file is mounted read-only where the variable points inside.
    assert "/data/scratch/t1.input.json:/gpulane/input.json:ro" in spec.argv
    assert spec.env["GPULANE_INPUT_FILE"] == "/gpulane/input.json"
