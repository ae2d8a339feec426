"""The node's session workers grouped by (preset, lane), taken in one scan for one pass.

A scheduler pass asks, for every queue it might serve, whether a worker there has a batch
forming, is idle, or has room in its next batch (Supervisor.forming_worker, idle_worker,
next_batch_worker). Asked one queue at a time, each question scans every worker; a pass over
twenty queues then costs a hundred scans before it places anything. ``lane_states`` answers
all of them from one scan, with the same rules as those queries.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from gpulane.runtime.view import WorkerView
from gpulane.runtime.worker import Worker
from gpulane.runtime.worker_process import WorkerState


@dataclass(slots=True)
class LaneState:
    """What the live session workers of one (preset, lane) offer now."""

    live: list[WorkerView] = field(default_factory=list)
    """Live session workers (Supervisor.session_workers)."""
    forming: bool = False
    """One has a batch waiting to fill with room left (Supervisor.forming_worker)."""
    idle: bool = False
    """One holds nothing (Supervisor.idle_worker)."""
    next_room: bool = False
    """A busy one's next batch is open and has room (Supervisor.next_batch_worker)."""


def lane_states(workers: Iterable[Worker]) -> dict[tuple[str, str], LaneState]:
    """(preset, lane) -> its LaneState, for every lane with a live session worker."""
    out: dict[tuple[str, str], LaneState] = {}
    for w in workers:
        if not w.session or not w.alive:
            continue
        key = (w.preset_name, w.device.kind)
        st = out.get(key)
        if st is None:
            st = out[key] = LaneState()
        st.live.append(w)
        if not w.runs:
            st.idle = True
        if forming_room(w) > 0:
            st.forming = True
        if next_room(w) > 0:
            st.next_room = True
    return out


def forming_room(w: Worker) -> int:
    """How many more tasks the batch ``w`` forms (max_wait_ms) takes; 0 when none forms."""
    return w.batch_size - len(w.runs) if w.forming is not None else 0


def next_room(w: Worker) -> int:
    """How many more tasks a busy ``w``'s open next batch takes (Pipeline.dispatch); 0 when
    it has none open."""
    if w.next_open and w.state is WorkerState.BUSY and not w.preempted:
        return w.batch_size - len(w.next)
    return 0
