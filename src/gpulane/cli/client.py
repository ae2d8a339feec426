"""The client commands of the ``gpulane`` CLI: ``run``, ``tasks``, ``retry``, ``gpus``,
``status``, ``drain``.

They are plain click commands; :func:`register` adds them to the ``main`` group in
:mod:`gpulane.cli`, next to the server's own commands.

Exit codes: 0 done, 1 the task failed or was cancelled (or the server erred), 2 usage error
(including a request the server refused as wrong), 3 the server cannot be reached.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import click
import httpx
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from gpulane.cli import progress
from gpulane.cli.status import render_status
from gpulane.client import Client
from gpulane.client._core import DEFAULT_URL, TOKEN_ENV, URL_ENV, is_final
from gpulane.errors import APIError, TransportError

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3

STATES = ("queued", "running", "succeeded", "failed", "cancelled")
PRIORITY_NAMES = ("immediate", "normal", "background")
STATE_STYLES = {"queued": "yellow", "running": "cyan", "succeeded": "green", "failed": "red",
                "cancelled": "magenta"}


def _no_transport() -> httpx.BaseTransport | None:
    return None


# Tests replace this to put an httpx.MockTransport under every command's Client.
transport_factory: Callable[[], httpx.BaseTransport | None] = _no_transport

F = TypeVar("F", bound=Callable[..., Any])


def client_options(func: F) -> F:
    """Add ``--url`` and ``--token`` (each also read from the environment)."""
    func = click.option("--token", envvar=TOKEN_ENV, default=None, show_envvar=True,
                        help="Bearer token for the server.")(func)
    func = click.option("--url", envvar=URL_ENV, default=DEFAULT_URL, show_default=True,
                        show_envvar=True, help="Base URL of the gpulane server.")(func)
    return func


def _stdout() -> Console:
    return Console(highlight=False)


def _stderr() -> Console:
    # soft_wrap: one message stays one line, whatever the terminal width.
    return Console(stderr=True, highlight=False, soft_wrap=True)


@contextmanager
def _session(url: str, token: str | None) -> Iterator[Client]:
    """A client whose errors become one clear line and the matching exit code."""
    err = _stderr()
    try:
        with Client(url, token, transport=transport_factory()) as client:
            yield client
    except TransportError as exc:
        reason = str(exc.__cause__ or exc) or type(exc.__cause__).__name__
        err.print(f"cannot reach gpulane at {url}: {reason} (start it with `gpulane serve`)",
                  markup=False)
        raise click.exceptions.Exit(EXIT_UNREACHABLE) from exc
    except APIError as exc:
        where = f" (field: {exc.field})" if exc.field else ""
        err.print(f"error {exc.status} {exc.code}: {exc.message}{where}", style="red",
                  markup=False)
        # 4xx means the request itself was wrong: a usage error, like a bad flag.
        raise click.exceptions.Exit(EXIT_USAGE if exc.status < 500 else EXIT_FAILED) from exc


def _parse_input(_ctx: click.Context, _param: click.Parameter, value: str) -> Any:
    """``--input``: JSON text, ``@path`` to a JSON file, or ``@-`` for stdin."""
    source = "--input"
    text = value
    if value.startswith("@"):
        path = value[1:]
        source = "stdin" if path == "-" else path
        try:
            if path == "-":
                text = sys.stdin.read()
            else:
                with open(path, encoding="utf-8") as fh:
                    text = fh.read()
        except OSError as exc:
            raise click.BadParameter(f"cannot read {path}: {exc.strerror or exc}") from exc
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        hint = ""
        if text.strip()[:1].isalpha() and text.strip() not in ("true", "false", "null"):
            hint = " (a string needs JSON quotes: --input '\"hello\"')"
        raise click.BadParameter(f"{source} is not valid JSON: {exc.msg} at line {exc.lineno} "
                                 f"column {exc.colno}{hint}") from exc


def _parse_priority(_ctx: click.Context, _param: click.Parameter, value: str) -> str | int:
    if value.lower() in PRIORITY_NAMES:
        return value.lower()
    if value.strip().isdigit() and 0 <= int(value) <= 100:
        return int(value)
    raise click.BadParameter(f"{value!r}: use immediate, normal, background or 0-100")


def _dumps(value: Any) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False, default=str)


def _wait_final(client: Client, task: dict[str, Any]) -> dict[str, Any]:
    """Long-poll until the task is final, however long that takes."""
    while not is_final(task):
        task = client.result(str(task["id"]), wait=30.0)
    return task


class _EventPrinter:
    """Streams events: text to stdout as it comes, everything else dim on stderr."""

    def __init__(self) -> None:
        self.out = _stdout()
        self.err = _stderr()
        self.line_open = False  # stdout holds streamed text without a final newline
        self.saw_text = False
        # On a terminal, progress events draw a bar (until text streams: the text is then
        # the progress); piped, each is a plain line on stderr.
        bar_console = progress.console_factory()
        self.bar = progress.ProgressBar(bar_console) if bar_console.is_terminal else None

    def __call__(self, event: dict[str, Any]) -> None:
        kind, data = event["event"], event["data"]
        if kind in ("text_delta", "text"):
            text = data.get("delta", data.get("text", ""))
            if kind == "text" and self.saw_text:
                return  # the whole text after its deltas: already printed
            if kind == "text" and not str(text).endswith("\n"):
                text = f"{text}\n"
            if self.bar is not None:
                self.bar.stop()
            self._text(str(text))
            self.saw_text = self.saw_text or kind == "text_delta"
            return
        if self.bar is not None and not self.saw_text:
            if kind == "progress":
                self.bar.update(data)
                return
            if self.bar.active and sys.stderr.isatty():  # 2>file still gets its lines
                self.bar.note(_describe(kind, data), style="dim")
                return
        if self.line_open and sys.stdout.isatty() and sys.stderr.isatty():
            self._text("\n")  # keep the dim line off the end of the streamed text
        self.err.print(_describe(kind, data), style="dim", markup=False)

    def _text(self, text: str) -> None:
        if text:
            click.echo(text, nl=False)
            sys.stdout.flush()
            self.line_open = not text.endswith("\n")

    def end_line(self) -> None:
        if self.bar is not None:
            self.bar.stop()
        if self.line_open:
            click.echo("")
            self.line_open = False


def _describe(kind: str, data: dict[str, Any]) -> str:
    """One short line for a non-text event."""
    if kind == "state":
        placement = data.get("placement") or {}
        where = f" on {placement['device']}" if placement.get("device") else ""
        reason = data.get("reason") or data.get("fallback_reason")
        return f"· {data.get('state', '?')}{where}" + (f" ({reason})" if reason else "")
    if kind == "progress" and (line := progress.describe(data)):
        return f"· {line}"
    if kind == "worker" and "status" in data:
        return f"· worker {data['status']}"
    if kind == "log" and "line" in data:
        return f"· log {data['line']}"
    compact = json.dumps(data, ensure_ascii=False, separators=(",", ":"), default=str)
    return f"· {kind} {compact[:200]}"


@click.command("run")
@click.argument("preset", required=False)
@click.option("--input", "input_value", required=True, metavar="JSON|@FILE",
              callback=_parse_input, help="Task input: JSON text, @file.json or @- for stdin.")
@click.option("--device", type=click.Choice(["auto", "gpu", "cpu"]), default="auto",
              show_default=True, help="Where the task may run.")
@click.option("--gpu/--cpu", "gpu", default=None,
              help="A GPU only, or the CPU only (?gpu=true|false) [default: --device].")
@click.option("--no-fallback", is_flag=True, help="A GPU or nothing: never the CPU.")
@click.option("--content-type", default=None, metavar="TYPE",
              help="What the input is (image/png); without PRESET, the task goes where the "
              "server routes TYPE (gpulane routes).")
@click.option("--priority", default="normal", show_default=True, callback=_parse_priority,
              help="immediate, normal, background or 0-100.")
@click.option("--timeout-s", type=float, default=None, help="Seconds the task may run.")
@click.option("--no-wait", is_flag=True, help="Print the task id and return at once.")
@click.option("--json", "as_json", is_flag=True, help="Print only the final task as JSON.")
@client_options
def run_cmd(preset: str | None, input_value: Any, device: str, gpu: bool | None,
            no_fallback: bool, content_type: str | None, priority: str | int,
            timeout_s: float | None, no_wait: bool, as_json: bool, url: str,
            token: str | None) -> None:
    """Run a task on PRESET (or where --content-type is routed) and stream its output."""
    if preset is None and content_type is None:
        raise click.UsageError("give PRESET, or --content-type to route the task by")
    code = EXIT_OK
    with _session(url, token) as client:
        task = client.submit(preset, input_value, device=device, priority=priority,
                             timeout_s=timeout_s, content_type=content_type, gpu=gpu,
                             fallback=False if no_fallback else None)
        if no_wait:
            click.echo(_dumps(task) if as_json else task["id"])
            return
        try:
            if as_json:
                task = _wait_final(client, task)
                click.echo(_dumps(task))
            else:
                printer = _EventPrinter()
                try:  # the bar is stopped (the terminal's cursor back) on Ctrl-C too
                    for event in client.events(str(task["id"])):
                        printer(event)
                    task = _wait_final(client, task)
                finally:
                    printer.end_line()
                if task.get("state") == "succeeded":
                    click.echo(_dumps(task.get("output")))
        except KeyboardInterrupt:
            _stderr().print(f"interrupted; task {task['id']} keeps running", markup=False)
            raise click.exceptions.Exit(130) from None
        if task.get("state") != "succeeded":
            code = EXIT_FAILED
            if not as_json:
                error = task.get("error") or {}
                _stderr().print(
                    f"task {task['id']} {task.get('state')}: {error.get('kind', '?')}: "
                    f"{error.get('message', '')}", style="red", markup=False)
    if code:
        raise click.exceptions.Exit(code)


def _age(created_at: Any, now: float) -> str:
    if not isinstance(created_at, int | float):
        return "?"
    seconds = max(0, int(now - created_at))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


@click.command("tasks")
@click.option("--state", type=click.Choice(STATES), default=None, help="Only this state.")
@click.option("--failed", is_flag=True,
              help="Only failed tasks (dead letters), with their errors; `gpulane retry ID` "
              "queues one again.")
@click.option("--preset", default=None, help="Only this preset.")
@click.option("--limit", type=click.IntRange(1, 1000), default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the raw JSON answer.")
@client_options
def tasks_cmd(state: str | None, failed: bool, preset: str | None, limit: int, as_json: bool,
              url: str, token: str | None) -> None:
    """List recent tasks."""
    if failed and state not in (None, "failed"):
        raise click.UsageError(f"--failed lists failed tasks; drop --state {state}")
    with _session(url, token) as client:
        page = client.list(state="failed" if failed else state, preset=preset, limit=limit)
    if as_json:
        click.echo(_dumps(page))
        return
    columns = ["id", "preset", "state", "priority", "device", "attempts", "age"]
    table = Table(*columns, *(["error"] if failed else []))
    now = time.time()
    for task in page.get("tasks", []):
        placement = task.get("placement") or {}
        task_state = str(task.get("state", "?"))
        error = task.get("error") or {}
        table.add_row(
            str(task.get("id", "?")), str(task.get("preset", "?")),
            f"[{STATE_STYLES.get(task_state, 'white')}]{task_state}[/]",
            str(task.get("priority", "")),
            str(placement.get("device") or task.get("device_wish") or ""),
            str(task.get("attempts", "")), _age(task.get("created_at"), now),
            # Escaped: an error carries the worker's last stderr lines, and a "[/tmp/x]"
            # there is a markup tag to Rich (a MarkupError, the listing lost).
            *([escape(f"{error.get('kind', '?')}: {error.get('message', '')}")] if failed
              else []))
    _stdout().print(table)
    if page.get("next_cursor"):
        _stderr().print(f"more tasks: --limit above {limit} shows them", style="dim")


@click.command("retry")
@click.argument("task_id")
@click.option("--json", "as_json", is_flag=True, help="Print the raw JSON answer.")
@client_options
def retry_cmd(task_id: str, as_json: bool, url: str, token: str | None) -> None:
    """Queue a failed or cancelled task (a dead letter) again, with fresh attempts."""
    with _session(url, token) as client:
        task = client.retry(task_id)
    if as_json:
        click.echo(_dumps(task))
        return
    _stdout().print(f"task {task.get('id')} is {task.get('state')} again "
                    f"(preset {task.get('preset')})", markup=False)


@click.command("status")
@click.option("--json", "as_json", is_flag=True, help="Print the raw JSON answer.")
@client_options
def status_cmd(as_json: bool, url: str, token: str | None) -> None:
    """Show the node: draining or not, each preset's queue (limit, drain rate), its lanes
    (queued, running, oldest wait, workers warm, loading and busy), its devices' health and
    its fallbacks by reason."""
    with _session(url, token) as client:
        info = client.status()
    if as_json:
        click.echo(_dumps(info))
        return
    render_status(_stdout(), info)


@click.command("drain")
@click.argument("node", required=False)
@click.option("--resume", is_flag=True, help="Take and start tasks again instead.")
@click.option("--exit", "exit_", is_flag=True,
              help="Exit once drained, as SIGTERM does: running work gets --grace-s, the rest "
                   "goes back to the queue unspent.")
@click.option("--grace-s", type=click.FloatRange(0, 86400), default=None,
              help="With --exit: seconds running work may take [the node's drain_grace_s].")
@client_options
def drain_cmd(node: str | None, resume: bool, exit_: bool, grace_s: float | None, url: str,
              token: str | None) -> None:
    """Stop NODE (the server's own node when omitted; any node of its fleet) starting queued
    work and taking submits (running work finishes); an admin key's job."""
    if resume and (exit_ or grace_s is not None):
        raise click.UsageError("--resume takes neither --exit nor --grace-s: resume, or "
                               "drain with --exit")
    if grace_s is not None and not exit_:
        raise click.UsageError("--grace-s is for a drain that exits: add --exit")
    with _session(url, token) as client:
        info = client.resume(node) if resume else client.drain(node, exit=exit_,
                                                              grace_s=grace_s)
    state = ("draining to exit" if exit_ else "draining") if info.get("draining") \
        else "taking tasks"
    _stdout().print(f"node {info.get('node', '?')}: {state}, {info.get('queued', '?')} "
                    "queued", markup=False)


def _age_s(value: Any) -> str:
    return f"{value:.1f}s" if isinstance(value, int | float) else "?"


@click.command("nodes")
@click.option("--json", "as_json", is_flag=True, help="Print the raw JSON answer.")
@client_options
def nodes_cmd(as_json: bool, url: str, token: str | None) -> None:
    """Show the live nodes of the server's fleet: devices, warm presets, running tasks."""
    with _session(url, token) as client:
        info = client.nodes()
    if as_json:
        click.echo(_dumps(info))
        return
    table = Table("node", "url", "heartbeat", "state", "GPUs (free / total MiB)", "running",
                  "warm")
    for n in info.get("nodes") or []:
        gpus = ", ".join(f"{_mb(d.get('schedulable_free_vram_mb'))} / "
                         f"{_mb(d.get('total_vram_mb'))}" for d in n.get("devices") or [])
        table.add_row(escape(str(n.get("name", "?"))), escape(str(n.get("url") or "-")),
                      _age_s(n.get("heartbeat_age_s")),
                      "draining" if n.get("draining") else "ready", gpus or "none",
                      str(n.get("running", "?")), escape(", ".join(n.get("warm") or [])))
    _stdout().print(table)


def _mb(value: Any) -> str:
    return f"{value:,}" if isinstance(value, int | float) else "?"


@click.command("gpus")
@click.option("--json", "as_json", is_flag=True, help="Print the raw JSON answer.")
@client_options
def gpus_cmd(as_json: bool, url: str, token: str | None) -> None:
    """Show the GPUs the server sees."""
    with _session(url, token) as client:
        info = client.gpus()
    if as_json:
        click.echo(_dumps(info))
        return
    out = _stdout()
    devices = info.get("devices") or []
    if devices:
        table = Table("index", "name", "VRAM used / total (MiB)", "util %", "temp °C")
        for dev in devices:
            util, temp = dev.get("utilization_pct"), dev.get("temperature_c")
            table.add_row(
                str(dev.get("index", "?")), str(dev.get("name", "?")),
                f"{_mb(dev.get('used_vram_mb'))} / {_mb(dev.get('total_vram_mb'))}",
                f"{util:.0f}" if isinstance(util, int | float) else "?",
                f"{temp:.0f}" if isinstance(temp, int | float) else "?")
        out.print(table)
    else:
        out.print("no GPUs", markup=False)
    provider, reason = info.get("provider", "?"), info.get("reason") or ""
    kind = "simulated" if info.get("simulated") else "real"
    out.print(f"GPUs are {kind} (provider {provider})" + (f": {reason}" if reason else ""),
              markup=False)
    cpu = info.get("cpu") or {}
    if cpu:
        out.print(f"CPU: {cpu.get('cores', '?')} cores, concurrency {cpu.get('concurrency', '?')}",
                  markup=False)
    others = [n for n in info.get("nodes") or [] if n.get("name") != info.get("node")]
    if others:  # a fleet: the other nodes' GPUs too
        table = Table("node", "index", "name", "free / total (MiB)", "running")
        for n in others:
            for dev in n.get("devices") or [{}]:
                table.add_row(escape(str(n.get("name", "?"))), str(dev.get("index", "-")),
                              escape(str(dev.get("name", "no GPU"))),
                              f"{_mb(dev.get('schedulable_free_vram_mb'))} / "
                              f"{_mb(dev.get('total_vram_mb'))}", str(n.get("running", "?")))
        out.print(table)


COMMANDS: tuple[click.Command, ...] = (run_cmd, tasks_cmd, retry_cmd, gpus_cmd, status_cmd,
                                       drain_cmd, nodes_cmd)


def register(group: click.Group) -> None:
    """Add the client commands to ``group``."""
    for command in COMMANDS:
        group.add_command(command)

