"""gpulane: a safe, fast lane to the GPUs for every app on a machine.

The public names are the SDK's clients and the error tree; everything else is reached through
its module (``gpulane.presets``, ``gpulane.worker``, ...).
"""

from __future__ import annotations

import typing

from gpulane.errors import (
    APIError,
    CircuitOpenError,
    ClientError,
    GpulaneError,
    LeasePreempted,
    TaskFailedError,
    TransportError,
)

# ``typing`` as a module, not ``from typing import ...``: only the names in __all__ live here.
if typing.TYPE_CHECKING:
    from gpulane.client import AsyncClient, Client

__version__ = "0.1.0"

_LAZY = ("AsyncClient", "Client")
"""Imported on first use: the clients pull in httpx; a worker (``import gpulane.worker``)
needs none of it, and saves a fifth of a second per start by not importing it."""


def __getattr__(name: str) -> object:
    if name in _LAZY:
        from gpulane import client

        return getattr(client, name)
    raise AttributeError(f"module 'gpulane' has no attribute {name!r}")


def __dir__() -> list[str]:
    # What the namespace holds, plus the clients it imports on first use.
    return sorted({*globals(), *_LAZY})


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
