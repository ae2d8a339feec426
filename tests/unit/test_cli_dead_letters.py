"""`gpulane tasks --failed`, `gpulane retry ID` and `gpulane status`, against a mock server."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.unit.test_cli_client import invoke, task

DEAD = task("failed", attempts=3, error={"code": "worker_died", "kind": "worker_died",
                                         "message": "worker exited with code -9"})


def test_tasks_failed_lists_dead_letters_with_their_errors(
        monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"tasks": [DEAD], "next_cursor": None})

    res = invoke(handler, monkeypatch, "tasks", "--failed")
    assert res.exit_code == 0, res.output
    assert seen[0].url.params["state"] == "failed"
    assert "worker_died" in res.stdout and "t1" in res.stdout
    clash = invoke(handler, monkeypatch, "tasks", "--failed", "--state", "queued")
    assert clash.exit_code == 2 and "--failed" in clash.output


def test_retry_queues_a_dead_letter_again(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json=task("queued", attempts=0))

    res = invoke(handler, monkeypatch, "retry", "t1")
    assert res.exit_code == 0, res.output
    assert (seen[0].method, seen[0].url.path) == ("POST", "/v1/tasks/t1/retry")
    assert "t1 is queued again" in res.stdout


def test_retry_of_a_task_that_is_no_dead_letter_is_a_usage_error(
        monkeypatch: pytest.MonkeyPatch) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(409, json={"error": {
            "code": "not_retryable", "field": "id", "message": "task t1 is succeeded: only a "
            "failed or cancelled task can be retried (submit a new one instead)"}})

    res = invoke(handler, monkeypatch, "retry", "t1")
    assert res.exit_code == 2
    assert "409 not_retryable" in res.stderr


def test_status_shows_queues_limits_and_drain_rates(monkeypatch: pytest.MonkeyPatch) -> None:
    status = {"node": "n1", "started": True, "draining": True, "queued": 7,
              "presets": {"embed": {"queued": 7, "max_queued": 100, "drain_per_s": 2.5},
                          "sleep": {"queued": 0, "max_queued": 5, "drain_per_s": None}},
              "housekeeping": None}

    def handler(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/v1/status"
        return httpx.Response(200, json=status)

    res = invoke(handler, monkeypatch, "status")
    assert res.exit_code == 0, res.output
    assert "node n1: draining, 7 queued" in res.stdout
    assert "embed" in res.stdout and "2.5" in res.stdout
    raw = invoke(handler, monkeypatch, "status", "--json")
    assert json.loads(raw.stdout) == status


def test_drain_and_resume(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(f"{request.method} {request.url.path}")
        draining = request.url.path.endswith("/drain")
        return httpx.Response(200, json={"node": "n1", "draining": draining, "queued": 3,
                                         "presets": {}, "housekeeping": {}})

    res = invoke(handler, monkeypatch, "drain")
    assert res.exit_code == 0, res.output
    assert "node n1: draining, 3 queued" in res.stdout
    res = invoke(handler, monkeypatch, "drain", "--resume")
    assert "node n1: taking tasks" in res.stdout
    assert seen == ["POST /v1/admin/drain", "POST /v1/admin/resume"]


def test_drain_without_the_admin_scope_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(403, json={"error": {
            "code": "forbidden", "field": "Authorization",
            "message": "key 'app' lacks the 'admin' scope that POST /v1/admin/drain needs"}})

    res = invoke(handler, monkeypatch, "drain")
    assert res.exit_code == 2 and "403 forbidden" in res.stderr


def test_a_dead_letter_whose_stderr_looks_like_markup_is_listed_as_written(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # A worker's last stderr lines end up in the error; Rich would take "[/tmp/in]" for a
    # closing tag and fail the whole listing.
    message = "worker exited with code 1; stderr: cannot open [/tmp/in] [bold]"
    dead = task("failed", attempts=3, error={"code": "worker_died", "kind": "worker_died",
                                             "message": message})

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"tasks": [dead], "next_cursor": None})

    monkeypatch.setenv("COLUMNS", "400")
    res = invoke(handler, monkeypatch, "tasks", "--failed")
    assert res.exit_code == 0, res.output
    assert "[/tmp/in] [bold]" in res.stdout
