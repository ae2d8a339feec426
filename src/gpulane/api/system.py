"""Node-wide endpoints: presets, content-type routes, GPUs (of every node of the fleet),
nodes, workers, health and readiness."""

from __future__ import annotations

from fastapi import APIRouter, Request

from gpulane import __version__
from gpulane.api.responses import JSON
from gpulane.node import Node

router = APIRouter(tags=["system"])


def _node(request: Request) -> Node:
    node: Node = request.app.state.node
    return node


@router.get("/v1/presets")
async def presets(request: Request) -> JSON:
    """Every preset this node can run, with the state of its circuit."""
    return JSON({"presets": _node(request).presets_view()})


@router.get("/v1/routes")
async def routes(request: Request) -> JSON:
    """The content-type routes of the preset registry, most specific first: a submit with a
    ``content_type`` and no ``preset`` goes to the first whose pattern matches."""
    return JSON({"routes": _node(request).registry.routes.view()})


@router.get("/v1/gpus")
async def gpus(request: Request) -> JSON:
    """Devices as this node sees them, what gpulane has placed on each, and the CPU pool;
    ``nodes``: every live node of the fleet (this one included) with its devices, CPU pool,
    warm presets and running count."""
    return JSON(await _node(request).fleet_gpus_view())


@router.get("/v1/nodes")
async def nodes(request: Request) -> JSON:
    """Every live node of the fleet: name, url, heartbeat age, draining, devices, warm
    presets (``preset/lane`` of its idle workers), running tasks."""
    return JSON({"nodes": await _node(request).nodes_view()})


@router.get("/v1/workers")
async def workers(request: Request) -> JSON:
    """Live workers: preset, device, state, pid, tasks done, idle time."""
    return JSON({"workers": _node(request).workers_view()})


@router.get("/healthz")
async def healthz() -> JSON:
    """The process is up."""
    return JSON({"status": "ok", "version": __version__})


@router.get("/readyz", responses={503: {
    "description": "the node is starting or draining, or its store cannot be reached"}})
async def readyz(request: Request) -> JSON:
    """The node is started, not draining, and its store answers."""
    node = _node(request)
    if not node.started:
        return JSON({"status": "starting"}, status_code=503)
    if node.draining:
        return JSON({"status": "draining", "node": node.name}, status_code=503)
    return JSON({"status": "ready", "node": node.name, "queued": await node.queued_count()})
