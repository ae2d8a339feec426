"""How ``gpulane run`` shows a task's ``progress`` events: a Rich progress bar on a terminal,
one plain line per event when stdout is piped or redirected.

A ``progress`` event's fields are free (docs/protocol.md); these are understood:
``{"done": 3, "total": 10}`` (a count), ``{"fraction": 0.3}``, and ``{"progress": ...}`` or
``{"pct": ...}`` (a fraction up to 1, else a percentage); ``message`` is shown beside. An event
with none of them leaves the bar as it was and still shows its message.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    Progress,
    TaskID,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.text import Text

PERCENT_TOTAL = 100.0
"""The bar's total for an event that gives a fraction or a percentage, not a count."""


def _console() -> Console:
    return Console(highlight=False)


# Tests replace this with a Console(force_terminal=True) to take the terminal path.
console_factory: Callable[[], Console] = _console


def _number(value: Any) -> float | None:
    # bool is an int to Python, and never a progress figure.
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) \
        else None


def measure(data: dict[str, Any]) -> tuple[float, float] | None:
    """``(completed, total)`` from a progress event's data, or None if it gives neither."""
    done, total = _number(data.get("done")), _number(data.get("total"))
    if done is not None and total is not None and total > 0:
        return min(max(done, 0.0), total), total
    fraction = _number(data.get("fraction"))
    if fraction is None:
        value = _number(data.get("progress", data.get("pct")))
        if value is not None:
            fraction = value if value <= 1 else value / 100
    if fraction is None:
        return None
    return min(max(fraction, 0.0), 1.0) * PERCENT_TOTAL, PERCENT_TOTAL


def count(data: dict[str, Any]) -> str:
    """``3/10`` for an event that counts, else empty."""
    done, total = _number(data.get("done")), _number(data.get("total"))
    return f"{done:g}/{total:g}" if done is not None and total is not None and total > 0 \
        else ""


def describe(data: dict[str, Any]) -> str | None:
    """One plain line for a progress event (``progress 3/10 30% message``), or None when it
    holds nothing this understands (the caller then shows its fields)."""
    parts = [count(data)] if count(data) else []
    measured = measure(data)
    if measured is not None:
        parts.append(f"{measured[0] / measured[1] * 100:.0f}%")
    if data.get("message"):
        parts.append(str(data["message"]))
    return "progress " + " ".join(parts) if parts else None


class ProgressBar:
    """One task's progress bar on a terminal Console, started at its first progress event.

    While it is drawn, other lines go through :meth:`note` (printed above it); :meth:`stop`
    leaves the bar's last state on screen.
    """

    def __init__(self, console: Console) -> None:
        self.console = console
        self._progress: Progress | None = None
        self._task: TaskID | None = None

    @property
    def active(self) -> bool:
        return self._progress is not None

    def update(self, data: dict[str, Any]) -> None:
        """Move the bar to what a progress event says."""
        measured = measure(data)
        message = escape(str(data.get("message") or ""))
        if self._progress is None or self._task is None:
            self._progress = Progress(
                TextColumn("[progress.description]{task.description}"), BarColumn(),
                TaskProgressColumn(), TextColumn("{task.fields[count]}"), TimeElapsedColumn(),
                console=self.console, transient=False)
            self._task = self._progress.add_task(message or "running", total=None, count="")
        if measured is not None:
            self._progress.update(self._task, completed=measured[0], total=measured[1],
                                  count=count(data))
        if message:
            self._progress.update(self._task, description=message)
        if not self._progress.live.is_started:  # drawn first where the first event says
            self._progress.start()

    def note(self, line: str, style: str | None = None) -> None:
        """Print a line above the bar."""
        # Styled as Text: a style given to print would dim the bar Live redraws below it.
        self.console.print(Text(line, style=style or ""))

    def stop(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
