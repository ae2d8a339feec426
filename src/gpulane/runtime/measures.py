"""What each (preset, lane) costs, as measured on this node: how long a new worker takes to
become ready, and how fast a busy worker drains its queue.

The scheduler reads these to decide whether another worker would pay for its load (a backlog
that one more worker cannot shorten before it is ready is left to the workers there are), and
to tell how long a queued task would wait for a GPU (the busy fallback). Figures are moving
averages, so one slow load or one odd batch moves them only part of the way; a lane never
measured answers None and the reader falls back to its own first guess.
"""

from __future__ import annotations

from dataclasses import dataclass

EMA_ALPHA = 0.3
"""Weight of the newest reading in each moving average."""


@dataclass(slots=True)
class LaneMeasure:
    load_s: float | None = None
    """Spawn to ready of the lane's session workers (moving average)."""
    loads: int = 0
    rate: float | None = None
    """Tasks per second one worker finished, over all its batches (moving average)."""
    full_rate: float | None = None
    """The same over full batches only: the rate of a worker that has a backlog."""
    batches: int = 0

    def to_json(self) -> dict[str, object]:
        return {"load_s": None if self.load_s is None else round(self.load_s, 3),
                "loads": self.loads, "batches": self.batches,
                "tasks_per_s": None if self.drain_rate is None else round(self.drain_rate, 2)}

    @property
    def drain_rate(self) -> float | None:
        """Tasks per second one busy worker of the lane takes off its queue."""
        return self.full_rate if self.full_rate is not None else self.rate


def _ema(old: float | None, new: float) -> float:
    return new if old is None else old + EMA_ALPHA * (new - old)


class LaneMeasures:
    """Per (preset, lane): worker load time and per-worker drain rate."""

    def __init__(self) -> None:
        self.lanes: dict[tuple[str, str], LaneMeasure] = {}

    def get(self, preset: str, lane: str) -> LaneMeasure:
        m = self.lanes.get((preset, lane))
        if m is None:
            m = self.lanes[(preset, lane)] = LaneMeasure()
        return m

    def loaded(self, preset: str, lane: str, seconds: float) -> None:
        """A session worker of the lane became ready ``seconds`` after it was spawned."""
        m = self.get(preset, lane)
        m.load_s = _ema(m.load_s, max(seconds, 0.0))
        m.loads += 1

    def batch(self, preset: str, lane: str, size: int, seconds: float, *, full: bool) -> None:
        """A worker of the lane finished a batch of ``size`` tasks in ``seconds``."""
        if size <= 0 or seconds <= 0:
            return
        m = self.get(preset, lane)
        rate = size / seconds
        m.rate = _ema(m.rate, rate)
        if full:
            m.full_rate = _ema(m.full_rate, rate)
        m.batches += 1

    def load_s(self, preset: str, lane: str) -> float | None:
        m = self.lanes.get((preset, lane))
        return None if m is None else m.load_s

    def drain_rate(self, preset: str, lane: str) -> float | None:
        m = self.lanes.get((preset, lane))
        return None if m is None else m.drain_rate

    def forget(self, preset: str) -> None:
        """A preset reloaded with new settings: its old figures no longer hold."""
        for key in [k for k in self.lanes if k[0] == preset]:
            del self.lanes[key]
