"""``gpulane serve`` exposed to a network, as a real process: no keys is a one-line refusal, a
keyed node on 0.0.0.0 answers only keys (the CLI and SDK send GPULANE_TOKEN), and
``gpulane keys new`` makes an entry the node accepts."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from gpulane.cli.server import bind_refusal, is_loopback
from gpulane.client import Client
from tests.e2e.test_serve_cli import Server

CLEAN_ENV = {k: v for k, v in os.environ.items()
             if k not in ("GPULANE_TOKEN", "GPULANE_KEYS", "GPULANE_KEYS_FILE",
                          "GPULANE_INSECURE_NO_AUTH", "GPULANE_HOST")}
"""The environment without any key or bind setting a developer may have exported."""


def gpulane(*args: str, env: dict[str, str] | None = None
            ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gpulane", *args], capture_output=True,
                          text=True, timeout=60, env={**CLEAN_ENV, **(env or {})})


@pytest.mark.parametrize(("host", "loopback"), [
    ("127.0.0.1", True), ("127.8.0.1", True), ("::1", True), ("[::1]", True),
    ("localhost", True), ("LocalHost.", True), ("0.0.0.0", False), ("::", False),
    ("", False), ("10.1.2.3", False), ("gpu-box.lan", False)])
def test_loopback_is_what_only_this_machine_reaches(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback
    assert (bind_refusal(host, keyed=False, insecure_no_auth=False) is None) is loopback
    assert bind_refusal(host, keyed=True, insecure_no_auth=False) is None
    assert bind_refusal(host, keyed=False, insecure_no_auth=True) is None


def test_a_public_bind_without_keys_is_refused_in_one_line(tmp_path: Path) -> None:
    done = gpulane("serve", "--host", "0.0.0.0", "--port", "0", "--data-dir",
                   str(tmp_path / "data"), "--simulate-gpus", "none")
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    for fix in ("0.0.0.0", "--keys-file", "GPULANE_KEYS", "--insecure-no-auth"):
        assert fix in lines[0], lines[0]
    assert not (tmp_path / "data").exists()  # refused before it touched anything


def test_a_bad_keys_file_is_refused_in_one_line(tmp_path: Path) -> None:
    keys = tmp_path / "keys.yaml"
    keys.write_text("keys:\n  - {name: ci, sha256: nothex, scopes: [tasks]}\n")
    done = gpulane("serve", "--keys-file", str(keys), "--data-dir", str(tmp_path / "data"))
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert str(keys) in done.stderr and "'sha256'" in done.stderr


def test_a_keyed_node_on_every_interface_answers_only_its_keys(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    made = gpulane("keys", "new", "ci", "--scopes", "tasks,leases")
    assert made.returncode == 0, made.stderr
    key = next(line for line in made.stdout.splitlines() if line.startswith("glk_"))
    entry = made.stdout[made.stdout.index("- name: ci"):]
    assert key not in entry
    keys = tmp_path / "keys.yaml"
    keys.write_text("keys:\n" + entry)
    srv = Server(tmp_path / "data", "--host", "0.0.0.0", "--keys-file", str(keys),
                 "--no-examples")
    srv.start()  # polls /readyz: the probes need no key
    try:
        assert httpx.get(f"{srv.url}/v1/gpus").status_code == 401
        assert httpx.get(f"{srv.url}/openapi.json").status_code == 401
        headers = {"Authorization": f"Bearer {key}"}
        assert httpx.get(f"{srv.url}/v1/gpus", headers=headers).status_code == 200
        refused = httpx.post(f"{srv.url}/v1/leases", content=b'{"holder": "x", "vram_mb": 1}',
                             headers={**headers, "Content-Type": "text/plain"})
        assert refused.status_code == 415
        # The CLI sends GPULANE_TOKEN, and is refused without it.
        cli = gpulane("gpus", "--url", srv.url, env={"GPULANE_TOKEN": key})
        assert cli.returncode == 0, cli.stderr
        bare = gpulane("gpus", "--url", srv.url)
        assert bare.returncode != 0 and "401" in bare.stderr + bare.stdout
        # So does the SDK.
        monkeypatch.setenv("GPULANE_TOKEN", key)
        with Client(srv.url) as client:
            assert client.gpus()["simulated"] is True
    finally:
        srv.kill(signal.SIGTERM)


@pytest.mark.parametrize("origin", ["app.example", "https://app.example/", "*"])
def test_a_cors_origin_that_no_browser_sends_is_refused_in_one_line(
        tmp_path: Path, origin: str) -> None:
    done = gpulane("serve", "--cors-origin", "https://ok.example", "--cors-origin", origin,
                   "--data-dir", str(tmp_path / "data"))
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert repr(origin) in done.stderr and "scheme://host[:port]" in done.stderr


def test_keys_new_refuses_an_unknown_scope_or_a_bad_name() -> None:
    for args in (["x", "--scopes", "tasks,gpus"], ["has space"]):
        done = gpulane("keys", "new", *args)
        assert done.returncode == 2 and not done.stdout, done.stdout
        assert len(done.stderr.strip().splitlines()) == 1
        assert "use" in done.stderr
