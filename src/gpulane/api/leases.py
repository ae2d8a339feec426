"""Lease endpoints: outside services take, renew and release GPU capacity, and watch it.

A lease's fencing token is its holder's secret: it is in the 201 answer to the acquire and
nowhere else (listings, reads and renew/release answers show holder, owner, devices and
priority, never the token). A lease belongs to the key that took it: another key may read it
but not renew or release it (403), an admin key aside.

In a fleet any node answers for any lease: a lease names its ``node`` (the one whose GPUs it
holds), an acquire may name the node it wants, and renew, release and the event stream work
through every node (the node routes them to the lease's own).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Awaitable
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Header, Request
from fastapi.responses import StreamingResponse

from gpulane.api.auth import caller, check_owner
from gpulane.api.bodies import read_body
from gpulane.api.requests import (
    EVENT_ID_PATTERN,
    LEASE_EXAMPLE,
    RELEASE_TOKEN_FIX,
    LeaseBody,
    LeaseTokenHeader,
    LeaseTokenQuery,
    RenewBody,
)
from gpulane.api.responses import JSON
from gpulane.api.tasks import SSE_KEEPALIVE_S, errors, json_body
from gpulane.errors import ValidationError
from gpulane.node import Node

router = APIRouter(prefix="/v1/leases", tags=["leases"])

CLIENT_CLOSED = 499
"""The status of an answer to a client that left (nginx's convention: nobody reads it)."""

_EVENT_ID = re.compile(EVENT_ID_PATTERN)
"""A Last-Event-ID to resume after (ASCII digits only: isdigit() also takes "²", and int()
refuses it, or more than 4300 digits, with a ValueError, a 500)."""


def _node(request: Request) -> Node:
    node: Node = request.app.state.node
    return node


async def _owned(request: Request, lease_id: str) -> None:
    """403 unless the caller took the lease (or is admin); 404 for an unknown lease."""
    if caller(request) is not None:
        lease = await _node(request).lease(lease_id)
        check_owner(request, lease["owner"], f"lease {lease_id}")


@router.post("", status_code=201, responses=errors(400, 404, 408, 413, 422),
             openapi_extra=json_body("LeaseBody"))
async def acquire(request: Request) -> JSON:
    """Take a lease: ``{holder, vram_mb | gpus, device?, node?, priority, ttl_s, wait_s,
    preemptible, grace_s}``. 201 with the granted lease, or 408 after wait_s with the
    holders."""
    body = await read_body(request, LeaseBody, LEASE_EXAMPLE)
    who = caller(request)
    lease = await _unless_caller_leaves(request, _node(request).acquire_lease(
        holder=body.holder, vram_mb=body.vram_mib(), gpus=body.gpus, device=body.device,
        priority=int(body.priority), ttl_s=float(body.ttl_s), preemptible=body.preemptible,
        grace_s=float(body.grace_s), wait_s=float(body.wait_s),
        owner=who.name if who is not None else None, node=body.node))
    if lease is None:  # nobody reads this answer
        return JSON({"error": {"code": "client_closed", "message": "the client left before "
                               "the lease was granted: it was called off", "field": None}},
                    status_code=CLIENT_CLOSED)
    # The one answer that carries the token: renew and release need it.
    return JSON(lease, status_code=201)


async def _unless_caller_leaves(request: Request, work: Awaitable[dict[str, Any]]
                                ) -> dict[str, Any] | None:
    """``work``'s answer, or None once the client has gone (``work`` is then cancelled: a
    lease granted after its caller left would be held by nobody until its ttl_s; the node
    ends it, and a forwarded acquire is called off on its node)."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnect(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not task.done():
            task.cancel()
        gone.cancel()
        await asyncio.gather(task, gone, return_exceptions=True)
    if task.cancelled():
        return None
    return task.result()


async def _disconnect(request: Request) -> None:
    """Return when the client disconnects (its body is read: the next message says so)."""
    message = await request.receive()
    while message["type"] != "http.disconnect":
        message = await request.receive()


@router.get("")
async def list_leases(request: Request) -> JSON:
    """Leases that are waiting or held (holders, owners, devices; never a token)."""
    return JSON({"leases": await _node(request).fleet_active_leases()})


@router.get("/{lease_id}", responses=errors(404))
async def get_lease(request: Request, lease_id: str) -> JSON:
    return JSON(await _node(request).lease(lease_id))


@router.post("/{lease_id}/renew", responses=errors(403, 404, 409, 413, 422),
             openapi_extra=json_body("RenewBody"))
async def renew(request: Request, lease_id: str) -> JSON:
    """Push the lease's expiry ttl_s into the future; 409 if the token no longer holds it."""
    await _owned(request, lease_id)
    body = await read_body(request, RenewBody, '{"token": 123}')
    return JSON(await _node(request).renew_lease(lease_id, body.token))


@router.delete("/{lease_id}", responses=errors(403, 404, 409, 422))
async def release(request: Request, lease_id: str, token: LeaseTokenQuery = None,
                  x_lease_token: LeaseTokenHeader = None) -> JSON:
    """Give the capacity back. The token comes as ?token= or an X-Lease-Token header."""
    given = token if token is not None else x_lease_token
    if given is None:
        code, message = RELEASE_TOKEN_FIX
        raise ValidationError(code, message.format(), field="token")
    await _owned(request, lease_id)
    return JSON(await _node(request).release_lease(lease_id, given))


@router.get("/{lease_id}/events", responses={
    200: {"content": {"text/event-stream": {}}, "description": "Server-Sent Events"},
    **errors(404)})
async def lease_events(request: Request, lease_id: str, last_event_id: Annotated[
        str | None, Header(alias="Last-Event-ID", description=(
            "resume after this event number; anything else starts from the first"))] = None,
                       ) -> StreamingResponse:
    """The lease's events (granted, preempt, resume, released, expired, revoked) as SSE."""
    node = _node(request)
    await node.lease(lease_id)  # 404 before the stream starts
    after = int(last_event_id) if last_event_id and _EVENT_ID.match(last_event_id) else 0
    return StreamingResponse(_sse(node, lease_id, after), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache"})


async def _sse(node: Node, lease_id: str, after: int) -> AsyncIterator[bytes]:
    async for batch in node.follow_lease(lease_id, after, SSE_KEEPALIVE_S):
        if not batch:
            yield b": keep-alive\n\n"
            continue
        for e in batch:
            yield b"id: %d\nevent: %s\ndata: %s\n\n" % (e["id"], e["event"].encode(),
                                                       orjson.dumps(e["data"]))
