"""How ``gpulane status`` draws the body of ``GET /v1/status``: the node's line, then tables of
its preset queues, its lanes (preset x lane), its devices and its fallbacks.

Every key past the old ones (``lanes``, ``devices``, ``cpu``, ``fallbacks``) may be absent (a
server from before they were added): its table is then left out, never an error. Lanes with
nothing queued or running and no worker are left out of the table (``--json`` has them). Values come
from the server and are escaped, since a preset's or a GPU's name is not Rich markup.
"""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

HEALTH_STYLES = {"ok": "green", "lost": "red"}
"""How a device's health is coloured (anything else shows plain)."""


def _num(value: Any, fmt: str = "g") -> str:
    return "-" if not isinstance(value, int | float) else format(value, fmt)


def _mb(value: Any) -> str:
    return f"{value:,}" if isinstance(value, int | float) else "-"


def render_status(out: Console, info: dict[str, Any]) -> None:
    """Print the status body ``info`` as a line and tables on ``out``."""
    state = "[yellow]draining[/]" if info.get("draining") else "[green]taking tasks[/]"
    out.print(f"node {escape(str(info.get('node', '?')))}: {state}, "
              f"{info.get('queued', '?')} queued")
    table = Table(title="queues")
    table.add_column("preset", no_wrap=True)
    for header in ("queued", "max_queued", "drain /s"):
        table.add_column(header)
    for name, queue in sorted((info.get("presets") or {}).items()):
        table.add_row(escape(name), str(queue.get("queued", "?")),
                      str(queue.get("max_queued", "?")), _num(queue.get("drain_per_s")))
    out.print(table)
    lanes = info.get("lanes")
    if lanes and not all(_quiet(lane) for lane in lanes):
        out.print(_lanes_table(lanes))
    elif lanes:
        out.print(f"lanes: all {len(lanes)} quiet (nothing queued or running, no worker)",
                  markup=False)
    devices, cpu = info.get("devices"), info.get("cpu")
    if devices is not None or cpu:
        out.print(_devices_table(devices or [], cpu or {}))
    fallbacks = info.get("fallbacks")
    if fallbacks is not None:
        _print_fallbacks(out, fallbacks)


def _quiet(lane: dict[str, Any]) -> bool:
    """Nothing queued or running, and no worker: a row of zeros the JSON keeps."""
    return not lane.get("queued") and not lane.get("running") and \
        not any((lane.get("workers") or {}).values())


def _lanes_table(lanes: list[dict[str, Any]]) -> Table:
    quiet = sum(1 for lane in lanes if _quiet(lane))
    table = Table(title="lanes" + (f" ({quiet} quiet ones left out)" if quiet else ""))
    table.add_column("preset", no_wrap=True)  # a name cut short names nothing
    for header in ("lane", "queued", "running", "oldest wait s", "warm", "loading", "busy",
                   "load s", "tasks/s per worker"):
        table.add_column(header)
    for lane in lanes:
        if _quiet(lane):
            continue
        workers = lane.get("workers") or {}
        table.add_row(escape(str(lane.get("preset", "?"))), str(lane.get("lane", "?")),
                      str(lane.get("queued", "?")), str(lane.get("running", "?")),
                      _num(lane.get("oldest_wait_s"), ".1f"), str(workers.get("warm", 0)),
                      str(workers.get("loading", 0)), str(workers.get("busy", 0)),
                      _num(lane.get("load_s"), ".2f"),
                      _num(lane.get("drain_per_worker_s"), ".3g"))
    return table


def _devices_table(devices: list[dict[str, Any]], cpu: dict[str, Any]) -> Table:
    table = Table("device", "name", "health", "declared / free / total MiB", "workers",
                  title="devices")
    for dev in devices:
        health = str(dev.get("health", "?"))
        style = HEALTH_STYLES.get(health)
        table.add_row(f"gpu:{dev.get('index', '?')}", escape(str(dev.get("name", "?"))),
                      f"[{style}]{health}[/]" if style else escape(health),
                      f"{_mb(dev.get('declared_vram_mb'))} / {_mb(dev.get('free_vram_mb'))} / "
                      f"{_mb(dev.get('total_vram_mb'))}",
                      escape(", ".join(dev.get("workers") or [])) or "-")
    if cpu:
        table.add_row("cpu", "CPU pool", "[green]ok[/]",
                      f"{cpu.get('in_use', '?')} of {cpu.get('slots', '?')} slots in use",
                      escape(", ".join(cpu.get("workers") or [])) or "-")
    return table


def _print_fallbacks(out: Console, fallbacks: dict[str, Any]) -> None:
    reasons = fallbacks.get("reasons") or {}
    if not reasons:
        out.print("fallbacks: none", markup=False)
        return
    table = Table("reason", "count", "per min (1 m)", "per min (15 m)", "presets",
                  title=f"fallbacks ({fallbacks.get('total', '?')} in all)")
    for reason, entry in sorted(reasons.items()):
        rates = entry.get("per_min") or {}
        presets = ", ".join(f"{p} {n}" for p, n in sorted((entry.get("presets") or {}).items()))
        table.add_row(escape(reason), str(entry.get("count", "?")), _num(rates.get("1m")),
                      _num(rates.get("15m")), escape(presets) or "-")
    out.print(table)
