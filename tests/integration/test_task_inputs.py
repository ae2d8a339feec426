"""Task inputs that name files, as the API resolves them (api/task_inputs.py): off the event
loop, and a keyed repeat whose upload is gone since gets its task, not a 404."""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from gpulane.files import Files
from gpulane.node import Node
from tests.integration.conftest import make_settings, stop_node

A = {"Authorization": "Bearer k-a"}
B = {"Authorization": "Bearer k-b"}


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[Node]:
    root = tmp_path / "root"
    root.mkdir()
    (root / "doc.txt").write_text("hello")
    n = Node(make_settings(tmp_path, allowed_roots=[str(root)],
                           keys="a:k-a:tasks,b:k-b:tasks"))
    await n.start()
    try:
        yield n
    finally:
        await stop_node(n)


async def test_a_keyed_repeat_whose_upload_is_gone_gets_its_task(api: httpx.AsyncClient) -> None:
    up = (await api.post("/v1/files", content=b"img", headers=A)).json()["id"]
    body = {"preset": "sleep", "input": {"ms": 1, "file": up}}
    first = await api.post("/v1/tasks", json=body, headers={**A, "Idempotency-Key": "k1"})
    assert first.status_code == 202, first.text
    assert (await api.delete(f"/v1/files/{up}", headers=A)).status_code == 200
    again = await api.post("/v1/tasks", json=body, headers={**A, "Idempotency-Key": "k1"})
    assert again.status_code in (200, 202), again.text
    assert again.json()["id"] == first.json()["id"]
    bulk = await api.post("/v1/tasks/bulk", headers=A, json={"tasks": [
        {**body, "idempotency_key": "k1"}, {**body, "idempotency_key": "k2"}]})
    assert bulk.status_code == 404 and bulk.json()["error"]["field"] == "tasks[1].input.file"
    bulk = await api.post("/v1/tasks/bulk", headers=A, json={"tasks": [
        {**body, "idempotency_key": "k1"}]})
    assert bulk.status_code == 202 and bulk.json()["tasks"][0]["id"] == first.json()["id"]
    # The same key with another body is the store's 409; no key, or another key's, the 404.
    other = await api.post("/v1/tasks", json={**body, "priority": "background"},
                           headers={**A, "Idempotency-Key": "k1"})
    assert other.status_code == 409, other.text
    for headers in (A, {**B, "Idempotency-Key": "k1"}):
        r = await api.post("/v1/tasks", json=body, headers=headers)
        assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_file", r.text
    listed = (await api.get("/v1/tasks", headers=A)).json()["tasks"]
    assert [t["id"] for t in listed] == [first.json()["id"]]


async def test_a_keyed_repeat_whose_file_is_gone_gets_its_task(api: httpx.AsyncClient,
                                                                node: Node) -> None:
    doc = Path(node.files.roots[0]) / "gone.txt"
    doc.write_text("soon gone")
    body = {"preset": "sleep", "input": {"files": [str(doc)]}}
    first = await api.post("/v1/tasks", json=body, headers={**A, "Idempotency-Key": "k9"})
    assert first.status_code == 202, first.text
    doc.unlink()
    again = await api.post("/v1/tasks", json=body, headers={**A, "Idempotency-Key": "k9"})
    assert again.status_code in (200, 202) and again.json()["id"] == first.json()["id"]
    fresh = await api.post("/v1/tasks", json=body, headers={**A, "Idempotency-Key": "k10"})
    assert fresh.status_code == 400 and fresh.json()["error"]["code"] == "file_not_found"
    # Never past the roots: a path outside them is refused whatever its key made.
    outside = await api.post("/v1/tasks", json={**body, "input": {"file": "/etc/hostname"}},
                             headers={**A, "Idempotency-Key": "k9"})
    assert outside.json()["error"]["code"] == "path_outside_roots"


async def test_file_references_resolve_off_the_event_loop(
        api: httpx.AsyncClient, node: Node, monkeypatch: pytest.MonkeyPatch) -> None:
    threads: list[threading.Thread] = []
    real = Files.resolve_input

    def spy(self: Files, input: Any, *args: Any, **kwargs: Any) -> Any:
        threads.append(threading.current_thread())
        return real(self, input, *args, **kwargs)

    monkeypatch.setattr(Files, "resolve_input", spy)
    doc = str(Path(node.files.roots[0]) / "doc.txt")
    r = await api.post("/v1/tasks/bulk", headers=A, json={"tasks": [
        {"preset": "sleep", "input": {"file": doc}},
        {"preset": "sleep", "input": {"files": [doc, doc]}}]})
    assert r.status_code == 202, r.text
    assert len(threads) == 2 and threading.main_thread() not in threads
    threads.clear()
    plain = await api.post("/v1/tasks", json={"preset": "sleep", "input": {"ms": 1}},
                           headers=A)
    assert plain.status_code == 202 and threads == []  # nothing named: no thread hop


async def test_an_upload_s_record_is_read_and_removed_off_the_event_loop(
        api: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch) -> None:
    threads: list[threading.Thread] = []
    real = Files.find

    def spy(self: Files, *args: Any, **kwargs: Any) -> Any:
        threads.append(threading.current_thread())
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Files, "find", spy)
    up = (await api.post("/v1/files", content=b"img", headers=A)).json()["id"]
    assert (await api.get(f"/v1/files/{up}", headers=A)).status_code == 200
    assert (await api.delete(f"/v1/files/{up}", headers=A)).status_code == 200
    assert len(threads) == 2 and threading.main_thread() not in threads
