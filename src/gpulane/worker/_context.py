"""The worker SDK's context, errors and device choice (see gpulane.worker)."""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from gpulane.worker._onnx import CPU, INSTALL_HINT, provider_name, providers_for

ENV_SIMULATED = "GPULANE_SIMULATED"
"""Set to ``1`` by the node when the worker's GPU is simulated: compute on the CPU."""

_OOM_MARKERS = ("out of memory", "cublas_status_alloc_failed", "cudnn_status_alloc_failed",
                "cudnn_status_not_enough_memory")


class TaskError(Exception):
    """Fail one task (raise it, or return it as that task's output) with a given kind."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


def error_kind(exc: BaseException) -> str:
    """The error kind a task fails with: TaskError's own kind; ``oom`` for out-of-memory (CUDA
    or host); ``bad_input`` for ValueError, TypeError and KeyError; else ``internal``."""
    if isinstance(exc, TaskError):
        return exc.kind
    names = {cls.__name__ for cls in type(exc).__mro__}
    text = str(exc).lower()
    if "OutOfMemoryError" in names or isinstance(exc, MemoryError) or any(
            marker in text for marker in _OOM_MARKERS):
        return "oom"
    if isinstance(exc, ValueError | TypeError | KeyError):
        return "bad_input"
    return "internal"


def error_message(exc: BaseException) -> str:
    if isinstance(exc, TaskError):
        return exc.message
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def json_default(obj: Any) -> Any:
    """numpy and torch scalars and arrays become plain JSON values."""
    for name in ("tolist", "item"):
        convert = getattr(obj, name, None)
        if callable(convert):
            return convert()
    if isinstance(obj, set | frozenset | tuple):
        return list(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def dumps(event: Mapping[str, Any]) -> str:
    return json.dumps(event, separators=(",", ":"), ensure_ascii=False,
                      default=json_default) + "\n"


def resolve_device(env: Mapping[str, str]) -> tuple[str, bool, str | None]:
    """(device, simulated, warning): where the worker should compute."""
    raw = env.get("GPU_DEVICE", "").strip() or "cpu"
    if env.get(ENV_SIMULATED, "").strip().lower() in ("1", "true", "yes"):
        return "cpu", True, None
    if raw.startswith("cuda") and importlib.util.find_spec("torch") is not None:
        import torch  # only now: it costs a second or two to import

        if not torch.cuda.is_available():
            return "cpu", False, (f"GPU_DEVICE={raw} but torch sees no CUDA device "
                                  f"(torch {torch.__version__}); computing on the CPU")
    return raw, False, None


@dataclass(eq=False)
class Context:
    """What ``load`` and ``handle`` get: where to run, the loaded model, and event helpers."""

    device: str
    """``cuda:0`` on a GPU, ``cpu`` on the CPU or when the GPU is simulated / has no CUDA."""
    simulated: bool = False
    model_path: str | None = None
    model_name: str = ""
    preset: str = ""
    mode: str = "session"
    gpulane_device: str = "cpu"
    """The node's name for the device: ``gpu:N`` or ``cpu``."""
    model: Any = None
    """What ``load`` returned."""
    task: str | None = None
    """The task ``handle`` works on: set for batch=False, and for a batch of one."""
    tasks: list[str] = field(default_factory=list)
    """The task ids of the current batch, in input order."""
    env: Mapping[str, str] = field(default_factory=lambda: dict(os.environ), repr=False)
    """The worker's environment as the node set it (GPU_DEVICE, HIP_VISIBLE_DEVICES, ...)."""
    _write: Callable[[str], None] = field(default=lambda line: None, repr=False)
    _cancelled: Callable[[str], bool] = field(default=lambda task: False, repr=False)

    def _resolve(self, task: str | int | None) -> str | None:
        if isinstance(task, int) and not isinstance(task, bool):
            return self.tasks[task]  # an index into the batch
        return self.task if task is None else str(task)

    def emit(self, event: Mapping[str, Any]) -> None:
        """Write an event now. A task-less event gets the current task (see ``task``)."""
        out = dict(event)
        if "task" not in out and out.get("event") not in ("connection", "worker"):
            if self.task is not None and self.mode != "oneoff":
                out["task"] = self.task
        elif isinstance(out.get("task"), int):
            out["task"] = self._resolve(out["task"])
        if out.get("task") is not None and self._cancelled(str(out["task"])):
            return  # the node ignores it anyway
        head: dict[str, Any] = {k: out.pop(k) for k in ("event", "task") if k in out}
        try:
            line = dumps({**head, **out})
        except (TypeError, ValueError) as exc:  # a bug in the worker, not in the input
            raise TaskError("internal", f"ctx.emit: the event is not JSON: {exc}") from exc
        self._write(line)

    def progress(self, task: str | int | None = None, **fields: Any) -> None:
        """A ``progress`` event, e.g. ``ctx.progress(None, done=3, total=10)``; ``task`` is a
        task id, an index into the batch, or None for the current task."""
        self._event("progress", task, fields)

    def warn(self, message: str, task: str | int | None = None) -> None:
        """A ``warning`` event (stored with the task, shown to clients) and a stderr line."""
        print(f"warning: {message}", file=sys.stderr, flush=True)
        self._event("warning", task, {"message": message})

    def cancelled(self, task: str | int | None = None) -> bool:
        """Whether the node cancelled the task (poll it in long handlers and stop early)."""
        resolved = self._resolve(task)
        return resolved is not None and self._cancelled(resolved)

    def _event(self, name: str, task: str | int | None, fields: dict[str, Any]) -> None:
        resolved = self._resolve(task)
        event: dict[str, Any] = {"event": name}
        if resolved is not None and self.mode != "oneoff":
            event["task"] = resolved
        self.emit({**event, **fields})

    def onnx_device(self) -> str:
        """Where ONNX Runtime should run: the node's placement (``GPU_DEVICE``), ``cpu`` on a
        simulated GPU. Unlike ``device`` it does not follow torch's verdict: a worker with a
        CPU-only torch and a GPU build of onnxruntime still gets the GPU's providers."""
        if self.simulated:
            return "cpu"
        return self.env.get("GPU_DEVICE", "").strip() or self.device

    def onnx_providers(self) -> list[str | tuple[str, dict[str, Any]]]:
        """ONNX Runtime execution providers for this worker's device, best first, CPU last.

        On an NVIDIA GPU: CUDA; on an AMD GPU (the node set HIP_VISIBLE_DEVICES): MIGraphX,
        ROCm; on any GPU: DirectML; each only when the installed onnxruntime has it, with
        ``device_id`` set. On the CPU or a simulated GPU: CPU only. Imports onnxruntime now.
        """
        ort = _onnxruntime()
        return providers_for(self.onnx_device(), self.env, ort.get_available_providers())

    def onnx_session(self, model: Any, sess_options: Any = None, **kwargs: Any) -> Any:
        """An ``onnxruntime.InferenceSession`` on :meth:`onnx_providers`.

        ``model`` is a path or the model's bytes. On a GPU that only the CPU provider could
        serve (a CPU-only onnxruntime wheel), warns once (the install hint in the message).
        """
        ort = _onnxruntime()
        providers = self.onnx_providers()
        session = ort.InferenceSession(model, sess_options=sess_options, providers=providers,
                                       **kwargs)
        device = self.onnx_device()
        if device != "cpu" and session.get_providers()[:1] == [CPU]:
            offered = [provider_name(p) for p in providers]
            self.warn(f"on {device} but ONNX Runtime runs this model on the CPU "
                      f"(providers {offered} of {ort.get_available_providers()}); "
                      f"{INSTALL_HINT}")
        return session


def _onnxruntime() -> Any:
    try:
        return importlib.import_module("onnxruntime")
    except ImportError as exc:
        raise ImportError(f"this worker needs onnxruntime: {INSTALL_HINT}") from exc
