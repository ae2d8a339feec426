"""gpulane: a safe, fast lane to the GPUs for every app on a machine.

The public names are the SDK's clients and the error tree; everything else is reached through
its module (``gpulane.presets``, ``gpulane.worker``, ...).
"""

from __future__ import annotations

from gpulane.client import AsyncClient, Client
from gpulane.errors import (
    APIError,
    CircuitOpenError,
    ClientError,
    GpulaneError,
    LeasePreempted,
    TaskFailedError,
    TransportError,
)

__version__ = "0.1.0"

__all__ = [
    "APIError",
    "AsyncClient",
    "CircuitOpenError",
    "Client",
    "ClientError",
    "GpulaneError",
    "LeasePreempted",
    "TaskFailedError",
    "TransportError",
    "__version__",
]
