"""``GET /metrics``: the node's series in Prometheus's text format (docs/metrics.md).

Keyed like the other system reads (``GET /v1/status``): when the node has keys, any valid key
may scrape, sent as ``Authorization: Bearer KEY`` (Prometheus's ``authorization`` block in a
scrape config). The series name the node's presets, lanes, GPUs and leases, the same things
the status view shows, so they are not handed to whoever can reach the port; a node without
keys answers anyone, as every route there does.
"""

from __future__ import annotations

import time

from fastapi import APIRouter, Request, Response

from gpulane.node import Node

router = APIRouter(tags=["system"])

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
"""The Prometheus text exposition format (what ``generate_latest`` writes)."""


@router.get("/metrics", response_class=Response, responses={200: {
    "content": {CONTENT_TYPE: {}},
    "description": "every series of this node, in Prometheus's text format"}})
async def metrics(request: Request) -> Response:
    """This node's metrics: tasks by preset, lane and outcome, durations, queues, workers,
    GPUs, leases, fallbacks, store latency (docs/metrics.md)."""
    node: Node = request.app.state.node
    start = time.perf_counter()
    body = await node.metrics.scrape()
    # The node's own time for the scrape (the rest of a scrape's latency is HTTP's).
    took = f"scrape;dur={(time.perf_counter() - start) * 1000:.3f}"
    return Response(body, media_type=CONTENT_TYPE, headers={"Server-Timing": took})
