"""`gpulane run` shows `progress` events as a bar on a terminal and as plain lines when piped;
the fields a progress event may carry (done/total, fraction, progress, pct, message)."""

from __future__ import annotations

import io
import json
import sys

import pytest
from rich.console import Console

from gpulane.cli import progress
from gpulane.cli.client import _EventPrinter
from tests.unit.test_cli_client import FakeServer, invoke, sse, task


@pytest.mark.parametrize(("data", "measured", "line"), [
    ({"done": 3, "total": 10}, (3.0, 10.0), "progress 3/10 30%"),
    ({"done": 12, "total": 10}, (10.0, 10.0), "progress 12/10 100%"),
    ({"fraction": 0.25, "message": "reading"}, (25.0, 100.0), "progress 25% reading"),
    ({"progress": 0.5}, (50.0, 100.0), "progress 50%"),
    ({"pct": 40}, (40.0, 100.0), "progress 40%"),
    ({"message": "warming up"}, None, "progress warming up"),
    ({"done": 3, "total": 0}, None, None),
    ({"done": True, "total": True}, None, None),
    ({"metric": "rmse", "value": 0.3}, None, None),
])
def test_progress_fields(data: dict[str, object], measured: tuple[float, float] | None,
                         line: str | None) -> None:
    assert progress.measure(data) == measured
    assert progress.describe(data) == line


STEPS = sse((1, "state", {"state": "running", "placement": {"device": "gpu:0"}}),
            *((i + 2, "progress", {"done": i + 1, "total": 4, "message": f"step {i + 1}"})
              for i in range(4)),
            (6, "state", {"state": "succeeded"}))


def test_piped_run_prints_progress_as_plain_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    server = FakeServer(task("succeeded", output={"steps": 4}), STEPS)
    res = invoke(server, monkeypatch, "run", "steps", "--input", "{}")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout) == {"steps": 4}  # stdout holds only the output
    lines = res.stderr.splitlines()
    assert [line for line in lines if "progress" in line] == [
        f"· progress {i}/4 {i * 25}% step {i}" for i in range(1, 5)]
    assert "\x1b[" not in res.output and "━" not in res.output


def test_on_a_terminal_run_draws_a_bar(monkeypatch: pytest.MonkeyPatch) -> None:
    console = Console(record=True, force_terminal=True, width=100, file=io.StringIO())
    monkeypatch.setattr(progress, "console_factory", lambda: console)
    server = FakeServer(task("succeeded", output={"steps": 4}), STEPS)
    res = invoke(server, monkeypatch, "run", "steps", "--input", "{}")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout) == {"steps": 4}
    drawn = console.export_text()
    bar = drawn.splitlines()[-1]  # the bar's last state stays on screen
    assert "step 4" in bar and "100%" in bar and "4/4" in bar and "━" in bar
    assert "running on gpu:0" in res.stderr  # before the first progress event: plain
    assert "· succeeded" in res.stderr  # stderr is no terminal here: its lines stay there
    assert " 0%" not in drawn  # the bar starts where the first event says
    assert "progress" not in res.stderr  # none as plain lines


def test_streamed_text_takes_over_from_the_bar(monkeypatch: pytest.MonkeyPatch) -> None:
    console = Console(record=True, force_terminal=True, width=100, file=io.StringIO())
    monkeypatch.setattr(progress, "console_factory", lambda: console)
    events = sse((1, "progress", {"done": 1, "total": 2}), (2, "text_delta", {"delta": "Hi"}),
                 (3, "progress", {"done": 2, "total": 2}), (4, "state", {"state": "succeeded"}))
    server = FakeServer(task("succeeded", output={"text": "Hi"}), events)
    res = invoke(server, monkeypatch, "run", "echo", "--input", "{}")
    assert res.exit_code == 0, res.output
    assert res.stdout.startswith("Hi")
    assert "1/2" in console.export_text() and "2/2" not in console.export_text()
    assert "progress 2/2 100%" in res.stderr  # after the text, as a plain line


def test_a_bar_with_no_measure_shows_its_message() -> None:
    console = Console(record=True, force_terminal=True, width=80, file=io.StringIO())
    bar = progress.ProgressBar(console)
    bar.update({"message": "loading weights"})
    assert bar.active
    bar.update({"fraction": 0.5})
    bar.note("· worker ready")
    bar.stop()
    assert not bar.active
    text = console.export_text()
    assert "· worker ready" in text and "loading weights" in text and "50%" in text


def test_with_both_on_a_terminal_other_events_print_above_the_bar(
        monkeypatch: pytest.MonkeyPatch) -> None:
    console = Console(record=True, force_terminal=True, width=100, file=io.StringIO())
    monkeypatch.setattr(progress, "console_factory", lambda: console)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    printer = _EventPrinter()
    printer({"event": "progress", "data": {"done": 1, "total": 2}})
    printer({"event": "worker", "data": {"status": "ready"}})
    printer({"event": "progress", "data": {"done": 2, "total": 2}})
    printer.end_line()
    # The record holds every redraw of the bar, their cursor moves left out.
    lines = console.export_text().splitlines()
    assert lines[0].endswith("· worker ready") and "100% 2/2" in lines[-1]
