"""A draining node of a fleet still queues submits while another node takes work: the queue
is the fleet's, so refusing them would only stall a client tied to this node for the 503's
Retry-After. Alone (or when every other node drains too) it refuses with 503 as before."""

from __future__ import annotations

import time
from pathlib import Path

from gpulane.fleet import NodeInfo
from gpulane.node import Node
from tests.integration.conftest import make_settings, stop_node


def _peer(name: str, *, draining: bool) -> NodeInfo:
    now = time.time()
    return NodeInfo(name=name, url=None, started_at=now, heartbeat_at=now, draining=draining)


async def test_a_draining_node_queues_submits_while_another_node_takes_work(
        tmp_path: Path, redis_url: str) -> None:
    node = Node(make_settings(tmp_path, node_name="a", store=redis_url))
    await node.start()
    try:
        assert node._poller is not None
        node._poller.cancel()  # the registry read of the poll would replace the peers set here
        node.drain()
        spec = node.build_spec(preset="sleep", input={"ms": 1})
        node.fleet_view.others = [_peer("b", draining=True)]
        refused = await node.intake.refusal([spec.preset], bulk=False)
        assert refused is not None and refused.code == "draining"

        node.fleet_view.others = [_peer("b", draining=True), _peer("c", draining=False)]
        task, created = await node.submit(spec)
        assert created and task.state.value == "queued"
    finally:
        await stop_node(node)
