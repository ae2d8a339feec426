"""Lease endpoints: outside services take, renew and release GPU capacity, and watch it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from gpulane.api.responses import JSON
from gpulane.api.tasks import SSE_KEEPALIVE_S, read_json
from gpulane.errors import ValidationError
from gpulane.node import Node
from gpulane.scheduling.leases import LeaseManager

router = APIRouter(prefix="/v1/leases", tags=["leases"])


def _leases(request: Request) -> LeaseManager:
    node: Node = request.app.state.node
    return node.leases


async def _body(request: Request) -> dict[str, Any]:
    body = await read_json(request)
    if not isinstance(body, dict):
        raise ValidationError("invalid_body", "the body must be a JSON object", field="body")
    return body


def _token(body: dict[str, Any]) -> object:
    if "token" not in body:
        raise ValidationError("missing_field", "token is required: send the token the grant "
                              "returned", field="token")
    return body["token"]


@router.post("", status_code=201)
async def acquire(request: Request) -> JSON:
    """Take a lease: ``{holder, vram_mb | gpus, device?, priority, ttl_s, wait_s, preemptible,
    grace_s}``. 201 with the granted lease, or 408 after wait_s with the holders."""
    leases = _leases(request)
    req, wait_s = leases.validate(await _body(request))
    lease = await leases.acquire(req, wait_s)
    return JSON(lease.to_json(), status_code=201)


@router.get("")
async def list_leases(request: Request) -> JSON:
    """Leases that are waiting or held."""
    return JSON({"leases": [lz.to_json() for lz in _leases(request).active()]})


@router.get("/{lease_id}")
async def get_lease(request: Request, lease_id: str) -> JSON:
    return JSON(_leases(request).get(lease_id).to_json())


@router.post("/{lease_id}/renew")
async def renew(request: Request, lease_id: str) -> JSON:
    """Push the lease's expiry ttl_s into the future; 409 if the token no longer holds it."""
    body = await _body(request)
    return JSON(_leases(request).renew(lease_id, _token(body)).to_json())


@router.delete("/{lease_id}")
async def release(request: Request, lease_id: str, token: str | None = None) -> JSON:
    """Give the capacity back. The token comes as ?token= or an X-Lease-Token header."""
    raw = token or request.headers.get("x-lease-token")
    if raw is None or not raw.lstrip("-").isdigit():
        raise ValidationError("missing_field", "token is required: DELETE "
                              "/v1/leases/{id}?token=<the grant's token>", field="token")
    return JSON(_leases(request).release(lease_id, int(raw)).to_json())


@router.get("/{lease_id}/events")
async def lease_events(request: Request, lease_id: str) -> StreamingResponse:
    """The lease's events (granted, preempt, resume, released, expired, revoked) as SSE."""
    leases = _leases(request)
    leases.get(lease_id)
    raw = request.headers.get("last-event-id") or "0"
    after = int(raw) if raw.isdigit() else 0
    return StreamingResponse(_sse(leases, lease_id, after), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache"})


async def _sse(leases: LeaseManager, lease_id: str, after: int) -> AsyncIterator[bytes]:
    while True:
        seen = leases.notifier.version(lease_id)
        lease = leases.get(lease_id)
        fresh = lease.events[after:]
        for e in fresh:
            after = e["id"]
            yield b"id: %d\nevent: %s\ndata: %s\n\n" % (e["id"], e["event"].encode(),
                                                       orjson.dumps(e["data"]))
        if lease.state.final and after >= len(lease.events) and not lease.awaiting_resume:
            return  # a preempted holder's stream stays open until its 'resume'

        if not await leases.notifier.wait(lease_id, seen, SSE_KEEPALIVE_S):
            yield b": keep-alive\n\n"
