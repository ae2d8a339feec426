"""Which lane a task waits in, GPU or CPU, and why it left the GPU when it did.

Decided once, at submit, so the answer (and any fallback reason) is recorded with the task and
a caller learns at once when no device could ever run it. The preset's fallback policy
(``Preset.fallback``) is respected here: an ``auto`` task leaves the GPU for a static reason
only when the policy has ``no_gpu`` (else it is refused as ``device=gpu`` would be), and for an
open GPU start circuit (``gpu_unavailable``) only when it has ``error``. Tasks already queued
are moved by the dynamic movers, not here.

In a fleet any node takes any task: a GPU task waits in the GPU lane when a GPU of any live
node can hold it (``elsewhere``: the other nodes' GPU totals), so it goes to another node's GPU
before it falls back to this node's CPU. Only a node that can place it claims it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from gpulane.errors import RequestError, ValidationError
from gpulane.model import DeviceWish, FallbackReason
from gpulane.presets import FallbackKind, Preset

GPU_LANE = "gpu"
CPU_LANE = "cpu"
__all__ = ["CPU_LANE", "GPU_LANE", "FallbackReason", "Route", "route"]


@dataclass(frozen=True, slots=True)
class Route:
    lane: str
    fallback_reason: str | None = None


def route(preset: Preset, wish: DeviceWish, gpu_totals_mb: Sequence[int],
          elsewhere: Sequence[Sequence[int]] = (), *, gpu_unavailable: bool = False,
          devices_lost: bool = False) -> Route:
    """Pick the lane for a task of ``preset`` on a node whose GPUs have these VRAM totals,
    in a fleet whose other live nodes have the GPUs in ``elsewhere`` (one list per node).
    ``gpu_unavailable``: the preset's GPU start circuit on this node is open (not half-open:
    once its cooldown ends new tasks go back to the GPU, where the probe worker starts).
    ``devices_lost``: every GPU of this node reads lost and no other node has one: an auto
    task of a policy with error goes to the CPU (device_lost), not to wait for the mover."""
    if not _fits(preset, gpu_totals_mb):
        # Another node's GPUs that could hold it stand in for this node's: the reasons and
        # errors below then describe the best of them.
        fitting = [totals for totals in elsewhere if _fits(preset, totals)]
        if fitting:
            gpu_totals_mb = fitting[0]
        elif not gpu_totals_mb and any(elsewhere):
            gpu_totals_mb = max(elsewhere, key=lambda totals: max(totals, default=0))
    largest = max(gpu_totals_mb, default=0)
    fits = _fits(preset, gpu_totals_mb)
    if wish is DeviceWish.CPU:
        if not preset.allows_cpu:
            raise ValidationError(
                "device_not_allowed",
                f"device='cpu' but preset {preset.name!r} runs only on "
                f"{[d.value for d in preset.devices]}: use device='gpu' or 'auto'",
                field="device")
        return Route(CPU_LANE)
    if wish is DeviceWish.GPU:
        if not preset.allows_gpu:
            raise ValidationError(
                "device_not_allowed",
                f"device='gpu' but preset {preset.name!r} runs only on the CPU: "
                "use device='cpu' or 'auto'", field="device")
        _require_fit(preset, gpu_totals_mb, fits, largest)
        return Route(GPU_LANE)
    # auto: the preset's order of preference, GPU only where one can hold it. The CPU is a
    # fallback (with a reason) only when a GPU came first in that order and was passed over.
    passed_over_gpu = False
    for kind in preset.devices:
        if kind.value == GPU_LANE:
            if fits:
                if devices_lost and preset.falls_back(FallbackKind.ERROR):
                    return Route(CPU_LANE, FallbackReason.DEVICE_LOST)
                if gpu_unavailable and preset.falls_back(FallbackKind.ERROR):
                    return Route(CPU_LANE, FallbackReason.GPU_UNAVAILABLE)
                return Route(GPU_LANE)
            passed_over_gpu = True
        elif kind.value == CPU_LANE:
            reason = None
            if passed_over_gpu:
                if not preset.falls_back(FallbackKind.NO_GPU):
                    _require_fit(preset, gpu_totals_mb, fits, largest, policy=True)
                reason = (FallbackReason.NO_GPU if not gpu_totals_mb
                          else FallbackReason.VRAM_EXCEEDS_LARGEST_GPU
                          if preset.vram_mb > largest else FallbackReason.NOT_ENOUGH_GPUS)
            return Route(CPU_LANE, reason)
    _require_fit(preset, gpu_totals_mb, fits, largest)
    return Route(GPU_LANE)  # pragma: no cover - _require_fit raised


def _require_fit(preset: Preset, gpu_totals_mb: Sequence[int], fits: bool,
                 largest: int, policy: bool = False) -> None:
    """Raise why no GPU can hold the preset; ``policy``: the preset could run on the CPU but
    its fallback policy excludes no_gpu, which the message says (and how to change it)."""
    if fits:
        return
    why = _policy_note(preset) if policy else ""
    if not gpu_totals_mb:
        raise RequestError(
            "no_gpu", f"preset {preset.name!r} needs a GPU and this node has none{why}: "
            "submit with device='cpu' if the preset allows it, or add a GPU node",
            field="device")
    if preset.vram_mb <= largest:  # big enough GPUs exist, but fewer than gpus: N
        count = _big_enough(preset, gpu_totals_mb)
        raise RequestError(
            "not_enough_gpus",
            f"preset {preset.name!r} needs gpus={preset.gpus} but this node has {count} GPU(s)"
            + (f" with vram_mb={preset.vram_mb} or more" if preset.vram_mb else "") + why
            + ": lower the preset's gpus or run it where more GPUs are",
            field="gpus", extra={"gpus_here": count})
    raise RequestError(
        "vram_exceeds_devices",
        f"preset {preset.name!r} needs vram_mb={preset.vram_mb} but the largest GPU here "
        f"has {largest} MB{why}: lower the preset's vram_mb or run it where a bigger GPU is",
        field="vram_mb", extra={"largest_device_mb": largest})


def _policy_note(preset: Preset) -> str:
    kinds = ", ".join(k.value for k in preset.fallback)
    return (f", and its fallback policy (fallback: [{kinds}]) excludes no_gpu, so auto tasks "
            "do not go to the CPU (add no_gpu to the preset's fallback, or submit with "
            "device='cpu')")


def _fits(preset: Preset, gpu_totals_mb: Sequence[int]) -> bool:
    """gpus: N wants N devices of one node that can each hold vram_mb (whole ones when N >= 2)."""
    return bool(gpu_totals_mb) and _big_enough(preset, gpu_totals_mb) >= preset.gpus


def _big_enough(preset: Preset, gpu_totals_mb: Sequence[int]) -> int:
    """How many GPUs here could each hold the preset's vram_mb."""
    return sum(1 for total in gpu_totals_mb if total >= preset.vram_mb)
