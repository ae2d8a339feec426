"""How ``gpulane top`` draws one frame: a header line, then the GPUs (a VRAM bar split by
holder), the workers, the queues (preset x lane), the leases, the rates and the fleet's nodes.

Pure functions of a :class:`Frame`, so that a test draws one on a recording Console. Every key
may be absent (an older server, a reading that failed): its cell shows ``-`` or its table is
left out, never an error. Values come from the server and are escaped, since a preset's or a
holder's name is not Rich markup.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from rich import box
from rich.console import Group, RenderableType
from rich.markup import escape
from rich.table import Table
from rich.text import Text

BAR_WIDTH = 20
"""Cells in a GPU's VRAM bar."""

BAR_STYLES = {"workers": "cyan", "leases": "magenta", "freeing": "blue", "outside": "yellow"}
"""The colour of each holder's share of a VRAM bar, in its order (free VRAM is dim): gpulane's
workers, leases, room being freed for an urgent claim, use outside gpulane."""

HEALTH_STYLES = {"ok": "green", "lost": "red"}
"""How a device's health is coloured (anything else shows plain)."""

WORKER_STYLES = {"ready": "green", "busy": "cyan", "starting": "yellow", "stopping": "magenta",
                 "exited": "red"}
"""How a worker's state is coloured (anything else shows plain)."""


@dataclass
class Frame:
    """What one frame shows: the server's four views, the rates, and whether it answered."""

    url: str
    interval_s: float
    status: dict[str, Any] = field(default_factory=dict)
    gpus: dict[str, Any] = field(default_factory=dict)
    workers: dict[str, Any] = field(default_factory=dict)
    leases: dict[str, Any] = field(default_factory=dict)
    tasks_per_s: float | None = None  # None until two readings stand
    fallbacks_per_min: float | None = None
    leases_note: str | None = None  # why the leases table is empty when it is not the server's
    read_at: float | None = None  # wall clock of the last good reading
    gone: str | None = None  # why the server did not answer the last reading
    once: bool = False  # one frame for a script: no refresh to announce


def _num(value: Any, fmt: str = "g") -> str:
    return format(value, fmt) if isinstance(value, int | float) else "-"


def _mb(value: Any) -> str:
    return f"{value:,.0f}" if isinstance(value, int | float) else "-"


def _styled(value: Any, styles: dict[str, str]) -> str:
    text = escape(str(value if value is not None else "?"))
    style = styles.get(str(value))
    return f"[{style}]{text}[/]" if style else text


def _table(title: str, *headers: str) -> Table:
    """A compact table: a rule under the headers, no borders, so that a frame fits 100
    columns. The first column (a name cut short names nothing) does not wrap."""
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, padding=(0, 1, 0, 0),
                  show_edge=False)
    for i, header in enumerate(headers):
        table.add_column(header, no_wrap=i == 0)
    return table


def render(frame: Frame) -> RenderableType:
    """The whole frame as one renderable."""
    parts: list[RenderableType] = [_header(frame)]
    if frame.gone is not None:
        last = (time.strftime(" (last reading %H:%M:%S)", time.localtime(frame.read_at))
                if frame.read_at is not None else "")
        parts.append(Text(f"server gone: {frame.gone}; trying again every "
                          f"{frame.interval_s:g} s{last}", style="bold red"))
        if frame.read_at is None:
            return Group(*parts)
    parts += [_gpus_table(frame), _workers_table(frame.workers), _queues_table(frame.status),
              _leases_table(frame.leases, frame.leases_note), _rates(frame)]
    nodes = frame.gpus.get("nodes") or []
    if len(nodes) > 1:
        parts.append(_nodes_table(nodes))
    return Group(*parts)


def _header(frame: Frame) -> Text:
    status = frame.status
    text = Text()
    text.append("gpulane top", style="bold")
    text.append(f"  node {status.get('node', '?')}  ")
    if frame.gone is not None:
        text.append("unreachable", style="red")
    elif status.get("draining"):
        text.append("draining", style="yellow")
    else:
        text.append("taking tasks", style="green")
    text.append(f"  {status.get('queued', '-')} queued  {frame.url}", style="dim")
    if not frame.once:
        text.append(f"  every {frame.interval_s:g} s  (Ctrl-C quits)", style="dim")
    return text


def vram_split(device: dict[str, Any], status_device: dict[str, Any] | None,
               lease_ids: set[str]) -> dict[str, float]:
    """MiB of a GPU by holder: the status view's split when the server gives one (the
    ledger's kinds, and its reading of use outside gpulane), else one made from the GPU's
    holders (a lease by its id) and NVML's used beyond what they declare."""
    held = (status_device or {}).get("held_vram_mb")
    if isinstance(held, dict):
        outside = (status_device or {}).get("outside_vram_mb")
        return {"workers": float(held.get("worker") or 0),
                "leases": float(held.get("lease") or 0),
                "freeing": float(held.get("clearing") or 0),
                "outside": float(outside) if isinstance(outside, int | float) else 0.0}
    shares = {"workers": 0.0, "leases": 0.0, "freeing": 0.0}
    for holder in device.get("holders") or []:
        name, mb = str(holder.get("holder", "")), holder.get("vram_mb")
        if isinstance(mb, int | float):
            shares["leases" if name in lease_ids or name.startswith("lease-") else "workers"] \
                += mb
    used = device.get("used_vram_mb")
    declared = sum(shares.values())
    shares["outside"] = max(0.0, used - declared) if isinstance(used, int | float) else 0.0
    return shares


def vram_bar(total: Any, split: dict[str, float], width: int = BAR_WIDTH) -> Text:
    """A GPU's VRAM as a bar: each holder's share in its colour (BAR_STYLES), then free."""
    if not isinstance(total, int | float) or total <= 0:
        return Text("-")
    bar, filled = Text(), 0
    for kind, style in BAR_STYLES.items():
        share = split.get(kind, 0.0)
        cells = min(width - filled, round(share / total * width))
        if share > 0 and cells == 0 and filled < width:
            cells = 1  # a holder too small for a cell still shows
        bar.append("█" * cells, style=style)
        filled += cells
    bar.append("·" * (width - filled), style="dim")
    return bar


def _gpus_table(frame: Frame) -> Table:
    lease_ids = {str(lease.get("id")) for lease in frame.leases.get("leases") or []}
    splits = {d.get("index"): d for d in frame.status.get("devices") or []}
    legend = "  ".join(f"[{style}]█[/] {kind}" for kind, style in BAR_STYLES.items())
    table = _table(f"GPUs  {legend}", "gpu", "name", "health", "VRAM", "used/total MiB",
                   "util%", "°C", "W")
    table.columns[1].max_width, table.columns[1].overflow = 20, "ellipsis"
    table.columns[3].no_wrap = True
    for dev in frame.gpus.get("devices") or []:
        table.add_row(str(dev.get("index", "?")), escape(str(dev.get("name", "?"))),
                      _styled(dev.get("health", "?"), HEALTH_STYLES),
                      vram_bar(dev.get("total_vram_mb"),
                               vram_split(dev, splits.get(dev.get("index")), lease_ids)),
                      f"{_mb(dev.get('used_vram_mb'))}/{_mb(dev.get('total_vram_mb'))}",
                      _num(dev.get("utilization_pct"), ".0f"),
                      _num(dev.get("temperature_c"), ".0f"), _num(dev.get("power_w"), ".0f"))
    cpu = frame.gpus.get("cpu") or {}
    if cpu:
        table.caption_justify = "left"
        table.caption = (f"CPU: {cpu.get('in_use', '-')} of {cpu.get('concurrency', '-')} "
                         f"slots in use, {cpu.get('cores', '-')} cores")
    return table


def _workers_table(workers: dict[str, Any]) -> Table:
    rows = workers.get("workers") or []
    table = _table(f"workers ({len(rows)})", "worker", "preset", "device", "state",
                   "batch last/size", "mean", "done", "idle s")
    for worker in rows:
        batch = worker.get("batch") or {}
        table.add_row(escape(str(worker.get("id", "?"))), escape(str(worker.get("preset", "?"))),
                      escape(str(worker.get("device", "?"))),
                      _styled(worker.get("state"), WORKER_STYLES),
                      f"{_num(batch.get('last_size'))}/{_num(batch.get('size'))}"
                      if batch else "-", _num(batch.get("mean_size"), ".1f"),
                      _num(worker.get("tasks_done")), _num(worker.get("idle_s"), ".1f"))
    return table


def _queues_table(status: dict[str, Any]) -> Table:
    lanes = status.get("lanes") or []
    busy = [lane for lane in lanes if lane.get("queued") or lane.get("running")
            or any((lane.get("workers") or {}).values())]
    quiet = len(lanes) - len(busy)
    table = _table("queues" + (f" ({quiet} quiet lanes left out)" if quiet else ""), "preset",
                   "lane", "queued", "running", "oldest wait s", "warm", "loading", "busy",
                   "drain/s")
    presets = status.get("presets") or {}
    for lane in busy:
        workers = lane.get("workers") or {}
        preset = str(lane.get("preset", "?"))
        table.add_row(escape(preset), escape(str(lane.get("lane", "?"))),
                      _num(lane.get("queued")), _num(lane.get("running")),
                      _num(lane.get("oldest_wait_s"), ".1f"), _num(workers.get("warm", 0)),
                      _num(workers.get("loading", 0)), _num(workers.get("busy", 0)),
                      _num((presets.get(preset) or {}).get("drain_per_s"), ".3g"))
    return table


def _leases_table(leases: dict[str, Any], note: str | None) -> Table:
    rows = leases.get("leases") or []
    # A preempting lease still holds its VRAM until it lets go or its grace ends.
    held = sum(1 for lease in rows if lease.get("state") in ("granted", "preempting"))
    waiting = sum(1 for lease in rows if lease.get("state") == "waiting")
    counts = "" if note else f" ({held} held, {waiting} waiting)"  # not known without them
    table = _table(f"leases{counts}", "lease", "holder", "state", "node", "gpu", "VRAM MiB",
                   "prio", "expires s")
    table.caption, table.caption_justify = note, "left"
    now = time.time()
    for lease in rows:
        expires = lease.get("expires_at")
        devices = lease.get("devices") or []
        table.add_row(escape(str(lease.get("id", "?"))), escape(str(lease.get("holder", "?"))),
                      _styled(lease.get("state"), {"granted": "green", "waiting": "yellow",
                                                   "preempting": "magenta"}),
                      escape(str(lease.get("node") or "-")),
                      ",".join(str(d) for d in devices) or "-", _mb(lease.get("vram_mb")),
                      _num(lease.get("priority")),
                      _num(expires - now, ".0f") if isinstance(expires, int | float) else "-")
    return table


def _rates(frame: Frame) -> Text:
    text = Text("rates  ", style="bold")
    tasks = ("- (two readings needed)" if frame.tasks_per_s is None
             else f"{frame.tasks_per_s:.1f}")
    text.append(f"tasks done/s {tasks}   fallbacks/min {_num(frame.fallbacks_per_min, '.1f')}")
    return text


def _nodes_table(nodes: list[dict[str, Any]]) -> Table:
    table = _table(f"nodes ({len(nodes)})", "node", "url", "state", "GPUs free/total MiB",
                   "running", "warm")
    for node in nodes:
        devices = node.get("devices") or []
        gpus = ", ".join(f"{_mb(d.get('schedulable_free_vram_mb'))} / "
                         f"{_mb(d.get('total_vram_mb'))}" for d in devices)
        table.add_row(escape(str(node.get("name", "?"))), escape(str(node.get("url") or "-")),
                      "[yellow]draining[/]" if node.get("draining") else "[green]ready[/]",
                      gpus or "none", _num(node.get("running")),
                      escape(", ".join(node.get("warm") or [])) or "-")
    return table
