"""``gpulane top``: a live terminal view of a node, in the manner of nvitop.

Every ``--interval`` seconds it reads ``/v1/status``, ``/v1/gpus``, ``/v1/workers`` and
``/v1/leases`` through the SDK and draws them (:mod:`gpulane.cli.top_view`): GPUs with a VRAM
bar by holder, workers, queues, leases, rates and the fleet's nodes. On a terminal it redraws
one screen (Rich's Live); piped, it prints a frame per reading, like ``top -b``; ``--once``
prints one frame and exits, for scripts.

A server that stops answering shows as such in the frame and is read again at the next tick;
a request the server refuses (a wrong key: 401, 403) ends the command with its error line, as
the other client commands do. Ctrl-C exits 0.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import click
from rich.console import Console, RenderableType
from rich.live import Live
from rich.text import Text

from gpulane.cli import client as cli_client
from gpulane.cli.client import EXIT_FAILED, EXIT_OK, EXIT_USAGE, _session, _stderr, client_options
from gpulane.cli.top_view import Frame, render
from gpulane.client import Client
from gpulane.errors import APIError, TransportError

READ_TIMEOUT_S = 5.0
"""Seconds one reading may take before the server counts as gone for this frame."""
ODD_SHAPES = (AttributeError, TypeError, ValueError, KeyError, IndexError)
"""What reading a view of an unexpected shape raises (another service at --url, or a
different version): the frame says so instead of the command dying with a traceback."""


def _console() -> Console:
    return Console(highlight=False)


# Tests replace these: the console frames are drawn on, and the pause between readings.
console_factory: Callable[[], Console] = _console
sleep: Callable[[float], None] = time.sleep


class RateMeter:
    """Tasks done per second from two consecutive readings of the workers' ``tasks_done``.

    Counted per worker id: a worker that left takes its count with it (no negative rate), and
    one that came since the last reading counts all it did.
    """

    def __init__(self) -> None:
        self._last: tuple[float, dict[str, int]] | None = None

    def update(self, at: float, workers: dict[str, Any]) -> float | None:
        """The rate since the last reading taken at ``at`` (monotonic s); None on the first."""
        done = {str(w.get("id")): int(w["tasks_done"]) for w in workers.get("workers") or []
                if isinstance(w.get("tasks_done"), int)}
        rate = None
        if self._last is not None and at > self._last[0]:
            before = self._last[1]
            finished = sum(max(0, n - before.get(wid, 0)) for wid, n in done.items())
            rate = finished / (at - self._last[0])
        self._last = (at, done)
        return rate


def fallbacks_per_min(status: dict[str, Any]) -> float | None:
    """The node's fallbacks per minute over the last minute, all reasons together."""
    fallbacks = status.get("fallbacks")
    if not isinstance(fallbacks, dict):
        return None  # a server from before the fallback counts
    rates = [(entry.get("per_min") or {}).get("1m") for entry in
             (fallbacks.get("reasons") or {}).values()]
    return float(sum(r for r in rates if isinstance(r, int | float)))


def _view(body: Any) -> dict[str, Any]:
    """A view's body, or {} when it is not an object (something else answers at that URL)."""
    return body if isinstance(body, dict) else {}


def read(client: Client, frame: Frame, meter: RateMeter) -> None:
    """One reading into ``frame``. Raises TransportError (no answer) or APIError."""
    frame.status = _view(client.status())
    frame.gpus = _view(client.gpus())
    frame.workers = _view(client.workers())
    try:
        frame.leases = _view(client.leases())
        frame.leases_note = None
    except APIError as exc:
        if exc.status != 403:
            raise
        # A key without the leases scope still sees the rest.
        frame.leases, frame.leases_note = {}, "this key has no leases scope"
    try:
        frame.tasks_per_s = meter.update(time.monotonic(), frame.workers)
        frame.fallbacks_per_min = fallbacks_per_min(frame.status)
    except ODD_SHAPES:  # views not shaped as a gpulane node's: no rates
        frame.tasks_per_s = frame.fallbacks_per_min = None
    frame.read_at, frame.gone = time.time(), None


def _read_or_gone(client: Client, frame: Frame, meter: RateMeter) -> None:
    """A reading; a server that does not answer (or answers 5xx) is marked gone, not raised."""
    try:
        read(client, frame, meter)
    except TransportError as exc:
        frame.gone = str(exc.__cause__ or exc) or type(exc).__name__
    except APIError as exc:
        if exc.status < 500:
            raise
        frame.gone = f"error {exc.status} {exc.code}: {exc.message}"


def draw(frame: Frame) -> RenderableType:
    """The frame, or a line saying its views could not be read (``render`` trusts their
    shapes: a list where an object should be raises)."""
    try:
        return render(frame)
    except ODD_SHAPES as exc:
        return Text(f"{frame.url} answered views gpulane top cannot read ({type(exc).__name__}: "
                    f"{exc}): is --url a gpulane node?", style="bold red")


def _watch(client: Client, frame: Frame, console: Console) -> None:
    """Read and draw every frame.interval_s until Ctrl-C."""
    meter = RateMeter()
    if not console.is_terminal:
        while True:  # piped: one frame after another
            _read_or_gone(client, frame, meter)
            console.print(draw(frame))
            console.print()
            sleep(frame.interval_s)
    with Live(draw(frame), console=console, screen=True, auto_refresh=False) as live:
        while True:
            _read_or_gone(client, frame, meter)
            live.update(draw(frame), refresh=True)
            sleep(frame.interval_s)


@click.command("top")
@click.option("--interval", type=click.FloatRange(0.1, 3600), default=1.0, show_default=True,
              help="Seconds between readings.")
@click.option("--once", is_flag=True, help="Print one frame and exit (for scripts).")
@client_options
def top_cmd(interval: float, once: bool, url: str, token: str | None) -> None:
    """A live view of the node: GPUs (VRAM by holder, utilisation, temperature, power,
    health), workers, queues, leases, rates and the fleet's nodes."""
    frame = Frame(url=url, interval_s=interval, once=once)
    console = console_factory()
    if once:
        with _session(url, token) as client:
            read(client, frame, RateMeter())
        console.print(draw(frame))
        return
    # No retries: a reading that fails shows at once, and the next tick is the retry.
    client = Client(url, token, transport=cli_client.transport_factory(), retry=None, breaker=None,
                    timeout=READ_TIMEOUT_S)
    try:
        with client:
            _watch(client, frame, console)
    except KeyboardInterrupt:
        raise click.exceptions.Exit(EXIT_OK) from None
    except APIError as exc:
        where = f" (field: {exc.field})" if exc.field else ""
        _stderr().print(f"error {exc.status} {exc.code}: {exc.message}{where}", style="red",
                        markup=False)
        raise click.exceptions.Exit(EXIT_USAGE if exc.status < 500 else EXIT_FAILED) from exc
