"""The nouns every layer shares: tasks, their states, priorities, events, device snapshots."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

from gpulane.errors import ValidationError


class TaskState(str, enum.Enum):
    """Where a task is in its life: queued -> running -> succeeded | failed | cancelled."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def final(self) -> bool:
        return self in FINAL_STATES


FINAL_STATES = frozenset({TaskState.SUCCEEDED, TaskState.FAILED, TaskState.CANCELLED})


class DeviceWish(str, enum.Enum):
    """What a submitter asks for: any device (GPU first), only a GPU, or only the CPU."""

    AUTO = "auto"
    GPU = "gpu"
    CPU = "cpu"


class FallbackReason:
    """Why a task that could use a GPU runs (or waits) on the CPU: on the task
    (``fallback_reason``) and in its ``fallback`` event.

    Each reason belongs to one kind of a preset's fallback policy (``Preset.fallback``):
    ``no_gpu`` (decided at submit, no GPU of the fleet can hold it), ``busy`` (the GPU queue
    would keep it past ``fallback_after_ms``), ``error`` (the GPU cannot start workers, or
    was lost) and ``oom`` (out of memory in a batch of one)."""

    NO_GPU = "no_gpu"  # no node of the fleet has a GPU
    VRAM_EXCEEDS_LARGEST_GPU = "vram_exceeds_largest_gpu"  # no GPU is big enough
    NOT_ENOUGH_GPUS = "not_enough_gpus"  # gpus: N, and fewer than N GPUs can hold it
    GPU_BUSY = "gpu_busy"  # its expected wait in the GPU queue passed fallback_after_ms
    GPU_UNAVAILABLE = "gpu_unavailable"  # the preset's GPU start circuit is open
    DEVICE_LOST = "device_lost"  # the GPU it ran on was lost (Xid, fell off the bus)
    GPU_OOM = "gpu_oom"  # out of device memory in a batch of one
    KIND = {NO_GPU: "no_gpu", VRAM_EXCEEDS_LARGEST_GPU: "no_gpu", NOT_ENOUGH_GPUS: "no_gpu",
            GPU_BUSY: "busy", GPU_UNAVAILABLE: "error", DEVICE_LOST: "error",
            GPU_OOM: "oom"}
    """Reason -> the policy kind (``Preset.fallback``) that allows it."""


class Priority:
    """Priorities are integers 0-100, higher first; three names stand for common levels."""

    IMMEDIATE = 90
    NORMAL = 50
    BACKGROUND = 10
    NAMES = {"immediate": IMMEDIATE, "normal": NORMAL, "background": BACKGROUND}
    MIN = 0
    MAX = 100

    @classmethod
    def parse(cls, value: object, field_name: str = "priority") -> int:
        """Turn a name or an integer into a priority, or raise naming the field and the fix."""
        if isinstance(value, bool):
            value = str(value)
        if isinstance(value, int):
            if cls.MIN <= value <= cls.MAX:
                return value
        elif isinstance(value, str):
            if value.lower() in cls.NAMES:
                return cls.NAMES[value.lower()]
            if value.strip().isdigit() and cls.MIN <= int(value) <= cls.MAX:
                return int(value)
        raise ValidationError(
            "invalid_priority",
            f"{field_name}={value!r} is not a priority: use immediate, normal, background "
            f"or an integer {cls.MIN}-{cls.MAX}",
            field=field_name)


class ErrorKind(str, enum.Enum):
    """Why a task failed, as workers and the runtime report it."""

    OOM = "oom"
    BAD_INPUT = "bad_input"
    INTERNAL = "internal"
    TIMEOUT = "timeout"
    START_TIMEOUT = "start_timeout"
    WORKER_DIED = "worker_died"
    CANCELLED = "cancelled"
    NO_DEVICE = "no_device"


def now() -> float:
    """Wall-clock seconds since the epoch; the one clock stored timestamps use."""
    return time.time()


@dataclass(slots=True)
class Placement:
    """Where a task ran: node, device name ("gpu:0", "cpu") and why it left the GPU, if it did."""

    node: str
    device: str
    fallback_reason: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"node": self.node, "device": self.device, "fallback_reason": self.fallback_reason}


@dataclass(slots=True)
class TaskSpec:
    """What a submitter asked for, validated; the store turns it into a Task."""

    preset: str
    input: Any
    device_wish: DeviceWish = DeviceWish.AUTO
    priority: int = Priority.NORMAL
    timeout_s: float | None = None
    content_type: str | None = None
    idempotency_key: str | None = None
    body_hash: str | None = None
    lane: str = "gpu"  # "gpu" or "cpu": the queue the router put it in
    fallback_reason: str | None = None  # why an auto task was sent to the CPU lane
    submitted_by: str | None = None  # the name of the API key that submitted it
    durable: bool = True  # False: its preset's online lane (kept in memory; store/tiered.py)


@dataclass(slots=True)
class Task:
    """One unit of work against a preset, as the store holds it."""

    id: str
    preset: str
    state: TaskState
    input: Any
    priority: int
    device_wish: DeviceWish
    created_at: float
    seq: int = 0
    output: Any = None
    error: dict[str, Any] | None = None
    attempts: int = 0
    timeout_s: float | None = None
    content_type: str | None = None
    placement: Placement | None = None
    started_at: float | None = None
    finished_at: float | None = None
    idempotency_key: str | None = None
    lane: str = "gpu"
    fallback_reason: str | None = None
    # The fencing token of the current attempt: it rises on every claim, and a finish with
    # another token is refused. ``attempts`` counts only the attempts held against the
    # preset's max_attempts: a claim given back unspent (a node restart, a preemption, an
    # OOM split, a crashed batch rerun in halves) lowers it again, the token never.
    token: int = 0
    submitted_by: str | None = None  # the name of the API key that submitted it

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "preset": self.preset,
            "state": self.state.value,
            "input": self.input,
            "output": self.output,
            "error": self.error,
            "attempts": self.attempts,
            "priority": self.priority,
            "device_wish": self.device_wish.value,
            "lane": self.lane,
            "fallback_reason": self.fallback_reason,
            "placement": self.placement.to_json() if self.placement else None,
            "timeout_s": self.timeout_s,
            "content_type": self.content_type,
            "created_at": self.created_at,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "submitted_by": self.submitted_by,
        }


@dataclass(slots=True)
class Event:
    """One numbered record about a task: its type and its JSON data."""

    task_id: str
    seq: int
    type: str
    data: dict[str, Any]
    ts: float = field(default_factory=now)

    def to_json(self) -> dict[str, Any]:
        return {"task": self.task_id, "seq": self.seq, "type": self.type, "data": self.data,
                "ts": self.ts}


def task_error(kind: ErrorKind | str, message: str, code: str | None = None,
               **extra: Any) -> dict[str, Any]:
    """The error object a failed task carries: code, kind and message (plus details)."""
    kind_value = kind.value if isinstance(kind, ErrorKind) else kind
    return {"code": code or kind_value, "kind": kind_value, "message": message, **extra}
