"""Real GPUs through NVML (``pynvml`` from the ``nvidia-ml-py`` package).

As in nvitop's ``libnvml``, every NVML call goes through :meth:`NvmlProvider._query`, which
turns any failure (unsupported field, lost GPU, old driver missing a function) into a
default (N/A) and logs the first failure of each function once, so a snapshot never raises.
A device whose handle or memory reading fails with a lost-GPU error (``_LOST_ERRORS``), or
with NVML's Unknown error UNKNOWN_LOST_READINGS readings in a row, reads ``health="lost"``
with its last known identity: the other GPUs read on as usual.
"""

from __future__ import annotations

import importlib
import logging
import sys
import threading
from collections.abc import Callable
from types import ModuleType
from typing import Any

from gpulane.devices.base import DeviceSnapshot, GpuProcess

log = logging.getLogger(__name__)

_MIB = 1024 * 1024
_NOT_AVAILABLE_U64 = 2**64 - 1  # NVML's "value not available" for unsigned 64-bit fields
_LIBRARY_NAME = "nvml.dll" if sys.platform == "win32" else "libnvidia-ml.so.1"
# Expected failures (feature or driver absent): logged at debug, not as warnings.
_QUIET_ERRORS = (
    "NVMLError_NotSupported",
    "NVMLError_FunctionNotFound",
    "NVMLError_LibraryNotFound",  # a machine without NVIDIA drivers: the fallback reason says so
    "NVMLError_DriverNotLoaded",
)
_FAILED = object()  # sentinel default: tells "call failed" apart from a legitimate None
_LOST = object()  # sentinel: the call failed because the GPU is lost
_UNKNOWN = object()  # sentinel: the call failed with NVML's Unknown error
_LOST_ERRORS = ("NVMLError_GpuIsLost", "NVMLError_GPUIsLost")
"""Errors of one device's calls that mean the GPU itself is gone (fell off the bus, an Xid
that needs a reset): that GPU reads health "lost" instead of failing the whole snapshot."""
_UNKNOWN_ERROR = "NVMLError_Unknown"
"""What a lost GPU often answers, but also a passing driver hiccup: lost only when it lasts
(UNKNOWN_LOST_READINGS)."""
UNKNOWN_LOST_READINGS = 2
"""Readings in a row a GPU must answer NVML's Unknown error to read lost: a lost GPU has its
workers stopped and its tasks requeued, which one hiccup must not cost (a poll is 2 s)."""


def _text(value: Any) -> str | None:
    """Decode a name: older pynvml returns bytes, newer returns str."""
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return value if isinstance(value, str) else None


def _int(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int) or value >= _NOT_AVAILABLE_U64:
        return None
    return value


def _float(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _mib(value: Any) -> int | None:
    n = _int(value)
    return None if n is None else n // _MIB


class NvmlProvider:
    """A :class:`~gpulane.devices.base.DeviceProvider` over the NVIDIA driver."""

    name = "nvml"
    simulated = False

    def __init__(self, nvml: ModuleType) -> None:
        """Wrap an already-imported ``pynvml``; use :meth:`probe` or :meth:`try_create`."""
        self._nvml = nvml
        self._lock = threading.Lock()
        self._failed: dict[str, str] = {}  # function name -> first error, for logs and reasons
        self._initialized = False
        self._closed = False
        self._count = 0
        self._handles: dict[int, Any] = {}
        self._known: dict[int, tuple[str, str, int]] = {}  # index -> (uuid, name, total MiB)
        self._unknown: dict[int, int] = {}  # index -> readings in a row that answered Unknown
        self.driver_version: str | None = None

    # -- construction -------------------------------------------------------------------

    @classmethod
    def probe(cls) -> tuple[NvmlProvider | None, str]:
        """Start NVML; return ``(provider, "")`` or ``(None, why it is unavailable)``."""
        try:
            nvml = importlib.import_module("pynvml")
        except Exception as exc:  # ImportError, or a broken install raising anything else
            return None, f"pynvml not importable ({exc}); install nvidia-ml-py"
        provider = cls(nvml)
        if provider._query("nvmlInit", default=_FAILED) is _FAILED:
            return None, provider._init_failure_reason()
        provider._initialized = True
        count = _int(provider._query("nvmlDeviceGetCount"))
        if not count:
            err = provider._failed.get("nvmlDeviceGetCount")
            provider.close()
            return None, f"nvmlDeviceGetCount failed: {err}" if err else "NVML found no GPUs"
        provider._count = count
        provider.driver_version = _text(provider._query("nvmlSystemGetDriverVersion"))
        return provider, ""

    @classmethod
    def try_create(cls) -> NvmlProvider | None:
        """An initialised provider, or ``None`` when NVML is missing, fails, or sees no GPU."""
        return cls.probe()[0]

    def _init_failure_reason(self) -> str:
        err = self._failed.get("nvmlInit", "unknown error")
        if "NVMLError_LibraryNotFound" in err:
            return f"{_LIBRARY_NAME} not found"
        return f"nvmlInit failed: {err}"

    # -- the one way to call NVML -------------------------------------------------------

    def _query(self, func: str | Callable[..., Any], *args: Any, default: Any = None) -> Any:
        """Call an NVML function; on any failure log it (once per function), return ``default``.

        ``func`` is a pynvml function or its name; a name pynvml lacks (an older
        nvidia-ml-py) counts as a failure rather than an ``AttributeError``.
        """
        fname = func if isinstance(func, str) else getattr(func, "__name__", repr(func))
        try:
            fn = getattr(self._nvml, func) if isinstance(func, str) else func
            return fn(*args)
        except Exception as exc:  # NVMLError*, AttributeError, OSError from ctypes, ...
            self._note_failure(fname, exc)
            return default

    def _note_failure(self, fname: str, exc: Exception) -> None:
        kind = type(exc).__name__
        with self._lock:
            if fname in self._failed:
                return
            self._failed[fname] = f"{kind}: {exc}"
        level = logging.DEBUG if kind in _QUIET_ERRORS else logging.WARNING
        log.log(level, "NVML %s failed (%s: %s); reporting N/A", fname, kind, exc)

    # -- DeviceProvider -----------------------------------------------------------------

    def count(self) -> int:
        return 0 if self._closed else self._count

    def _handle(self, index: int) -> Any:
        # Handles are stable for the life of the NVML session; cache them.
        handle = self._handles.get(index)
        if handle is None:
            handle = self._device_call("nvmlDeviceGetHandleByIndex", index)
            if handle is not None and handle is not _LOST and handle is not _UNKNOWN:
                self._handles[index] = handle
        return handle

    def _device_call(self, fname: str, *args: Any) -> Any:
        """``_query`` for the calls that tell a lost GPU: ``_LOST`` when the error says so
        (expected then, so not logged as a failure), else the value or None."""
        try:
            return getattr(self._nvml, fname)(*args)
        except Exception as exc:
            if type(exc).__name__ in _LOST_ERRORS:
                return _LOST
            if type(exc).__name__ == _UNKNOWN_ERROR:
                return _UNKNOWN
            self._note_failure(fname, exc)
            return None

    def _lost(self, index: int, health: str = "lost") -> DeviceSnapshot:
        """A lost GPU: its last known identity (so its index and uuid keep their meaning),
        no readings, health "lost" (``health`` "ok": one unread reading, not lost yet)."""
        uuid, name, total = self._known.get(index, (f"GPU-unknown-{index}", "Unknown GPU", 0))
        return DeviceSnapshot(
            index=index, uuid=uuid, name=name, total_vram_mb=total, used_vram_mb=None,
            free_vram_mb=None, utilization_pct=None, memory_utilization_pct=None,
            temperature_c=None, power_w=None, health=health)

    def _unknown_reading(self, index: int) -> DeviceSnapshot:
        """The GPU answered Unknown: lost once it has UNKNOWN_LOST_READINGS times in a row."""
        n = self._unknown[index] = self._unknown.get(index, 0) + 1
        return self._lost(index, "lost" if n >= UNKNOWN_LOST_READINGS else "ok")

    def snapshot(self) -> list[DeviceSnapshot]:
        if self._closed:
            return []
        return [self._read(index) for index in range(self._count)]

    def _read(self, index: int) -> DeviceSnapshot:
        handle = self._handle(index)
        if handle is _LOST:
            return self._lost(index)
        if handle is _UNKNOWN:
            return self._unknown_reading(index)
        if handle is None:
            # Lost or inaccessible GPU: keep its index so others do not shift; no capacity.
            return DeviceSnapshot(
                index=index,
                uuid=f"GPU-unknown-{index}",
                name="Unknown GPU",
                total_vram_mb=0,
                used_vram_mb=None,
                free_vram_mb=None,
                utilization_pct=None,
                memory_utilization_pct=None,
                temperature_c=None,
                power_w=None,
            )
        q = self._query
        memory = self._device_call("nvmlDeviceGetMemoryInfo", handle)
        if memory is _LOST:
            return self._lost(index)
        if memory is _UNKNOWN:
            return self._unknown_reading(index)
        self._unknown.pop(index, None)
        rates = q("nvmlDeviceGetUtilizationRates", handle)
        temp_sensor = getattr(self._nvml, "NVML_TEMPERATURE_GPU", 0)
        power_mw = _float(q("nvmlDeviceGetPowerUsage", handle))
        uuid = _text(q("nvmlDeviceGetUUID", handle)) or f"GPU-unknown-{index}"
        name = _text(q("nvmlDeviceGetName", handle)) or "Unknown GPU"
        total = _mib(getattr(memory, "total", None)) or 0
        if total:
            self._known[index] = (uuid, name, total)
        return DeviceSnapshot(
            index=index,
            uuid=uuid,
            name=name,
            total_vram_mb=total,
            used_vram_mb=_mib(getattr(memory, "used", None)),
            free_vram_mb=_mib(getattr(memory, "free", None)),
            utilization_pct=_float(getattr(rates, "gpu", None)),
            memory_utilization_pct=_float(getattr(rates, "memory", None)),
            temperature_c=_float(q("nvmlDeviceGetTemperature", handle, temp_sensor)),
            power_w=None if power_mw is None else power_mw / 1000.0,
            processes=self._processes(handle),
            simulated=False,
        )

    def _processes(self, handle: Any) -> tuple[GpuProcess, ...]:
        # A process using both compute and graphics appears in both lists; keep one entry.
        by_pid: dict[int, GpuProcess] = {}
        for fname in (
            "nvmlDeviceGetComputeRunningProcesses",
            "nvmlDeviceGetGraphicsRunningProcesses",
        ):
            for info in self._query(fname, handle, default=()) or ():
                pid = _int(getattr(info, "pid", None))
                if pid is None:
                    continue
                used_vram_mb = _mib(getattr(info, "usedGpuMemory", None))
                seen = by_pid.get(pid)
                if seen is None or (seen.used_vram_mb is None and used_vram_mb is not None):
                    by_pid[pid] = GpuProcess(pid=pid, used_vram_mb=used_vram_mb)
        return tuple(by_pid[pid] for pid in sorted(by_pid))

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            initialized, self._initialized = self._initialized, False
        self._handles.clear()
        if initialized:
            self._query("nvmlShutdown")

    def describe(self) -> str:
        """Short summary like ``2 NVIDIA GPUs (driver 550.54)``."""
        n = self._count
        driver = f" (driver {self.driver_version})" if self.driver_version else ""
        return f"{n} NVIDIA GPU{'s' if n != 1 else ''}{driver}"
