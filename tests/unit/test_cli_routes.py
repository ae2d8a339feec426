"""`gpulane routes` and `gpulane run --gpu/--cpu/--no-fallback/--content-type`."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner

from gpulane.cli import main
from tests.unit.test_cli_client import FakeServer, invoke, task

ROUTES = {"routes": [{"content_type": "image/*", "preset": "faces"},
                     {"content_type": "*/*", "preset": "anything"}]}


def routes_server(request: httpx.Request) -> httpx.Response:
    assert (request.method, request.url.path) == ("GET", "/v1/routes")
    return httpx.Response(200, json=ROUTES)


def test_routes_table(monkeypatch: pytest.MonkeyPatch) -> None:
    result = invoke(routes_server, monkeypatch, "routes")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert any("image/*" in line and "faces" in line for line in lines)
    assert [i for i, line in enumerate(lines) if "image/*" in line] < \
        [i for i, line in enumerate(lines) if "*/*" in line and "anything" in line]


def test_routes_json(monkeypatch: pytest.MonkeyPatch) -> None:
    result = invoke(routes_server, monkeypatch, "routes", "--json")
    assert result.exit_code == 0 and json.loads(result.output) == ROUTES


def test_no_routes(monkeypatch: pytest.MonkeyPatch) -> None:
    result = invoke(lambda r: httpx.Response(200, json={"routes": []}), monkeypatch, "routes")
    assert result.exit_code == 0 and "no routes" in result.output


@pytest.mark.parametrize(("flag", "gpu"), [("--gpu", "true"), ("--cpu", "false")])
def test_run_gpu_or_cpu(monkeypatch: pytest.MonkeyPatch, flag: str, gpu: str) -> None:
    server = FakeServer(task("succeeded", output={"ok": True}))
    result = invoke(server, monkeypatch, "run", "echo", "--input", "{}", flag, "--json")
    assert result.exit_code == 0, result.output
    assert server.requests[0].url.params["gpu"] == gpu


def test_run_routed_by_content_type_without_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    server = FakeServer(task("succeeded", output={"faces": []}))
    result = invoke(server, monkeypatch, "run", "--content-type", "image/png", "--input",
                    '{"image_b64": ""}', "--no-fallback", "--json")
    assert result.exit_code == 0, result.output
    body = json.loads(server.requests[0].content)
    assert "preset" not in body and body["content_type"] == "image/png"
    assert body["fallback"] is False and "gpu" not in server.requests[0].url.params


def test_run_needs_a_preset_or_a_content_type(monkeypatch: pytest.MonkeyPatch) -> None:
    server = FakeServer(task("succeeded"))
    result = invoke(server, monkeypatch, "run", "--input", "{}")
    assert result.exit_code == 2 and "--content-type" in result.output
    assert server.requests == []


def test_presets_check_checks_routes_across_files(tmp_path: Path) -> None:
    presets = tmp_path / "a.yaml"
    presets.write_text("presets:\n  - {name: mine, argv: [x], accepts: [text/csv]}\n")
    routes = tmp_path / "b.yaml"
    routes.write_text("routes:\n  text/csv: mine\n")
    ok = CliRunner().invoke(main, ["presets", "check", str(tmp_path)])
    assert ok.exit_code == 0 and "ok: 1 preset(s) valid" in ok.output
    routes.write_text("routes:\n  text/csv: mien\n")
    bad = CliRunner().invoke(main, ["presets", "check", str(routes)])
    assert bad.exit_code == 1
    assert f"{routes}:2: route 'text/csv': preset 'mien' is not known" in bad.output
