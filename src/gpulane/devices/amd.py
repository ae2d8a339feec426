"""Real AMD GPUs through AMD SMI (``amdsmi``, the Python binding shipped with ROCm).

Built like the NVML provider (devices/nvml.py): every call goes through
:meth:`AmdProvider._query`, which turns any failure (a feature the board lacks, a function an
older ``amdsmi`` does not have, the library raising mid-snapshot) into N/A and logs the first
failure of each function once, so a snapshot never raises. ``amdsmi`` answers the string
``"N/A"`` for readings it cannot take; those read as ``None`` here too.

GPUs are numbered in HIP's order (``hip_id`` from ``amdsmi_get_gpu_enumeration_info`` when
every GPU reports one, else the order AMD SMI lists them), so that a snapshot's index is the
ordinal ``ROCR_VISIBLE_DEVICES`` and ``HIP_VISIBLE_DEVICES`` mean (runtime/launchers.py), as
NVML's PCI order is CUDA's with ``CUDA_DEVICE_ORDER=PCI_BUS_ID``. A uuid carries
``AMD_UUID_PREFIX``: it is how a worker's launcher knows to give it the AMD variables.

No AMD hardware has run this module: it is tested against a stand-in ``amdsmi`` built from
the 7.0 binding's signatures (tests/unit/test_devices_amd.py).
"""

from __future__ import annotations

import importlib
import logging
import threading
from collections.abc import Sequence
from types import ModuleType
from typing import Any

from gpulane.devices.base import AMD_UUID_PREFIX, DeviceSnapshot, GpuProcess

log = logging.getLogger(__name__)

_MIB = 1024 * 1024
_QUIET_ERRORS = ("AMDSMI_STATUS_NOT_SUPPORTED", "AMDSMI_STATUS_NOT_YET_IMPLEMENTED")
"""Failures a board may well give (a sensor it lacks): logged at debug, not as warnings."""
_TEMPERATURE_SENSORS = ("EDGE", "HOTSPOT", "JUNCTION")
"""Sensors tried in turn for the temperature: MI200/MI300 boards have no edge sensor."""
_FAILED = object()
"""Sentinel default of ``_query``: tells "the call failed" from a call that answered None."""


def _int(value: Any) -> int | None:
    """An integer reading; AMD SMI's ``"N/A"`` (or anything else) reads as None."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return None
    return value


def _float(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _text(value: Any) -> str | None:
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="replace")
    if not isinstance(value, str) or not value.strip() or value.strip() == "N/A":
        return None
    return value.strip()


def _field(mapping: Any, key: str) -> Any:
    """``mapping[key]`` for the dicts AMD SMI answers; None when it is not one or lacks it."""
    return mapping.get(key) if isinstance(mapping, dict) else None


class AmdProvider:
    """A :class:`~gpulane.devices.base.DeviceProvider` over AMD SMI."""

    name = "amdsmi"
    simulated = False

    def __init__(self, amdsmi: ModuleType) -> None:
        """Wrap an already-imported ``amdsmi``; use :meth:`probe` or :meth:`try_create`."""
        self._amdsmi = amdsmi
        self._lock = threading.Lock()
        self._failed: dict[str, str] = {}  # function name -> first error, for logs and reasons
        self._initialized = False
        self._closed = False
        self._handles: list[Any] = []
        self._known: dict[int, tuple[str, str, int]] = {}  # index -> (uuid, name, total MiB)
        self.driver_version: str | None = None

    # -- construction -------------------------------------------------------------------

    @classmethod
    def probe(cls) -> tuple[AmdProvider | None, str]:
        """Start AMD SMI; return ``(provider, "")`` or ``(None, why it is unavailable)``."""
        try:
            amdsmi = importlib.import_module("amdsmi")
        except Exception as exc:  # ImportError, or KeyError when libamd_smi.so is missing
            return None, (f"amdsmi not importable ({type(exc).__name__}: {exc}); install "
                          "gpulane[amd] and ROCm's libamd_smi")
        provider = cls(amdsmi)
        flags = getattr(getattr(amdsmi, "AmdSmiInitFlags", None), "INIT_AMD_GPUS", None)
        args = () if flags is None else (flags,)
        if provider._query("amdsmi_init", *args, default=_FAILED) is _FAILED:
            return None, f"amdsmi_init failed: {provider._failed.get('amdsmi_init')}"
        provider._initialized = True
        handles = provider._query("amdsmi_get_processor_handles", default=None)
        if not handles:
            err = provider._failed.get("amdsmi_get_processor_handles")
            provider.close()
            return None, (f"amdsmi_get_processor_handles failed: {err}" if err
                          else "AMD SMI found no GPUs")
        provider._handles = provider._hip_order(list(handles))
        driver = provider._query("amdsmi_get_gpu_driver_info", provider._handles[0])
        provider.driver_version = _text(_field(driver, "driver_version"))
        return provider, ""

    @classmethod
    def try_create(cls) -> AmdProvider | None:
        """An initialised provider, or ``None`` when AMD SMI is missing, fails, or sees no GPU."""
        return cls.probe()[0]

    def _hip_order(self, handles: list[Any]) -> list[Any]:
        """The handles in HIP's order when every GPU tells its ``hip_id``, else as listed."""
        ids = [_int(_field(self._query("amdsmi_get_gpu_enumeration_info", h), "hip_id"))
               for h in handles]
        if any(i is None for i in ids) or len(set(ids)) != len(ids):
            return handles
        return [h for _, h in sorted(zip(ids, handles, strict=True), key=lambda p: p[0] or 0)]

    # -- the one way to call AMD SMI ----------------------------------------------------

    def _query(self, fname: str, *args: Any, default: Any = None) -> Any:
        """Call an AMD SMI function by name; on any failure log it (once per function) and
        return ``default``. A name this ``amdsmi`` lacks counts as a failure."""
        try:
            return getattr(self._amdsmi, fname)(*args)
        except Exception as exc:  # AmdSmiLibraryException, AttributeError, OSError, ...
            self._note_failure(fname, exc)
            return default

    def _note_failure(self, fname: str, exc: Exception) -> None:
        message = f"{type(exc).__name__}: {exc}".replace("\n", " ")
        with self._lock:
            if fname in self._failed:
                return
            self._failed[fname] = message
        quiet = any(code in message for code in _QUIET_ERRORS)
        log.log(logging.DEBUG if quiet else logging.WARNING,
                "AMD SMI %s failed (%s); reporting N/A", fname, message)

    # -- DeviceProvider -----------------------------------------------------------------

    def count(self) -> int:
        return 0 if self._closed else len(self._handles)

    def snapshot(self) -> list[DeviceSnapshot]:
        if self._closed:
            return []
        return [self._read(index, handle) for index, handle in enumerate(self._handles)]

    def _read(self, index: int, handle: Any) -> DeviceSnapshot:
        q = self._query
        uuid = _text(q("amdsmi_get_gpu_device_uuid", handle))
        name = _text(_field(q("amdsmi_get_gpu_asic_info", handle), "market_name"))
        known_uuid, known_name, known_total = self._known.get(
            index, (f"{AMD_UUID_PREFIX}unknown-{index}", "Unknown AMD GPU", 0))
        uuid = f"{AMD_UUID_PREFIX}{uuid}" if uuid else known_uuid
        name = name or known_name
        total, used = self._memory(handle)
        if total:
            self._known[index] = (uuid, name, total)
        else:
            # An unread total must not shrink the GPU's capacity to nothing for a reading.
            total = known_total
        activity = q("amdsmi_get_gpu_activity", handle)
        return DeviceSnapshot(
            index=index,
            uuid=uuid,
            name=name,
            total_vram_mb=total,
            used_vram_mb=used,
            free_vram_mb=None if used is None or not total else max(total - used, 0),
            utilization_pct=_float(_field(activity, "gfx_activity")),
            memory_utilization_pct=_float(_field(activity, "umc_activity")),
            temperature_c=self._temperature(handle),
            power_w=self._power(handle),
            processes=self._processes(handle),
            simulated=False,
        )

    def _memory(self, handle: Any) -> tuple[int, int | None]:
        """(total MiB, used MiB): bytes from the memory calls, else MB from the VRAM usage."""
        kind = getattr(getattr(self._amdsmi, "AmdSmiMemoryType", None), "VRAM", None)
        if kind is not None:
            total = _int(self._query("amdsmi_get_gpu_memory_total", handle, kind))
            used = _int(self._query("amdsmi_get_gpu_memory_usage", handle, kind))
            if total:
                return total // _MIB, None if used is None else used // _MIB
        usage = self._query("amdsmi_get_gpu_vram_usage", handle)
        return _int(_field(usage, "vram_total")) or 0, _int(_field(usage, "vram_used"))

    def _temperature(self, handle: Any) -> float | None:
        sensors = getattr(self._amdsmi, "AmdSmiTemperatureType", None)
        metric = getattr(getattr(self._amdsmi, "AmdSmiTemperatureMetric", None), "CURRENT", None)
        if sensors is None or metric is None:
            return None
        for sensor in _TEMPERATURE_SENSORS:
            kind = getattr(sensors, sensor, None)
            if kind is None:
                continue
            value = _float(self._query("amdsmi_get_temp_metric", handle, kind, metric))
            if value is not None:
                return value
        return None

    def _power(self, handle: Any) -> float | None:
        info = self._query("amdsmi_get_power_info", handle)
        for key in ("current_socket_power", "average_socket_power", "socket_power"):
            watts = _float(_field(info, key))
            if watts is not None:
                return watts
        return None

    def _processes(self, handle: Any) -> tuple[GpuProcess, ...]:
        by_pid: dict[int, GpuProcess] = {}
        listed: Sequence[Any] = self._query("amdsmi_get_gpu_process_list", handle) or ()
        for item in listed:
            info = item if isinstance(item, dict) else self._query(
                "amdsmi_get_gpu_process_info", handle, item)  # amdsmi before 6.2: handles
            pid = _int(_field(info, "pid"))
            if pid is None:
                continue
            vram = _int(_field(_field(info, "memory_usage"), "vram_mem"))
            if vram is None:
                vram = _int(_field(info, "mem"))
            by_pid[pid] = GpuProcess(pid=pid, used_vram_mb=None if vram is None else vram // _MIB,
                                     name=_text(_field(info, "name")))
        return tuple(by_pid[pid] for pid in sorted(by_pid))

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            initialized, self._initialized = self._initialized, False
        self._handles = []
        if initialized:
            self._query("amdsmi_shut_down")

    def describe(self) -> str:
        """Short summary like ``2 AMD GPUs (driver 6.8.5)``."""
        n = len(self._handles)
        driver = f" (driver {self.driver_version})" if self.driver_version else ""
        return f"{n} AMD GPU{'s' if n != 1 else ''}{driver}"
