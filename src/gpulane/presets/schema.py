"""The preset schema: what a worker is (a process or a container), where it may run, how it
batches, and the bounds of every field.

Validation errors are raised with the field and the fix in their context (``_bad``), so that
:mod:`gpulane.presets.loading` can report them as ``FILE:LINE: ...; fix: ...``.
"""

from __future__ import annotations

import enum
import json
import re
import shlex
from decimal import Decimal
from typing import Any

import pydantic
from pydantic import ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from gpulane.presets.content_types import PATTERN_FORMS, is_pattern, normalize

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_NAME_RULE = "1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"
MAX_GPUS = 64
"""The most whole GPUs one worker (``gpus: N``) may ask for."""


class Runtime(str, enum.Enum):
    PROCESS = "process"
    DOCKER = "docker"


class Mode(str, enum.Enum):
    SESSION = "session"  # the worker stays loaded and serves many tasks
    ONEOFF = "oneoff"  # a fresh worker per task


class DeviceKind(str, enum.Enum):
    GPU = "gpu"
    CPU = "cpu"


class FallbackKind(str, enum.Enum):
    """When a preset's ``auto`` tasks may leave the GPU for the CPU (model.FallbackReason
    names the reasons of each kind)."""

    NO_GPU = "no_gpu"  # at submit: no GPU of the fleet can hold it
    BUSY = "busy"  # queued: its expected wait for a GPU passes fallback_after_ms
    ERROR = "error"  # the GPU cannot start the preset's workers, or was lost under it
    OOM = "oom"  # out of device memory in a batch of one


class Serves(str, enum.Enum):
    """What a preset serves through the OpenAI-compatible routes (api/openai.py)."""

    EMBEDDINGS = "embeddings"  # POST /v1/embeddings: input {"texts": [...]}, output vectors
    CHAT = "chat"  # POST /v1/chat/completions: input {"text": ...}, streams text_delta


DEFAULT_FALLBACK = (FallbackKind.NO_GPU, FallbackKind.ERROR, FallbackKind.OOM)
"""Without ``busy``: for most models the CPU is many times slower than a busy GPU's queue,
so leaving the queue is a choice a preset makes (with its fallback_after_ms)."""
DEFAULT_FALLBACK_AFTER_MS = 5000.0


def _bad(field: str, what: str, fix: str) -> PydanticCustomError:
    # The message goes through ctx so braces in user text are never taken as placeholders.
    return PydanticCustomError("preset", "{what}", {"what": what, "fix": fix, "field": field})


def _scalar_str(v: object) -> object:
    """YAML turns `3` and `true` into int/bool; env values and argv items want the text."""
    return str(v).lower() if isinstance(v, bool) else str(v) if isinstance(v, int | float) else v


def lowercase(v: object) -> object:
    """Text trimmed and lower-cased (``GPU `` is ``gpu``); anything else as it is."""
    return v.strip().lower() if isinstance(v, str) else v


class BatchSettings(pydantic.BaseModel):
    """How many tasks a worker may take in one call, and how long to wait to fill a batch."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_size: int = Field(default=1, ge=1, le=4096)
    max_wait_ms: float = Field(default=0.0, ge=0, allow_inf_nan=False)
    adaptive: bool = True
    target_latency_ms: float | None = Field(default=None, gt=0, allow_inf_nan=False)


class Preset(pydantic.BaseModel):
    """One kind of worker the service can start, and the rules for scheduling its tasks."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    runtime: Runtime = Runtime.PROCESS
    argv: tuple[str, ...] = ()
    image: str | None = None
    command: tuple[str, ...] = Field(default=(), validate_default=True)
    user: str | None = Field(default=None, pattern=r"^\w[\w.-]*(:\w[\w.-]*)?$")  # docker --user
    env: dict[str, str] = Field(default_factory=dict)
    model_path: str | None = None
    mode: Mode = Mode.SESSION
    devices: tuple[DeviceKind, ...] = (DeviceKind.GPU, DeviceKind.CPU)
    vram_mb: int = Field(default=0, ge=0)
    gpus: int = 1  # 1: a vram_mb share of one GPU; N >= 2: N whole GPUs per worker
    batch: BatchSettings = BatchSettings()
    idle_unload_s: float = Field(default=300.0, ge=0, allow_inf_nan=False)
    start_timeout_s: float = Field(default=60.0, gt=0, allow_inf_nan=False)
    timeout_s: float = Field(default=300.0, gt=0, allow_inf_nan=False)
    max_attempts: int = Field(default=3, ge=1)
    max_queued: int | None = Field(default=None, ge=1)  # None: the node's max_queued setting
    accepts: tuple[str, ...] = ("application/json",)
    replicas: int = Field(default=1, ge=1)
    preemptible: bool = True
    # false: the online lane (store/tiered.py), tasks kept in memory unless they fail or
    # outlive online_spill_after_s; docs/reliability.md says what a crash loses
    durable: bool = True
    fallback: tuple[FallbackKind, ...] = DEFAULT_FALLBACK
    fallback_after_ms: float = Field(default=DEFAULT_FALLBACK_AFTER_MS, gt=0,
                                     allow_inf_nan=False)
    serves: tuple[Serves, ...] = ()  # listed by GET /v1/models, named as its `model`
    description: str = ""
    workdir: str | None = None
    source: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _normalize(cls, data: object) -> object:
        """Accept the spellings YAML and JSON produce: strings for lists, numbers for text."""
        if not isinstance(data, dict):
            return data
        d = dict(data)
        for key in ("runtime", "mode"):
            if key in d:
                d[key] = lowercase(d[key])
        for key in ("argv", "command"):
            v = d.get(key)
            if isinstance(v, str):
                try:
                    d[key] = shlex.split(v)
                except ValueError as e:  # unbalanced quotes
                    raise _bad(key, f"cannot be split into words: {e}",
                               "balance the quotes, or give a list of words") from None
            elif isinstance(v, list | tuple):
                d[key] = [_scalar_str(x) for x in v]
        if isinstance(d.get("env"), dict):
            d["env"] = {k: "" if x is None else _scalar_str(x) for k, x in d["env"].items()}
        v = d.get("devices")
        if isinstance(v, str):  # "gpu" or "gpu,cpu"
            v = re.split(r"[,\s]+", v.strip())
        if isinstance(v, list | tuple):
            d["devices"] = [lowercase(x) for x in v]
        v = d.get("fallback")
        if isinstance(v, bool):  # false: GPU or nothing; true: every kind
            d["fallback"] = [k.value for k in FallbackKind] if v else []
        elif isinstance(v, str):  # "busy" or "no_gpu, busy"
            d["fallback"] = [lowercase(x) for x in re.split(r"[,\s]+", v.strip()) if x]
        elif isinstance(v, list | tuple):
            d["fallback"] = [lowercase(x) for x in v]
        if isinstance(d.get("accepts"), str):
            d["accepts"] = [d["accepts"]]
        v = d.get("serves")
        if isinstance(v, str):  # "embeddings" or "chat"
            v = [v]
        if isinstance(v, list | tuple):
            d["serves"] = [lowercase(x) for x in v]
        if isinstance(d.get("batch"), int) and not isinstance(d["batch"], bool):
            d["batch"] = {"max_size": d["batch"]}  # `batch: 8` is short for max_size 8
        return d

    @field_validator("fallback")
    @classmethod
    def _check_fallback(cls, v: tuple[FallbackKind, ...]) -> tuple[FallbackKind, ...]:
        if len(set(v)) != len(v):
            raise _bad("fallback", "lists a kind twice",
                       "list each of no_gpu, busy, error, oom at most once")
        return v

    @field_validator("serves")
    @classmethod
    def _check_serves(cls, v: tuple[Serves, ...]) -> tuple[Serves, ...]:
        if len(set(v)) != len(v):
            raise _bad("serves", "lists a kind twice",
                       "list each of embeddings, chat at most once")
        return v

    @field_validator("name", "env", "devices", "accepts", "image")
    @classmethod
    def _check(cls, v: Any, info: pydantic.ValidationInfo) -> Any:
        field = str(info.field_name)
        if field == "name" and not _NAME_RE.fullmatch(v):
            raise _bad(field, f"must be {_NAME_RULE}, got {show_value(v)}",
                       "rename the preset, e.g. 'whisper-small'")
        if field == "env":
            for k, x in v.items():
                if not k or "=" in k or "\0" in k + x:
                    raise _bad(field, f"variable {show_value(k)} has a bad name or value",
                               "use a non-empty name without '=', and no NUL characters")
        if field == "devices" and (not v or len(set(v)) != len(v)):
            raise _bad(field, "must list each device kind at most once, and at least one",
                       "use [gpu], [cpu] or [gpu, cpu] (in order of preference)")
        if field == "accepts" and (bad := [t for t in v if not is_pattern(normalize(t))]):
            raise _bad(field, f"{show_value(bad[0])} is not a content type",
                       f"use types such as application/json or image/png, or {PATTERN_FORMS}")
        if field == "image" and v is not None and not v.strip():
            raise _bad(field, "is empty", "name an image, e.g. ghcr.io/org/worker:1.0")
        return v

    @field_validator("gpus", mode="before")
    @classmethod
    def _check_gpus(cls, v: object) -> object:
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= MAX_GPUS:
            raise _bad("gpus", f"must be a whole number of GPUs from 1 to {MAX_GPUS}, got "
                       f"{show_value(v)}", "use 1 (a vram_mb share of one GPU, the default) or "
                       "N >= 2 for N whole GPUs per worker, e.g. `gpus: 2`")
        return v

    @model_validator(mode="after")
    def _check_gpus_devices(self) -> Preset:
        if self.gpus > 1 and not self.allows_gpu:
            raise _bad("gpus", f"asks for {self.gpus} GPUs but devices is [cpu]",
                       "add gpu to devices, or remove gpus")
        return self

    @field_validator("command")
    @classmethod
    def _check_runtime(cls, v: tuple[str, ...], info: pydantic.ValidationInfo) -> Any:
        # A validator of the last of runtime/argv/image/command (validate_default), not a model
        # validator, so that it runs, and reports, even when some other field is wrong too.
        d = info.data
        if "runtime" not in d or "argv" not in d or "image" not in d:
            return v  # one of them failed already and has its own problem
        if d["runtime"] is Runtime.PROCESS:
            if not d["argv"]:
                raise _bad("argv", "is required for runtime 'process' (the program to start)",
                           "add e.g. `command: python worker.py`, or `image:` for docker")
            if d["image"] is not None:
                raise _bad("image", "is only used by runtime 'docker'",
                           "set `runtime: docker`, or remove image")
            if v:
                raise _bad("command", "is the container command of a docker preset",
                           "for runtime 'process' give the program as argv")
        elif d["image"] is None:
            raise _bad("image", "is required for runtime 'docker'",
                       "add e.g. `image: ghcr.io/org/worker:1.0`")
        elif d["argv"]:
            raise _bad("argv", "is only used by runtime 'process'",
                       "give the container's command as `command:`")
        return v

    def __hash__(self) -> int:  # env is a dict, so the generated field hash would fail
        return hash((self.name, self.runtime, self.argv, self.image, self.source))

    @property
    def needs_gpu(self) -> bool:
        return DeviceKind.GPU in self.devices and DeviceKind.CPU not in self.devices

    @property
    def allows_gpu(self) -> bool:
        return DeviceKind.GPU in self.devices

    @property
    def allows_cpu(self) -> bool:
        return DeviceKind.CPU in self.devices

    def falls_back(self, kind: FallbackKind | str) -> bool:
        """Whether an ``auto`` task of this preset may move to the CPU for ``kind``."""
        return self.allows_cpu and FallbackKind(kind) in self.fallback

    def to_json(self) -> dict[str, Any]:
        """All fields as JSON-able values; ``Preset.model_validate(p.to_json()) == p``."""
        return self.model_dump(mode="json")


# --- sizes -----------------------------------------------------------------------------------

_UNITS = {"": 2**20, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
          "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}
_SIZE_RE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*")
SIZE_FORMS = "a whole number of MiB (e.g. 4096) or a size such as '512MiB', '4GiB', '1.5GB'"
"""The spellings of a size that errors offer as the fix."""


def size_mb(value: object) -> int:
    """A memory size in MiB (see :func:`parse_size_mb`); ValueError names the bad value."""
    m = _SIZE_RE.fullmatch(value) if isinstance(value, str) else None
    if isinstance(value, int | float) and not isinstance(value, bool):
        nbytes = Decimal(str(value)) * 2**20
    elif m and m.group(2).lower() in _UNITS:
        nbytes = Decimal(m.group(1)) * _UNITS[m.group(2).lower()]
    else:
        raise ValueError(f"{show_value(value)} is not a memory size")
    if not nbytes.is_finite() or nbytes < 0:
        raise ValueError(f"must be >= 0, got {show_value(value)}")
    # Round down (a preset asks for "1.5GB", it gets 1430 MiB) but never turn a size into 0.
    return max(int(nbytes // 2**20), 1) if nbytes else 0


def parse_size_mb(value: object, field: str) -> int:
    """A memory size in MiB: numbers are MiB; strings take B/KB/MB/GB/TB (powers of 1000),
    KiB/MiB/GiB/TiB (powers of 1024, also Ki/Mi/Gi/Ti) or no unit (MiB)."""
    try:
        return size_mb(value)
    except ValueError as e:
        raise ValueError(f"field '{field}': {e}; use {SIZE_FORMS}") from None


# --- values as messages show them -----------------------------------------------------------

def show_value(v: object) -> str:
    """A value as the YAML author wrote it: 'text', 3, true, null."""
    text = f"'{v}'" if isinstance(v, str) else json.dumps(v) if v is None or \
        isinstance(v, bool) else repr(v)
    return text if len(text) <= 60 else text[:57] + "..."
