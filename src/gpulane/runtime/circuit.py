"""A circuit per preset that stops a worker which cannot start from being started in a loop.

A worker that exits or times out before it is ready (its load() raised, its image is missing,
a weight file is corrupt) fails the attempts it held; the task gets retried, and a new worker
would be started for the retry, and fail the same way. After ``threshold`` start failures in a
row the preset's circuit opens: no new worker of it starts for ``cooldown_s`` (doubling on each
failed probe, up to ``max_cooldown_s``), and its queued tasks wait instead of burning their
attempts. Then one worker is let through as a probe: ready closes the circuit, another failure
opens it again. The last failure's message (the worker's stderr tail, the traceback of its
load()) is kept for /v1/presets.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

START_FAILURE_THRESHOLD = 3
COOLDOWN_S = 10.0
MAX_COOLDOWN_S = 300.0


@dataclass(slots=True)
class PresetCircuit:
    threshold: int = START_FAILURE_THRESHOLD
    cooldown_s: float = COOLDOWN_S
    max_cooldown_s: float = MAX_COOLDOWN_S
    failures: int = 0  # start failures in a row
    opened: int = 0  # times opened in a row (sets the cooldown)
    open_until: float = 0.0  # monotonic
    probing: bool = False
    last_error: str | None = None

    def allows_start(self, now: float | None = None) -> bool:
        """Whether a new worker may start now (one probe at a time once the cooldown ends)."""
        if self.failures < self.threshold:
            return True
        return not self.probing and (time.monotonic() if now is None else now) >= self.open_until

    def is_open(self, now: float | None = None) -> bool:
        """Open and cooling down: not closed, and not half-open (a probe may start, or one
        is starting), when new tasks go back to this lane to meet the probe."""
        return (self.failures >= self.threshold and not self.probing
                and (time.monotonic() if now is None else now) < self.open_until)

    def starting(self) -> None:
        """A worker is being started: past the threshold it is the one probe."""
        if self.failures >= self.threshold:
            self.probing = True

    def started(self) -> None:
        """A worker became ready: the preset works."""
        self.failures = self.opened = 0
        self.probing = False
        self.open_until = 0.0

    def failed(self, message: str, now: float | None = None) -> bool:
        """A worker failed to start; True when this opened (or reopened) the circuit."""
        self.failures += 1
        self.last_error = message
        self.probing = False
        if self.failures < self.threshold:
            return False
        cooldown = min(self.max_cooldown_s, self.cooldown_s * (2 ** self.opened))
        self.opened += 1
        self.open_until = (time.monotonic() if now is None else now) + cooldown
        return True

    def to_json(self, now: float | None = None) -> dict[str, object]:
        t = time.monotonic() if now is None else now
        state = ("closed" if self.failures < self.threshold
                 else "half_open" if self.probing or t >= self.open_until else "open")
        return {"state": state, "start_failures": self.failures,
                "retry_in_s": round(max(0.0, self.open_until - t), 1) if state == "open"
                else None, "last_error": self.last_error}
