"""`gpulane top` against a mock server, drawn on Rich's recording console: the frame's tables
(GPUs with a VRAM bar by holder, workers, queues, leases, rates, nodes), --once, the live loop
on a terminal and piped, a server that goes away, a refused key, Ctrl-C."""

from __future__ import annotations

import copy
import io
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from rich.console import Console

from gpulane.cli import top
from gpulane.cli.top_view import BAR_WIDTH, Frame, render, vram_bar, vram_split
from tests.unit.test_cli_client import invoke

GPU0 = {"index": 0, "name": "Simulated GPU", "health": "ok", "total_vram_mb": 24000,
        "used_vram_mb": 9000, "utilization_pct": 87.0, "temperature_c": 71.0, "power_w": 280.0,
        "declared_vram_mb": 6000,
        "holders": [{"holder": "embed-gpu0-1", "vram_mb": 3000},
                    {"holder": "lease-aa", "vram_mb": 3000}]}
GPU1 = {"index": 1, "name": "Simulated GPU", "health": "lost", "total_vram_mb": 24000,
        "used_vram_mb": 0, "utilization_pct": None, "temperature_c": None, "power_w": None,
        "holders": []}
VIEWS: dict[str, dict[str, Any]] = {
    "/v1/status": {
        "node": "n1", "draining": False, "queued": 7,
        "presets": {"embed": {"queued": 7, "max_queued": 100, "drain_per_s": 40.0}},
        "lanes": [
            {"preset": "embed", "lane": "gpu", "queued": 7, "running": 2, "oldest_wait_s": 1.25,
             "workers": {"warm": 0, "loading": 0, "busy": 1}},
            {"preset": "sleep", "lane": "cpu", "queued": 0, "running": 0,
             "oldest_wait_s": None, "workers": {"warm": 0, "loading": 0, "busy": 0}}],
        "fallbacks": {"total": 9, "reasons": {
            "gpu_busy": {"count": 6, "per_min": {"1m": 4.0, "15m": 0.4}},
            "device_lost": {"count": 3, "per_min": {"1m": 1.5, "15m": 0.2}}}}},
    "/v1/gpus": {
        "node": "n1", "devices": [GPU0, GPU1], "cpu": {"cores": 8, "concurrency": 2, "in_use": 1},
        "nodes": [
            {"name": "n1", "url": "http://gpu-a:8765", "draining": False, "running": 2,
             "warm": ["embed/gpu"], "devices": [{"schedulable_free_vram_mb": 18000,
                                                 "total_vram_mb": 24000}]},
            {"name": "n2", "url": "http://gpu-b:8765", "draining": True, "running": 0,
             "warm": [], "devices": []}]},
    "/v1/workers": {"workers": [
        {"id": "embed-gpu0-1", "preset": "embed", "device": "gpu:0", "state": "busy",
         "tasks_done": 100, "idle_s": 0.0,
         "batch": {"size": 32, "last_size": 24, "mean_size": 20.5}}]},
    "/v1/leases": {"leases": [
        {"id": "lease-aa", "holder": "trainer", "state": "granted", "node": "n1",
         "devices": [0], "vram_mb": 3000, "priority": 50, "expires_at": None},
        {"id": "lease-bb", "holder": "notebook", "state": "waiting", "node": None,
         "devices": [], "vram_mb": 30000, "priority": 20, "expires_at": None}]},
}


class Server:
    """Answers the four views; ``gone_after`` readings later it refuses every connection."""

    def __init__(self, views: dict[str, dict[str, Any]] | None = None,
                 gone_after: int | None = None) -> None:
        self.views = copy.deepcopy(views or VIEWS)
        self.gone_after = gone_after
        self.readings = 0
        self.auth: list[str | None] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.auth.append(request.headers.get("authorization"))
        if request.url.path == "/v1/status":
            self.readings += 1
        if self.gone_after is not None and self.readings > self.gone_after:
            raise httpx.ConnectError("[Errno 111] Connection refused", request=request)
        if request.url.path == "/v1/workers":  # each reading, the worker did 50 more
            self.views["/v1/workers"]["workers"][0]["tasks_done"] += 50
        return httpx.Response(200, json=self.views[request.url.path])


def recorded(frame: Frame, width: int = 140) -> str:
    console = Console(record=True, width=width, file=io.StringIO())
    console.print(render(frame))
    return console.export_text()


def full_frame() -> Frame:
    return Frame(url="http://n1:8765", interval_s=2.0, status=VIEWS["/v1/status"],
                 gpus=VIEWS["/v1/gpus"], workers=VIEWS["/v1/workers"],
                 leases=VIEWS["/v1/leases"], tasks_per_s=12.5, fallbacks_per_min=5.5,
                 read_at=0.0)


def test_a_frame_shows_gpus_workers_queues_leases_rates_and_nodes() -> None:
    text = recorded(full_frame())
    lines = text.splitlines()
    assert "node n1" in lines[0] and "taking tasks" in lines[0] and "7 queued" in lines[0]
    gpu0 = next(line for line in lines if line.startswith("0 "))
    assert "9,000/24,000" in gpu0 and "87" in gpu0 and "71" in gpu0 and "280" in gpu0
    assert "lost" in next(line for line in lines if line.startswith("1 "))
    assert "CPU: 1 of 2 slots in use, 8 cores" in text
    worker = next(line for line in lines if line.startswith("embed-gpu0-1"))
    assert "busy" in worker and "24/32" in worker and "20.5" in worker and "100" in worker
    lane = next(line for line in lines if line.startswith("embed ") and " gpu " in line)
    assert lane.split()[2:5] == ["7", "2", "1.2"] and lane.split()[-1] == "40"
    assert "queues (1 quiet lanes left out)" in text and "sleep" not in text
    assert "leases (1 held, 1 waiting)" in text
    assert "trainer" in text and "notebook" in text and "30,000" in text
    assert "tasks done/s 12.5" in text and "fallbacks/min 5.5" in text
    node2 = next(line for line in lines if line.startswith("n2 "))
    assert "http://gpu-b:8765" in node2 and "draining" in node2


def test_the_vram_bar_splits_workers_leases_outside_and_free() -> None:
    # From the GPU's holders: 3000 of 24000 each for the worker and the lease, 3000 used
    # outside (9000 used, 6000 declared): 3 cells each on a bar of 24.
    split = vram_split(GPU0, None, {"lease-aa"})
    assert split == {"workers": 3000, "leases": 3000, "freeing": 0, "outside": 3000}
    bar = vram_bar(24000, split, width=24)
    spans = {str(span.style): span.end - span.start for span in bar.spans}
    assert spans == {"cyan": 3, "magenta": 3, "yellow": 3, "dim": 15}
    assert len(bar.plain) == 24
    # A holder too small for a cell still gets one; an unknown total draws no bar.
    tiny = vram_bar(80000, {"workers": 10})
    assert tiny.plain.startswith("█") and len(tiny.plain) == BAR_WIDTH
    assert vram_bar(None, split).plain == "-"


def test_the_status_views_split_comes_before_the_holders() -> None:
    # The ledger's kinds and its outside reading, where the server gives them.
    status_device = {"index": 0, "held_vram_mb": {"worker": 6000, "lease": 0, "clearing": 2000},
                     "outside_vram_mb": 1000}
    assert vram_split(GPU0, status_device, set()) == {
        "workers": 6000, "leases": 0, "freeing": 2000, "outside": 1000}
    frame = full_frame()
    frame.status = {**VIEWS["/v1/status"], "devices": [status_device]}
    gpu0 = next(line for line in recorded(frame).splitlines() if line.startswith("0 "))
    # On a bar of 20 for 24000 MiB: workers 5 cells, being freed 2, outside 1, free 12.
    assert "█" * 8 + "·" * 12 in gpu0
    spans = vram_bar(24000, vram_split(GPU0, status_device, set())).spans
    assert [(str(sp.style), sp.end - sp.start) for sp in spans] == [
        ("cyan", 5), ("blue", 2), ("yellow", 1), ("dim", 12)]


def test_missing_keys_draw_dashes_not_errors() -> None:
    frame = Frame(url="u", interval_s=1.0, status={"node": "old"},
                  gpus={"devices": [{"index": 0}]}, workers={"workers": [{"id": "w"}]},
                  leases={}, read_at=0.0)
    text = recorded(frame)
    assert "node old" in text and "leases (0 held, 0 waiting)" in text
    assert "tasks done/s - (two readings needed)" in text and "fallbacks/min -" in text


def test_the_rate_comes_from_consecutive_readings_per_worker() -> None:
    meter = top.RateMeter()
    assert meter.update(10.0, {"workers": [{"id": "a", "tasks_done": 100}]}) is None
    # a did 30 in 2 s; b is new and did 10; nothing is negative.
    rate = meter.update(12.0, {"workers": [{"id": "a", "tasks_done": 130},
                                           {"id": "b", "tasks_done": 10}]})
    assert rate == 20.0
    # a left with its count: the rate is b's alone, not negative.
    assert meter.update(14.0, {"workers": [{"id": "b", "tasks_done": 14}]}) == 2.0


def test_fallbacks_per_minute_sum_the_reasons() -> None:
    assert top.fallbacks_per_min(VIEWS["/v1/status"]) == 5.5
    assert top.fallbacks_per_min({"fallbacks": {"total": 0, "reasons": {}}}) == 0.0
    assert top.fallbacks_per_min({"node": "before the fallback counts"}) is None


def test_once_prints_one_frame_with_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    server = Server()
    res = invoke(server, monkeypatch, "top", "--once", "--token", "k1",
                 env={"COLUMNS": "140"})
    assert res.exit_code == 0, res.output
    assert "GPUs" in res.stdout and "embed-gpu0-1" in res.stdout and "lease-bb" in res.stdout
    assert "Ctrl-C" not in res.stdout
    assert server.readings == 1 and set(server.auth) == {"Bearer k1"}


def test_once_against_no_server_is_one_line_and_exit_3(monkeypatch: pytest.MonkeyPatch) -> None:
    res = invoke(Server(gone_after=0), monkeypatch, "top", "--once")
    assert res.exit_code == 3
    assert "cannot reach gpulane" in res.stderr and "Traceback" not in res.output


def test_a_refused_key_ends_top_with_its_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        return httpx.Response(401, json={"error": {"code": "unauthorized",
                                                   "message": "a key is required"}})

    for args in (("top", "--once"), ("top",)):
        res = invoke(refuse, monkeypatch, *args)
        assert res.exit_code == 2, res.output
        assert "error 401 unauthorized: a key is required" in res.stderr


def test_a_key_without_the_leases_scope_sees_the_rest(monkeypatch: pytest.MonkeyPatch) -> None:
    server = Server()

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/leases":
            return httpx.Response(403, json={"error": {"code": "forbidden",
                                                       "message": "needs scope leases"}})
        return server(request)

    res = invoke(handler, monkeypatch, "top", "--once", env={"COLUMNS": "140"})
    assert res.exit_code == 0, res.output
    assert "this key has no leases scope" in res.stdout and "embed-gpu0-1" in res.stdout
    assert "leases (" not in res.stdout  # no counts it cannot know


def stop_after(ticks: int) -> Callable[[float], None]:
    """A sleep that is Ctrl-C after ``ticks`` pauses."""
    pauses: list[float] = []

    def pause(seconds: float) -> None:
        pauses.append(seconds)
        if len(pauses) >= ticks:
            raise KeyboardInterrupt

    return pause


def test_piped_top_prints_frames_and_a_server_gone_is_shown(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(top, "sleep", stop_after(3))
    res = invoke(Server(gone_after=2), monkeypatch, "top", "--interval", "0.5",
                 env={"COLUMNS": "140"})
    assert res.exit_code == 0, res.output  # Ctrl-C is a clean exit
    frames = res.stdout.split("gpulane top")[1:]
    assert len(frames) == 3
    assert "tasks done/s - (two readings needed)" in frames[0]
    assert "tasks done/s" in frames[1] and "two readings" not in frames[1]
    assert "unreachable" in frames[2]
    assert "server gone: [Errno 111] Connection refused; trying again every 0.5 s" in frames[2]
    assert "embed-gpu0-1" in frames[2]  # the last reading stays in view
    assert "Traceback" not in res.output


def test_on_a_terminal_top_redraws_one_screen(monkeypatch: pytest.MonkeyPatch) -> None:
    console = Console(record=True, force_terminal=True, width=140, file=io.StringIO())
    monkeypatch.setattr(top, "console_factory", lambda: console)
    monkeypatch.setattr(top, "sleep", stop_after(2))
    server = Server()
    res = invoke(server, monkeypatch, "top")
    assert res.exit_code == 0, res.output
    assert server.readings == 2
    drawn = console.file.getvalue()  # type: ignore[attr-defined]
    assert "\x1b[?1049h" in drawn and "\x1b[?1049l" in drawn  # the alternate screen, left
    assert "embed-gpu0-1" in console.export_text()


def test_views_of_an_odd_shape_are_named_not_a_traceback(
        monkeypatch: pytest.MonkeyPatch) -> None:
    odd: dict[str, dict[str, Any]] = {"/v1/status": {"lanes": "x", "devices": [1]},
                                      "/v1/gpus": {"gpus": [], "nodes": 1},
                                      "/v1/workers": {"workers": ["x"]},
                                      "/v1/leases": {"leases": {"a": 1}}}
    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json=odd[request.url.path])

    res = invoke(answer, monkeypatch, "top", "--once", env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    assert "answered views gpulane top cannot read" in res.stdout
    assert "Traceback" not in res.output
