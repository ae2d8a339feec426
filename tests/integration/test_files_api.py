"""Files through a running node: uploads (POST/GET/DELETE /v1/files) and task inputs that name
files, with an attacker's eye. Every bad reference is a 4xx naming the field and the fix with
nothing stored; an oversized upload leaves nothing on disk; an upload is its key's own; the
faces preset finds the astronaut's face in a file named by path and by upload (the SDK's)."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

from gpulane.client import AsyncClient, Client
from gpulane.node import Node
from tests.integration.conftest import make_settings, serve_live, stop_node

KEYS = "a:k-a:tasks,b:k-b:tasks,ops:k-ops:admin,l:k-l:leases"


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "root"
    r.mkdir()
    (r / "doc.txt").write_text("hello")
    (tmp_path / "root2").mkdir()
    (tmp_path / "root2" / "doc.txt").write_text("beside")
    os.symlink("/etc/passwd", r / "passwd")
    return r


@pytest.fixture
async def node(tmp_path: Path, root: Path) -> AsyncIterator[Node]:
    n = Node(make_settings(tmp_path, allowed_roots=[str(root)], upload_max_bytes=4096,
                           keys=KEYS))
    await n.start()
    try:
        yield n
    finally:
        await stop_node(n)


def uploads(node: Node) -> list[str]:
    return sorted(os.listdir(node.files.dir))


async def test_an_upload_round_trip_with_any_content_type(api: httpx.AsyncClient,
                                                          node: Node) -> None:
    r = await api.post("/v1/files", params={"name": "scan 1.pdf"}, content=b"%PDF-1.7 ...",
                       headers={**auth("k-a"), "Content-Type": "application/pdf"})
    assert r.status_code == 201, r.text
    up = r.json()
    assert set(up) == {"id", "bytes", "sha256", "content_type", "name", "created_at",
                       "expires_at", "uploaded_by"}
    assert (up["bytes"], up["content_type"], up["name"], up["uploaded_by"]) == (
        12, "application/pdf", "scan 1.pdf", "a")
    assert up["expires_at"] - up["created_at"] == pytest.approx(24 * 3600)
    assert (await api.get(f"/v1/files/{up['id']}", headers=auth("k-a"))).json() == up
    task = await api.post("/v1/tasks", json={"preset": "sleep", "input": {"file": up["id"]}},
                          headers=auth("k-a"))
    assert task.status_code == 202, task.text
    assert task.json()["input"]["file"] == os.path.join(node.files.dir, up["id"])
    put = await api.put("/v1/files", content=b"x", headers=auth("k-a"))
    assert put.status_code == 405 and put.json()["error"]["code"] == "method_not_allowed"
    gone = await api.delete(f"/v1/files/{up['id']}", headers=auth("k-a"))
    assert gone.status_code == 200 and gone.json()["id"] == up["id"]
    assert uploads(node) == []
    again = await api.get(f"/v1/files/{up['id']}", headers=auth("k-a"))
    assert again.status_code == 404 and again.json()["error"]["code"] == "unknown_file"


async def test_an_upload_is_its_keys_own(api: httpx.AsyncClient) -> None:
    up = (await api.post("/v1/files", content=b"mine", headers=auth("k-a"))).json()
    path = f"/v1/files/{up['id']}"
    assert (await api.get(path, headers=auth("k-b"))).status_code == 404
    assert (await api.delete(path, headers=auth("k-b"))).status_code == 404
    ref = await api.post("/v1/tasks", json={"preset": "sleep", "input": {"file": up["id"]}},
                         headers=auth("k-b"))
    assert ref.status_code == 404, ref.text
    assert ref.json()["error"]["field"] == "input.file"
    assert (await api.get(path, headers=auth("k-ops"))).status_code == 200  # admin sees all
    as_admin = await api.post("/v1/tasks", json={"preset": "sleep",
                                                 "input": {"files": [up["id"]]}},
                              headers=auth("k-ops"))
    assert as_admin.status_code == 202, as_admin.text
    # Uploads need the tasks scope; no key at all is a 401.
    assert (await api.post("/v1/files", content=b"x", headers=auth("k-l"))).status_code == 403
    assert (await api.post("/v1/files", content=b"x")).status_code == 401
    listed = (await api.get("/v1/tasks", headers=auth("k-ops"))).json()["tasks"]
    assert [t["submitted_by"] for t in listed] == ["ops"]  # b's reference stored nothing


@pytest.mark.parametrize(("where", "code", "status"), [
    ("{root}/../root2/doc.txt", "path_outside_roots", 400),  # ../ traversal
    ("/etc/passwd", "path_outside_roots", 400),               # absolute, outside
    ("{root}/passwd", "path_outside_roots", 400),             # a symlink inside pointing out
    ("{root}2/doc.txt", "path_outside_roots", 400),           # prefix trick: root2 vs root
    ("root/doc.txt", "relative_path", 400),
    ("{root}/doc.txt\x00.png", "invalid_path", 400),
    ("{root}", "not_a_file", 400),
    ("{root}/missing.png", "file_not_found", 400),
    ("file-" + "0" * 32, "unknown_file", 404),
])
async def test_a_bad_reference_stores_nothing(api: httpx.AsyncClient, root: Path, where: str,
                                              code: str, status: int) -> None:
    bad = where.format(root=root)
    good = {"preset": "sleep", "input": {"file": str(root / "doc.txt")}}
    r = await api.post("/v1/tasks/bulk", headers=auth("k-a"), json={"tasks": [
        good, {"preset": "sleep", "input": {"ms": 1, "files": [str(root / "doc.txt"), bad]}}]})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert (err["code"], err["field"]) == (code, "tasks[1].input.files[1]")
    assert (await api.get("/v1/tasks", headers=auth("k-a"))).json()["tasks"] == []
    ok = await api.post("/v1/tasks", json=good, headers=auth("k-a"))
    assert ok.json()["input"]["file"] == str((root / "doc.txt").resolve())


async def test_an_upload_over_the_limit_by_its_length_is_413_and_leaves_nothing(
        api: httpx.AsyncClient, node: Node) -> None:
    r = await api.post("/v1/files", content=b"x" * 5000, headers=auth("k-a"))
    assert r.status_code == 413 and r.json()["error"]["code"] == "upload_too_large"
    assert "4096" in r.json()["error"]["message"] and uploads(node) == []


async def test_an_endless_chunked_upload_is_cut_off_at_the_limit(node: Node) -> None:
    sent = 0

    def endless() -> Iterator[bytes]:
        nonlocal sent
        while True:
            sent += 65536
            yield b"x" * 65536

    async with serve_live(node) as url:
        def post() -> httpx.Response:
            with httpx.Client(base_url=url, timeout=30) as c:
                return c.post("/v1/files", content=endless(), headers=auth("k-a"))

        r = await asyncio.to_thread(post)
    assert r.status_code == 413 and r.json()["error"]["code"] == "upload_too_large"
    assert uploads(node) == []
    assert sent < 200 * 1024 * 1024  # cut off, not read forever


async def test_retention_removes_an_upload(api: httpx.AsyncClient, node: Node) -> None:
    up = (await api.post("/v1/files", content=b"old", headers=auth("k-a"))).json()
    node.housekeeper.clock = lambda: time.time() + 25 * 3600
    report = await node.housekeeper.purge()
    assert report is not None and report["uploads"] == 1
    assert node.housekeeper.view()["retention"]["total"]["uploads"] == 1
    assert uploads(node) == []
    assert (await api.get(f"/v1/files/{up['id']}", headers=auth("k-a"))).status_code == 404


def astronaut_png() -> bytes:
    cv2 = pytest.importorskip("cv2")
    skdata = pytest.importorskip("skimage.data")
    ok, png = cv2.imencode(".png", cv2.cvtColor(skdata.astronaut(), cv2.COLOR_RGB2BGR))
    assert ok
    return bytes(png.tobytes())


def assert_one_face(task: dict[str, object]) -> None:
    assert task["state"] == "succeeded", task
    out = task["output"]
    assert isinstance(out, dict) and out["count"] == 1, out
    box = out["faces"][0]
    assert 140 < box["x"] + box["w"] / 2 < 300 and 40 < box["y"] + box["h"] / 2 < 200, box


async def test_faces_reads_a_file_by_path_and_by_sdk_upload(tmp_path: Path) -> None:
    png = astronaut_png()
    root = tmp_path / "shared"
    root.mkdir()
    (root / "astronaut.png").write_bytes(png)
    (tmp_path / "astronaut.png").write_bytes(png)
    node = Node(make_settings(tmp_path, allowed_roots=[str(root)]))
    await node.start()
    try:
        async with serve_live(node) as url:
            def sync_upload() -> str:
                with Client(url) as client:
                    up = client.upload(tmp_path / "astronaut.png")
                    assert (up["bytes"], up["content_type"], up["name"]) == (
                        len(png), "image/png", "astronaut.png")
                    return str(up["id"])

            by_sdk = await asyncio.to_thread(sync_upload)
            async with AsyncClient(url) as client:
                by_async = await client.upload(png, content_type="image/png")
                ids = [(await client.submit("faces", {"file": ref}))["id"] for ref in (
                    str(root / "astronaut.png"), by_sdk, by_async["id"])]
                done = [await client.result(i, wait=60) for i in ids]
    finally:
        await stop_node(node)
    for task in done:
        assert_one_face(task)
    assert done[0]["input"]["file"] == str((root / "astronaut.png").resolve())
