"""Presets: what a worker is (a process or a container), where it may run, how it batches.

Two rooms: :mod:`gpulane.presets.schema` (the fields, their bounds, sizes) and
:mod:`gpulane.presets.loading` (registry files, every problem with its ``FILE:LINE`` and fix,
the :class:`PresetRegistry`). The rest of gpulane imports the names below from here.
"""

from gpulane.presets.loading import (
    PresetRegistry,
    check_file,
    example_presets_dir,
    load_file,
    load_presets,
)
from gpulane.presets.schema import (
    MAX_GPUS,
    BatchSettings,
    DeviceKind,
    FallbackKind,
    Mode,
    Preset,
    Runtime,
    Serves,
    parse_size_mb,
)

__all__ = [
    "MAX_GPUS",
    "BatchSettings",
    "DeviceKind",
    "FallbackKind",
    "Mode",
    "Preset",
    "PresetRegistry",
    "Runtime",
    "Serves",
    "check_file",
    "example_presets_dir",
    "load_file",
    "load_presets",
    "parse_size_mb",
]
