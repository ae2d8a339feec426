"""``client.gpu(...)``: hold a GPU lease for the length of a ``with`` block.

The lease is renewed in the background (more often than its TTL needs, so a preempt is seen
within about a second), released on exit, and on preemption either the ``on_preempt``
callback runs or the block is interrupted with LeasePreempted (async; the sync twin raises at
``check()`` or on exit, since a thread cannot be interrupted safely).

A lease is handed its client's ``_call`` (one request in, the answer's JSON out, retried and
guarded by the breaker), not the client: this module needs nothing else of it, so the clients
import the leases and never the other way round.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import threading
from collections.abc import Awaitable, Callable
from typing import Any, Literal

from gpulane.client import _core as core
from gpulane.errors import APIError, ClientError, LeasePreempted

JSON = dict[str, Any]
PreemptCallback = Callable[[JSON], Any]
SyncCall = Callable[[core.Request], JSON]
"""``Client._call``: one request, retried and guarded by the breaker; the answer's JSON."""
AsyncCall = Callable[[core.Request], Awaitable[JSON]]
"""``AsyncClient._call``, the same for asyncio."""
POLL_MAX_S = 1.0
"""Renewals come at least this often, so a preempt is noticed within about this long."""


def acquire_request(vram: str | int | None, gpus: int, priority: str | int, holder: str,
                    ttl_s: float, wait_s: float, grace_s: float, preemptible: bool,
                    device: int | None, node: str | None = None) -> core.Request:
    body: JSON = {"holder": holder, "priority": priority, "ttl_s": ttl_s, "wait_s": wait_s,
                  "grace_s": grace_s, "preemptible": preemptible}
    if gpus:
        body["gpus"] = gpus
    if vram is not None:
        body["vram_mb"] = vram
    if device is not None:
        body["device"] = device
    if node is not None:
        body["node"] = node  # a fleet's node whose GPUs to lease (else any that can)
    # Not idempotent: a retried acquire could take a second lease.
    return core.Request("POST", "/v1/leases", json=body, hold_s=wait_s, idempotent=False)


def renew_request(lease: JSON) -> core.Request:
    return core.Request("POST", f"/v1/leases/{lease['id']}/renew",
                        json={"token": lease["token"]})


def release_request(lease: JSON) -> core.Request:
    return core.Request("DELETE", f"/v1/leases/{lease['id']}",
                        params={"token": str(lease["token"])})


def _interval(lease: JSON) -> float:
    return max(0.05, min(float(lease["ttl_s"]) / 3, float(lease["grace_s"]) / 2, POLL_MAX_S))


def _after_renew(lease: JSON, fresh: JSON) -> JSON | None:
    """The lease as a renewal left it: None while it is still held, else its new view."""
    if fresh.get("state") == "granted":
        return None
    return {**lease, **fresh, "token": lease["token"]}


def _lost(lease: JSON) -> JSON:
    """A renewal refused with 409: the lease expired or was revoked."""
    return {**lease, "state": "lost"}


class AsyncGpuLease:
    """``async with client.gpu(vram="4GiB") as lease:`` — see the module docstring."""

    def __init__(self, call: AsyncCall, request: core.Request,
                 on_preempt: PreemptCallback | None) -> None:
        self._call = call
        self._request = request
        self._on_preempt = on_preempt
        self.lease: JSON = {}
        self.preempted = False
        self._renewer: asyncio.Task[None] | None = None
        self._owner: asyncio.Task[Any] | None = None

    @property
    def cuda_visible_devices(self) -> str:
        return str(self.lease.get("cuda_visible_devices", ""))

    @property
    def device(self) -> str:
        """What to hand torch: ``cuda:0`` once CUDA_VISIBLE_DEVICES is set to the lease's."""
        return f"cuda:{self.lease['device']}"

    async def __aenter__(self) -> AsyncGpuLease:
        self.lease = await self._call(self._request)
        self._owner = asyncio.current_task()
        self._renewer = asyncio.create_task(self._renew_loop())
        return self

    async def _renew_loop(self) -> None:
        while True:
            await asyncio.sleep(_interval(self.lease))
            try:
                fresh = await self._call(renew_request(self.lease))
            except APIError:
                fresh = _lost(self.lease)
            except ClientError:
                continue  # a blip: the TTL leaves room for the next try
            ended = _after_renew(self.lease, fresh)
            if ended is None:
                continue
            self.lease, self.preempted = ended, True
            if self._on_preempt is not None:
                result = self._on_preempt(self.lease)
                if inspect.isawaitable(result):
                    await result
            elif self._owner is not None:
                self._owner.cancel()
            return

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: object) -> Literal[False]:
        if self._renewer is not None:
            self._renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewer
        with contextlib.suppress(ClientError):
            await self._call(release_request(self.lease))
        if (self.preempted and self._on_preempt is None and exc_type is asyncio.CancelledError
                and self._owner is not None and self._owner.uncancel() == 0):
            raise LeasePreempted(self.lease) from exc
        return False


class GpuLease:
    """The sync twin: ``with client.gpu(vram="4GiB") as lease:``."""

    def __init__(self, call: SyncCall, request: core.Request,
                 on_preempt: PreemptCallback | None) -> None:
        self._call = call
        self._request = request
        self._on_preempt = on_preempt
        self.lease: JSON = {}
        self.preempted = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def cuda_visible_devices(self) -> str:
        return str(self.lease.get("cuda_visible_devices", ""))

    def check(self) -> None:
        """Raise LeasePreempted if the lease is gone; call it between steps of long work."""
        if self.preempted:
            raise LeasePreempted(self.lease)

    def __enter__(self) -> GpuLease:
        self.lease = self._call(self._request)
        self._thread = threading.Thread(target=self._renew_loop, daemon=True,
                                        name=f"gpulane-lease-{self.lease['id']}")
        self._thread.start()
        return self

    def _renew_loop(self) -> None:
        while not self._stop.wait(_interval(self.lease)):
            try:
                fresh = self._call(renew_request(self.lease))
            except APIError:
                fresh = _lost(self.lease)
            except ClientError:
                continue
            ended = _after_renew(self.lease, fresh)
            if ended is None:
                continue
            self.lease, self.preempted = ended, True
            if self._on_preempt is not None:
                self._on_preempt(self.lease)
            return

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with contextlib.suppress(ClientError):
            self._call(release_request(self.lease))
        if self.preempted and self._on_preempt is None and exc_type is None:
            raise LeasePreempted(self.lease)
