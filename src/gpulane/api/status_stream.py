"""``GET /v1/status/stream``: the status view as Server-Sent Events, for the dashboard.

Every ``interval_s`` one ``status`` event carries ``GET /v1/status`` (scheduling/status.py
through ``node.status_view``), the fleet's nodes, this node's workers with their batching,
and, when the caller's key has the scope (or the node has no keys), the newest tasks in brief
(``tasks``: no inputs or outputs, which are the submitter's and may be large) and the waiting
and held leases (``leases``). A key without the scope gets ``null`` there: the stream shows
nothing its routes would refuse.

Bounded: a body is built only after the one before it was handed to the connection, so a slow
reader holds one body, never a queue of them; at most :data:`MAX_STREAMS` streams run at
once per app (503 with Retry-After beyond that), each giving its slot back however its answer
ends; a stream ends when its client leaves (Starlette cancels the answer on the disconnect),
and after one status once the node drains to exit (else an open dashboard would keep the
server from exiting).

The page reads this stream with ``fetch()`` rather than ``EventSource``, so it can send the key
in the Authorization header (docs/dashboard.md says why that over a ticket in the URL).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Query, Request
from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from gpulane.api.auth import caller
from gpulane.api.tasks import errors
from gpulane.errors import UnavailableError
from gpulane.node import Node

router = APIRouter(tags=["system"])

MAX_STREAMS = 32
"""Status streams one app serves at once (each costs a status view per interval)."""
RECENT_TASKS = 20
"""How many of the newest tasks a status event lists."""
DEFAULT_INTERVAL_S = 1.0
"""Seconds between two status events unless the client asks otherwise."""
BUSY_RETRY_S = 5
"""Retry-After of the 503 when every stream slot is taken."""

IntervalQuery = Annotated[float, Query(
    ge=0.5, le=10.0, description="seconds between two status events (0.5 to 10)")]


class StreamSlots:
    """Counts the status streams that run, against MAX_STREAMS."""

    def __init__(self, limit: int = MAX_STREAMS) -> None:
        self.limit = limit
        self.open = 0

    def take(self) -> None:
        if self.open >= self.limit:
            raise UnavailableError(
                "too_many_streams", f"this node already serves {self.limit} status streams: "
                f"retry after {BUSY_RETRY_S} s, or close a dashboard tab", field=None,
                headers={"Retry-After": str(BUSY_RETRY_S)})
        self.open += 1

    def give(self) -> None:
        self.open -= 1


class SlotStream(StreamingResponse):
    """A streaming answer that gives its slot back when it ends, however it ends (a
    generator's own ``finally`` would not run if the client left before its first step)."""

    def __init__(self, content: AsyncIterator[bytes], room: StreamSlots,
                 headers: dict[str, str]) -> None:
        super().__init__(content, media_type="text/event-stream", headers=headers)
        self.room = room

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.room.give()


def slots(request: Request) -> StreamSlots:
    """The app's stream slots (made on first use)."""
    found: StreamSlots | None = getattr(request.app.state, "status_streams", None)
    if found is None:
        found = request.app.state.status_streams = StreamSlots()
    return found


def task_brief(task: dict[str, Any]) -> dict[str, Any]:
    """A task as the dashboard lists it: who, where, how far; no input or output."""
    error = task.get("error") or None
    return {"id": task["id"], "preset": task["preset"], "state": task["state"],
            "attempts": task["attempts"], "placement": task["placement"],
            "created_at": task["created_at"], "started_at": task["started_at"],
            "finished_at": task["finished_at"],
            "error": None if error is None else {"code": error.get("code"),
                                                 "kind": error.get("kind")}}


async def stream_body(node: Node, *, tasks: bool, leases: bool) -> dict[str, Any]:
    """One status event's data."""
    status, nodes = await asyncio.gather(node.status_view(), node.nodes_view())
    body: dict[str, Any] = {"at": round(time.time(), 3), "status": status, "nodes": nodes,
                            "workers": node.workers_view(), "tasks": None, "leases": None}
    if tasks:
        recent, _ = await node.list_tasks(None, None, RECENT_TASKS, None)
        body["tasks"] = [task_brief(t.to_json()) for t in recent]
    if leases:
        body["leases"] = await node.fleet_active_leases()
    return body


@router.get("/v1/status/stream", responses={
    200: {"content": {"text/event-stream": {}}, "description": "Server-Sent Events"},
    **errors(422, 503)})
async def status_stream(request: Request,
                        interval_s: IntervalQuery = DEFAULT_INTERVAL_S) -> StreamingResponse:
    """``GET /v1/status`` as Server-Sent Events, one ``status`` event every ``interval_s``:
    ``{at, status, nodes, workers, tasks, leases}``; ``tasks`` (the newest, in brief) and
    ``leases`` are null for a key without the tasks or leases scope. 503 when the node already
    serves its most streams."""
    node: Node = request.app.state.node
    who = caller(request)
    room = slots(request)
    room.take()
    return SlotStream(
        _events(node, interval_s, tasks=who is None or who.allows("tasks"),
                leases=who is None or who.allows("leases")),
        room, headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})


async def _events(node: Node, interval_s: float, *, tasks: bool,
                  leases: bool) -> AsyncIterator[bytes]:
    yield b"retry: 2000\n\n"
    while True:
        body = await stream_body(node, tasks=tasks, leases=leases)
        yield b"event: status\ndata: %s\n\n" % orjson.dumps(body)
        if node.drains.exiting:
            # The server waits for open answers before it exits: a stream that never ends
            # would hold a drain to exit (SIGTERM) forever. The page reconnects and gets one
            # status (draining) a time, until the node is gone.
            return
        await asyncio.sleep(interval_s)
