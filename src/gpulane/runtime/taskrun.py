"""One attempt of one task on one worker: what it has said so far and what it will store."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from gpulane.model import Task
from gpulane.presets import Preset
from gpulane.protocol import EventType, WorkerMessage
from gpulane.runtime.items import items_of
from gpulane.store import NewEvent

_UNSET: Any = object()

# Events held back until the task finishes, then written in the same transaction as the
# finish: they are final values, not live progress, so nobody waits on them earlier.
_HELD = frozenset({EventType.RESULT, EventType.TEXT})


@dataclass(eq=False, slots=True)
class TaskRun:
    """The runtime's view of a task attempt between dispatch and finish."""

    task: Task
    preset: Preset
    worker_id: str
    token: int
    timeout_s: float
    held: list[NewEvent] = field(default_factory=list)
    output: Any = _UNSET
    text: str | None = None
    deltas: list[str] = field(default_factory=list)
    done: bool = False  # let go of by its worker (only Worker.release and close set it)
    cancelled: bool = False  # stored as cancelled; its worker may still be working on it
    store_failed: bool = False  # a streamed event of it could not be stored (logged once)

    @property
    def id(self) -> str:
        return self.task.id

    @property
    def items(self) -> int:
        """What it counts towards its batch (runtime/items.py)."""
        return items_of(self.task.input)

    def take(self, msg: WorkerMessage) -> tuple[NewEvent | None, bool]:
        """Record a message; returns (event to write now or None, whether it is held)."""
        event = NewEvent(msg.type.value, msg.data)
        if msg.type is EventType.RESULT:
            self.output = msg.data.get("output")
        elif msg.type is EventType.TEXT:
            self.text = str(msg.data.get("content", ""))
        elif msg.type is EventType.TEXT_DELTA:
            self.deltas.append(str(msg.data.get("delta", "")))
        if msg.type in _HELD:
            self.held.append(event)
            return None, True
        return event, False

    def final_output(self) -> Any:
        """The task's output: the result event's, else the final text, else the streamed text."""
        if self.output is not _UNSET:
            return self.output
        if self.text is not None:
            return {"text": self.text}
        if self.deltas:
            return {"text": "".join(self.deltas)}
        return None
