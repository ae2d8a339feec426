"""The warm-first window holds a queue head back at most ``warm_window_s`` from when this node
first left it, whatever clock stamped the task's id: a submitting node whose clock runs an
hour ahead does not keep the head from every cold node for an hour."""

from __future__ import annotations

import time
from pathlib import Path

from gpulane.node import Node
from gpulane.scheduling.router import GPU_LANE
from gpulane.store.base import QueueHead
from tests.conftest import eventually
from tests.integration.conftest import make_settings


def _id_stamped(at: float) -> str:
    """A task id as store/base.py stamps it: the first 12 hex digits its creation in ms."""
    return f"{int(at * 1000):012x}" + "0" * 12


async def test_a_head_stamped_ahead_is_left_no_longer_than_the_window(tmp_path: Path) -> None:
    scheduler = Node(make_settings(tmp_path)).scheduler
    scheduler.warm_elsewhere = lambda preset, lane: True
    scheduler.warm_window_s = 0.2
    preset = scheduler.registry["sleep"]
    ahead = QueueHead("sleep", GPU_LANE, 50, 1, _id_stamped(time.time() + 3600))
    assert scheduler._left_to_warm(preset, ahead)  # young: left to the warm node

    async def not_left_any_more() -> bool:
        return not scheduler._left_to_warm(preset, ahead)
    await eventually(not_left_any_more, timeout=5)
    # A head stamped by an agreeing clock is left as before, until its own window ends.
    fresh = QueueHead("sleep", GPU_LANE, 50, 2, _id_stamped(time.time()))
    assert scheduler._left_to_warm(preset, fresh)
    if scheduler._window_wake is not None:
        scheduler._window_wake.cancel()
