"""gpulane: a safe, fast lane to the GPUs for every app on a machine."""

from __future__ import annotations

__version__ = "0.1.0"
