"""The client commands of the gpulane CLI, against an httpx.MockTransport server."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner, Result

from gpulane.cli import client as cli_client
from gpulane.cli import main

Handler = Callable[[httpx.Request], httpx.Response]


def task(state: str = "queued", **extra: Any) -> dict[str, Any]:
    return {"id": "t1", "preset": "echo", "state": state, "input": None, "output": None,
            "error": None, "attempts": 1, "priority": 50, "device_wish": "auto",
            "placement": None, "created_at": time.time() - 125, "started_at": None,
            "finished_at": None, **extra}


def sse(*events: tuple[int, str, Any]) -> bytes:
    return "".join(f"id: {i}\nevent: {kind}\ndata: {json.dumps(data)}\n\n"
                   for i, kind, data in events).encode()


class FakeServer:
    """Routes by path; records every request."""

    def __init__(self, final: dict[str, Any], events: bytes = b"") -> None:
        self.final = final
        self.events = events
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        request.read()
        self.requests.append(request)
        path = request.url.path
        if path == "/v1/tasks" and request.method == "POST":
            return httpx.Response(202, json=task("queued"))
        if path.endswith("/events"):
            return httpx.Response(200, content=self.events,
                                  headers={"content-type": "text/event-stream"})
        if path.endswith("/result"):
            return httpx.Response(200, json=self.final)
        return httpx.Response(404, json={"error": {"code": "not_found", "message": path}})


def invoke(handler: Handler, monkeypatch: pytest.MonkeyPatch, *args: str,
           env: dict[str, str] | None = None) -> Result:
    monkeypatch.setattr(cli_client, "transport_factory", lambda: httpx.MockTransport(handler))
    monkeypatch.delenv("GPULANE_URL", raising=False)
    monkeypatch.delenv("GPULANE_TOKEN", raising=False)
    return CliRunner().invoke(main, list(args), env=env)


def test_run_streams_text_and_prints_output(monkeypatch: pytest.MonkeyPatch) -> None:
    events = sse((1, "state", {"state": "running", "placement": {"device": "gpu:0"}}),
                 (2, "progress", {"progress": 0.5, "message": "half"}),
                 (3, "text_delta", {"delta": "Hel"}), (4, "text_delta", {"delta": "lo"}),
                 (5, "state", {"state": "succeeded"}))
    server = FakeServer(task("succeeded", output={"text": "Hello"}), events)
    res = invoke(server, monkeypatch, "run", "echo", "--input", '{"prompt": "hi"}',
                 "--priority", "immediate", "--device", "gpu", "--timeout-s", "9")
    assert res.exit_code == 0, res.output
    assert res.stdout.startswith("Hello\n")
    assert json.loads(res.stdout[len("Hello\n"):]) == {"text": "Hello"}
    assert "running on gpu:0" in res.stderr
    assert "progress 50% half" in res.stderr
    submit = server.requests[0]
    assert json.loads(submit.content) == {"preset": "echo", "input": {"prompt": "hi"},
                                          "device": "gpu", "priority": "immediate",
                                          "timeout_s": 9.0, "content_type": None}
    assert "idempotency-key" in submit.headers
    assert submit.url.host == "127.0.0.1" and submit.url.port == 8765


def test_run_failed_exits_1_with_kind_and_message(monkeypatch: pytest.MonkeyPatch) -> None:
    failed = task("failed", error={"code": "oom", "kind": "oom", "message": "CUDA out of memory"})
    server = FakeServer(failed, sse((1, "state", {"state": "failed"})))
    res = invoke(server, monkeypatch, "run", "echo", "--input", "1")
    assert res.exit_code == 1
    assert "t1 failed: oom: CUDA out of memory" in res.stderr
    assert res.stdout == ""


def test_run_cancelled_exits_1(monkeypatch: pytest.MonkeyPatch) -> None:
    server = FakeServer(task("cancelled"), b"")
    res = invoke(server, monkeypatch, "run", "echo", "--input", "null")
    assert res.exit_code == 1
    assert "cancelled" in res.stderr


def test_run_json_prints_only_the_final_task(monkeypatch: pytest.MonkeyPatch) -> None:
    server = FakeServer(task("succeeded", output=[1, 2]))
    res = invoke(server, monkeypatch, "run", "echo", "--input", "[1, 2]", "--json")
    assert res.exit_code == 0
    assert json.loads(res.stdout)["output"] == [1, 2]
    assert not any(r.url.path.endswith("/events") for r in server.requests)


def test_run_no_wait_prints_the_id(monkeypatch: pytest.MonkeyPatch) -> None:
    server = FakeServer(task("succeeded"))
    res = invoke(server, monkeypatch, "run", "echo", "--input", "{}", "--no-wait")
    assert (res.exit_code, res.stdout) == (0, "t1\n")
    assert len(server.requests) == 1


def test_run_reads_input_from_file_and_uses_env_url_and_token(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path = tmp_path / "in.json"
    path.write_text('{"from": "file"}')
    server = FakeServer(task("succeeded"), b"")
    res = invoke(server, monkeypatch, "run", "echo", "--input", f"@{path}", "--no-wait",
                 env={"GPULANE_URL": "http://other:1234", "GPULANE_TOKEN": "tok"})
    assert res.exit_code == 0, res.output
    req = server.requests[0]
    assert json.loads(req.content)["input"] == {"from": "file"}
    assert (req.url.host, req.url.port) == ("other", 1234)
    assert req.headers["authorization"] == "Bearer tok"


@pytest.mark.parametrize(("value", "needle"), [
    ("{bad", "not valid JSON: Expecting property name"),
    ("hello", "a string needs JSON quotes"),
    ("@/no/such/file.json", "cannot read /no/such/file.json"),
])
def test_bad_input_is_a_usage_error(monkeypatch: pytest.MonkeyPatch, value: str,
                                    needle: str) -> None:
    server = FakeServer(task())
    res = invoke(server, monkeypatch, "run", "echo", "--input", value)
    assert res.exit_code == 2
    assert needle in res.stderr
    assert server.requests == []


def test_bad_priority_is_a_usage_error(monkeypatch: pytest.MonkeyPatch) -> None:
    res = invoke(FakeServer(task()), monkeypatch, "run", "echo", "--input", "1",
                 "--priority", "urgent")
    assert res.exit_code == 2
    assert "immediate, normal, background" in res.stderr


def test_server_refusal_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(404, json={"error": {"code": "unknown_preset",
                                                   "message": "no preset 'nope'",
                                                   "field": "preset"}})

    res = invoke(handler, monkeypatch, "run", "nope", "--input", "1")
    assert res.exit_code == 2
    assert "unknown_preset: no preset 'nope' (field: preset)" in res.stderr


@pytest.mark.parametrize("args", [["run", "echo", "--input", "1"], ["tasks"], ["gpus"]])
def test_unreachable_server_exits_3(monkeypatch: pytest.MonkeyPatch, args: list[str]) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("[Errno 111] Connection refused")

    res = invoke(handler, monkeypatch, *args, "--url", "http://127.0.0.1:9")
    assert res.exit_code == 3
    lines = res.stderr.strip().splitlines()
    assert lines == ["cannot reach gpulane at http://127.0.0.1:9: [Errno 111] Connection refused "
                     "(start it with `gpulane serve`)"]


def test_tasks_table_and_json(monkeypatch: pytest.MonkeyPatch) -> None:
    placed = task("running", id="t2", placement={"node": "n", "device": "gpu:0",
                                                 "fallback_reason": None})
    page = {"tasks": [task(), placed], "next_cursor": None}
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json=page)

    res = invoke(handler, monkeypatch, "tasks", "--state", "running", "--limit", "7")
    assert res.exit_code == 0, res.output
    assert "t1" in res.stdout and "t2" in res.stdout
    assert "gpu:0" in res.stdout and "auto" in res.stdout and "2m" in res.stdout
    assert dict(seen[0].url.params) == {"state": "running", "limit": "7"}
    res = invoke(handler, monkeypatch, "tasks", "--json")
    assert json.loads(res.stdout) == page


def test_gpus_table_and_simulated_line(monkeypatch: pytest.MonkeyPatch) -> None:
    info = {"provider": "sim", "simulated": True, "reason": "no NVIDIA driver found",
            "devices": [{"index": 0, "name": "Sim A100", "total_vram_mb": 40960,
                         "used_vram_mb": 1024, "utilization_pct": 12.0, "temperature_c": None}],
            "cpu": {"cores": 8, "concurrency": 8}}

    def handler(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/v1/gpus"
        return httpx.Response(200, json=info)

    res = invoke(handler, monkeypatch, "gpus")
    assert res.exit_code == 0, res.output
    assert "Sim A100" in res.stdout and "1,024 / 40,960" in res.stdout
    assert "GPUs are simulated (provider sim): no NVIDIA driver found" in res.stdout
    assert json.loads(invoke(handler, monkeypatch, "gpus", "--json").stdout) == info
