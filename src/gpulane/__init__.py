"""gpulane: a safe, fast lane to the GPUs for every app on a machine.

The public names are the SDK's clients and the error tree; everything else is reached through
its module (``gpulane.presets``, ``gpulane.worker``, ...).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from gpulane.errors import (
    APIError,
    CircuitOpenError,
    ClientError,
    GpulaneError,
    LeasePreempted,
    TaskFailedError,
    TransportError,
)

if TYPE_CHECKING:
    from gpulane.client import AsyncClient, Client

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # The clients pull in httpx; a worker (``import gpulane.worker``) needs none of it, and
    # saves a fifth of a second per start by not importing it.
    if name in ("AsyncClient", "Client"):
        from gpulane import client

        return getattr(client, name)
    raise AttributeError(f"module 'gpulane' has no attribute {name!r}")

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
