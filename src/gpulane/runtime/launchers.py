"""How a worker process is started: a plain process or a docker container.

Launchers differ only in how they turn (preset, device, env) into an argv; everything after
the spawn (protocol, health, restarts) is the same, so each variant overrides one method.
Workers are always started from an argv list, never through a shell.

A container gets only what its worker needs: the GPUs it was placed on (``--gpus device=N``,
never all; an AMD GPU: ``/dev/kfd`` and ``/dev/dri`` with ROCR_VISIBLE_DEVICES naming it, see
AMD_DEVICES), a user that is not root (the preset's ``user``, else the node's uid:gid, else
nobody when the node runs as root), no capabilities and no privilege gain, and the folders its
tasks may name files in (the allowed roots and uploads, ENV_ALLOWED_ROOTS) read-only at the
same paths, so the resolved paths a task carries open inside as they are. It carries labels
naming its node, the node's data dir and its worker, by which a restarted node finds and kills
what its dead predecessor left running (runtime/containers.py).
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass

from gpulane.config import Settings
from gpulane.devices import gpu_vendor
from gpulane.presets import Preset, Runtime
from gpulane.protocol import ENV_ALLOWED_ROOTS

CONTAINER_MODEL_PATH = "/models"
"""Where a docker worker sees its preset's model_path."""
CONTAINER_INPUT_FILE = "/gpulane/input.json"
"""Where a docker one-off sees its input file, when its input is too large for the env."""
NOBODY = "65534:65534"
"""The user a container runs as when the node runs as root and the preset names none."""
LABEL_NODE = "gpulane.node"
"""Container label: the name of the node that started it."""
LABEL_DATA_DIR = "gpulane.data_dir"
"""Container label: that node's data dir (one node holds it at a time: see locks.py)."""
LABEL_WORKER = "gpulane.worker"
"""Container label: the worker id it runs."""
AMD_DEVICES = ("/dev/kfd", "/dev/dri")
"""What a container on an AMD GPU is given (AMD's ROCm docker guide): the compute driver and
the render nodes. Docker cannot pass one AMD GPU by index as ``--gpus`` does for NVIDIA, so
every render node is there and ROCR_VISIBLE_DEVICES picks the placed GPUs: a worker could open
the others on purpose, which an NVIDIA container cannot. Named render nodes would close that,
at the cost of the DRM minor of each GPU, which the device snapshot does not carry."""
AMD_GROUPS = ("video",)
"""Groups a container on an AMD GPU joins by name (AMD's guide: ``--group-add video``); the
host groups that own the device files are added by number (``device_groups``)."""
HIDDEN_HIP_DEVICES = "-1"
"""HIP_VISIBLE_DEVICES of a CPU worker: an invalid ordinal, after which HIP ignores every
device, so a CPU worker on an AMD node cannot reach its GPUs (as CUDA_VISIBLE_DEVICES="")."""


@dataclass(frozen=True, slots=True)
class DeviceAssignment:
    """The device a worker runs on: one GPU (index and uuid), several whole GPUs, or the CPU.

    ``index`` and ``uuid`` are the first (or only) GPU's; ``indexes`` and ``uuids`` list all of
    them when a preset asks for ``gpus: N`` (empty for a single GPU).
    """

    kind: str  # "gpu" or "cpu"
    index: int | None = None
    uuid: str | None = None
    simulated: bool = False  # a simulated GPU: the worker really computes on the CPU
    indexes: tuple[int, ...] = ()
    uuids: tuple[str, ...] = ()

    @classmethod
    def gpus(cls, indexes: list[int], uuids: list[str],
             simulated: bool = False) -> DeviceAssignment:
        """Several whole GPUs for one worker (one GPU gives the plain single-GPU form)."""
        if len(indexes) == 1:
            return cls("gpu", indexes[0], uuids[0], simulated)
        return cls("gpu", indexes[0], uuids[0], simulated, tuple(indexes), tuple(uuids))

    @property
    def gpu_indexes(self) -> tuple[int, ...]:
        """Every GPU index of the assignment; () for the CPU."""
        if self.indexes:
            return self.indexes
        return (self.index,) if self.kind == "gpu" and self.index is not None else ()

    @property
    def visible_devices(self) -> str:
        """CUDA_VISIBLE_DEVICES for the assignment: "1", "0,1", or "" for the CPU."""
        return ",".join(str(i) for i in self.gpu_indexes)

    @property
    def vendor(self) -> str:
        """``amd`` for an AMD GPU, ``nvidia`` for any other GPU, ``cpu`` for the CPU."""
        return gpu_vendor(self.uuid) if self.kind == "gpu" else "cpu"

    @property
    def name(self) -> str:
        return f"gpu:{self.visible_devices}" if self.kind == "gpu" else "cpu"


@dataclass(frozen=True, slots=True)
class LaunchSpec:
    argv: list[str]
    env: dict[str, str]
    cwd: str | None
    kill_argv: list[str] | None = None  # run as well when the worker is killed


CPU_WAIT_POLICY_VAR = "OMP_WAIT_POLICY"


def worker_env(preset: Preset, device: DeviceAssignment, model_path: str | None,
               extra: dict[str, str] | None = None) -> dict[str, str]:
    """The variables every worker gets, whatever launches it."""
    env = dict(preset.env)
    env.update({
        "MODEL_NAME": preset.name,
        "MODEL_PATH": model_path or "",
        # With several GPUs the worker sees them as cuda:0, cuda:1, ...; cuda:0 is the first.
        "GPU_DEVICE": "cuda:0" if device.kind == "gpu" else "cpu",
        # Index order must match NVML's, which enumerates by PCI bus.
        "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
        "CUDA_VISIBLE_DEVICES": device.visible_devices,
        "GPULANE_DEVICE": device.name,
        "GPULANE_PRESET": preset.name,
        "GPULANE_MODE": preset.mode.value,
        "PYTHONUNBUFFERED": "1",
    })
    if device.vendor == "amd":
        env.update(amd_visible_devices(device.gpu_indexes))
    elif device.kind == "cpu":
        env["HIP_VISIBLE_DEVICES"] = HIDDEN_HIP_DEVICES
    if device.simulated:
        # No CUDA device stands behind a simulated GPU. The variables above stay what a real
        # one would give (so placement can be tested end to end); this one tells a worker to
        # compute on the CPU instead (gpulane.worker does so by itself).
        env["GPULANE_SIMULATED"] = "1"
    if (device.kind == "cpu" or device.simulated) and CPU_WAIT_POLICY_VAR not in preset.env \
            and CPU_WAIT_POLICY_VAR not in os.environ:
        # A CPU worker shares its cores with the node and with other workers. OpenMP's
        # default spin-waiting then burns the CPU a descheduled partner thread needs: on 2
        # shared cores torch used 30-40% more CPU per item. Sleeping waiters give it back.
        env[CPU_WAIT_POLICY_VAR] = "PASSIVE"
    if extra:
        env.update(extra)
    return env


def amd_visible_devices(indexes: tuple[int, ...]) -> dict[str, str]:
    """The variables that give a worker the AMD GPUs at ``indexes`` (HIP's ordinals).

    ROCm applies ROCR_VISIBLE_DEVICES first and HIP_VISIBLE_DEVICES to what is left, renumbered
    from 0; HIP reads CUDA_VISIBLE_DEVICES as HIP_VISIBLE_DEVICES. So the placed GPUs go in
    ROCR_VISIBLE_DEVICES, and the other two count from 0 (the worker's ``cuda:0``): the host
    indexes there would name GPUs the worker no longer has.
    """
    relative = ",".join(str(i) for i in range(len(indexes)))
    return {"ROCR_VISIBLE_DEVICES": ",".join(str(i) for i in indexes),
            "HIP_VISIBLE_DEVICES": relative, "CUDA_VISIBLE_DEVICES": relative}


def device_groups(paths: tuple[str, ...] = AMD_DEVICES) -> list[str]:
    """The host gids owning ``paths`` and the render nodes under them: a container user is in
    none of the host's groups, and the device files keep their host owners inside."""
    gids: set[int] = set()
    for path in paths:
        entries = [path]
        if os.path.isdir(path):
            entries += [os.path.join(path, n) for n in os.listdir(path) if n.startswith("render")]
        for entry in entries:
            try:
                gids.add(os.stat(entry).st_gid)
            except OSError:
                continue
    return [str(gid) for gid in sorted(gids) if gid != 0]


NODE_ONLY_ENV = frozenset({"GPULANE_TOKEN",
                           *(f"GPULANE_{name.upper()}" for name in Settings.model_fields)})
"""The node's own settings, its secrets among them (GPULANE_KEYS holds API keys in clear,
GPULANE_STORE may hold a password): never passed on to a worker, whose code is the model's."""


def node_env() -> dict[str, str]:
    """The node's environment minus its secrets: what a worker process inherits."""
    return {k: v for k, v in os.environ.items() if k not in NODE_ONLY_ENV}


def task_file_roots(env: dict[str, str]) -> list[str]:
    """The folders a worker's tasks may name files in (ENV_ALLOWED_ROOTS in its env)."""
    return [r for r in env.get(ENV_ALLOWED_ROOTS, "").split(os.pathsep) if r]


def container_user(preset: Preset) -> str:
    """Who a container runs as: the preset's user, else the node's uid:gid, never root."""
    if preset.user is not None:
        return preset.user
    uid = os.getuid()
    return NOBODY if uid == 0 else f"{uid}:{os.getgid()}"


class ProcessLauncher:
    """Runs the preset's argv as a child process; ``python`` means this interpreter."""

    def build(self, preset: Preset, device: DeviceAssignment, name: str,
              extra_env: dict[str, str] | None = None, *,
              labels: dict[str, str] | None = None) -> LaunchSpec:
        argv = list(preset.argv)
        if argv and argv[0] in ("python", "python3"):
            argv[0] = sys.executable
        env = {**node_env(), **worker_env(preset, device, preset.model_path, extra_env)}
        return LaunchSpec(argv, env, preset.workdir)


class DockerLauncher:
    """Runs the preset's image with ``docker run``; the node talks to it over stdin/stdout."""

    docker = "docker"

    def build(self, preset: Preset, device: DeviceAssignment, name: str,
              extra_env: dict[str, str] | None = None, *,
              labels: dict[str, str] | None = None) -> LaunchSpec:
        """``labels``: the node's (LABEL_NODE, LABEL_DATA_DIR); LABEL_WORKER is added."""
        if preset.image is None:  # the preset schema already refuses this
            raise ValueError(f"preset {preset.name!r} has runtime docker but no image")
        inner_model = CONTAINER_MODEL_PATH if preset.model_path else None
        env = worker_env(preset, device, inner_model, extra_env)
        argv = [self.docker, "run", "--rm", "-i", "--name", container_name(name),
                "--user", container_user(preset), "--cap-drop", "ALL",
                "--security-opt", "no-new-privileges"]
        for key, value in sorted({**(labels or {}), LABEL_WORKER: name}.items()):
            argv += ["--label", f"{key}={value}"]
        if device.vendor == "amd":
            for path in AMD_DEVICES:
                argv += ["--device", path]
            for group in (*AMD_GROUPS, *device_groups()):
                argv += ["--group-add", group]
            # Every GPU is in the container, at its host index: ROCR_VISIBLE_DEVICES stays the
            # host's (worker_env), and HIP's ordinals count from 0 after it.
        elif device.kind == "gpu":
            # docker splits --gpus on commas, so a list of devices goes in double quotes.
            count = len(device.gpu_indexes)
            wanted = f"device={device.visible_devices}"
            argv += ["--gpus", wanted if count == 1 else f'"{wanted}"']
            # Inside the container the GPUs it sees are numbered from 0.
            env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in range(count))
        input_file = env.get("GPULANE_INPUT_FILE")
        if input_file:  # a large one-off input: the container sees the file read-only
            env["GPULANE_INPUT_FILE"] = CONTAINER_INPUT_FILE
        # ``-e KEY`` without a value: docker copies it from its client's environment, so the
        # values (a preset's credentials among them) never stand on a command line that any
        # local user can read with ps.
        passed = {key: value for key, value in env.items()
                  if key == "PYTHONUNBUFFERED" or key in preset.env
                  or key.startswith(("GPULANE_", "MODEL_", "GPU_", "CUDA_", "HIP_", "ROCR_"))}
        for key in sorted(passed):
            argv += ["-e", key]
        if preset.model_path:
            argv += ["-v", f"{preset.model_path}:{CONTAINER_MODEL_PATH}"]
        if input_file:
            argv += ["-v", f"{input_file}:{CONTAINER_INPUT_FILE}:ro"]
        for root in task_file_roots(env):
            # Task files keep their paths inside: the node resolved them, the worker opens
            # them as they are, and may not write there.
            argv += ["-v", f"{root}:{root}:ro"]
        argv.append(preset.image)
        argv += list(preset.command)
        # Killing the docker client does not stop its container; ``docker kill`` does.
        kill = [self.docker, "kill", container_name(name)]
        return LaunchSpec(argv, {**node_env(), **passed}, preset.workdir, kill_argv=kill)


def container_name(worker_id: str) -> str:
    """A docker-safe container name for a worker id."""
    return "gpulane-" + re.sub(r"[^a-zA-Z0-9_.-]", "-", worker_id)


def launcher_for(preset: Preset) -> ProcessLauncher | DockerLauncher:
    return DockerLauncher() if preset.runtime is Runtime.DOCKER else ProcessLauncher()
