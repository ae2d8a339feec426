"""Files a task may name (gpulane/files.py), with an attacker's eye: every way out of the
allowed roots is a 400 naming the field and the fix; uploads are all or nothing on disk, owned
by their key, and retention removes them and a crashed upload's leftovers."""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gpulane.config import Settings
from gpulane.errors import ConfigError, NotFoundError, PayloadTooLargeError, RequestError
from gpulane.files import TEMP_GRACE_S, TEMP_SUFFIX, FileReferenceError, Files, clean_name
from gpulane.presets import Preset
from gpulane.protocol import ENV_ALLOWED_ROOTS
from gpulane.runtime.launchers import DeviceAssignment, DockerLauncher, ProcessLauncher


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """root/ (allowed) with a file, a folder, a link out; root2/ and outside/ beside it."""
    for d in ("root/sub", "root2", "outside", "uploads"):
        (tmp_path / d).mkdir(parents=True)
    (tmp_path / "root" / "sub" / "img.png").write_bytes(b"png")
    (tmp_path / "root2" / "x.png").write_bytes(b"png")
    (tmp_path / "outside" / "secret").write_text("s3cr3t")
    os.symlink(tmp_path / "outside" / "secret", tmp_path / "root" / "link-out")
    os.symlink(tmp_path / "root" / "sub" / "img.png", tmp_path / "root" / "link-in")
    return tmp_path


def files(tree: Path, roots: tuple[str, ...] | None = None, **kw: float) -> Files:
    return Files(roots if roots is not None else (str(tree / "root"),), tree / "uploads",
                 max_bytes=int(kw.get("max_bytes", 1024)), retain_s=kw.get("retain_s", 60.0))


def refused(f: Files, value: object, code: str) -> RequestError:
    with pytest.raises(RequestError) as info:
        f.resolve_input({"file": value}, "tasks[3].")
    err = info.value
    assert (err.code, err.field) == (code, "tasks[3].input.file"), err.message
    return err


def test_a_path_under_a_root_resolves_to_its_canonical_path(tree: Path) -> None:
    f = files(tree)
    real = str((tree / "root" / "sub" / "img.png").resolve())
    out = f.resolve_input({"file": str(tree / "root" / "sub" / ".." / "sub" / "img.png"),
                           "files": [str(tree / "root" / "link-in")], "min_size": 20})
    assert out == {"file": real, "files": [real], "min_size": 20}
    plain = {"text": "no files here"}
    assert f.resolve_input(plain) is plain and f.resolve_input([1, 2]) == [1, 2]


@pytest.mark.parametrize("where", [
    "root/../outside/secret",  # ../ traversal
    "outside/secret",          # an absolute path elsewhere
    "root/link-out",           # a symlink inside a root pointing out
    "root2/x.png",             # /tmp/.../root2 is not under /tmp/.../root
])
def test_every_way_out_of_the_roots_is_path_outside_roots(tree: Path, where: str) -> None:
    err = refused(files(tree), str(tree / where), "path_outside_roots")
    assert err.status == 400 and str((tree / "root").resolve()) in err.message
    assert err.extra["roots"] == [str((tree / "root").resolve())]
    assert "POST /v1/files" in err.message
    refused(files(tree), "/etc/passwd", "path_outside_roots")


def test_without_roots_the_fix_says_to_set_them_or_upload(tree: Path) -> None:
    err = refused(files(tree, roots=()), str(tree / "root" / "sub" / "img.png"),
                  "path_outside_roots")
    assert "allowed_roots" in err.message and "POST /v1/files" in err.message


def test_an_upload_is_named_by_id_never_by_its_path(tree: Path) -> None:
    # Even when the uploads folder lies under a root: its files belong to their keys.
    f = Files((str(tree),), tree / "uploads", max_bytes=10, retain_s=60)
    (tree / "uploads" / ("file-" + "0" * 32)).write_bytes(b"x")
    refused(f, str(tree / "uploads" / ("file-" + "0" * 32)), "path_outside_roots")


@pytest.mark.parametrize(("value", "code"), [
    ("sub/img.png", "relative_path"),
    ("./img.png", "relative_path"),
    ("/tmp/a\x00b", "invalid_path"),
    ("/" + "a" * 5000, "invalid_path"),
    ("", "invalid_path"),
    ("file-" + "0" * 32 + "\n", "relative_path"),  # not an upload id: ids match whole
    (42, "invalid_path"),
    (None, "invalid_path"),
])
def test_malformed_references_are_400(tree: Path, value: object, code: str) -> None:
    err = refused(files(tree), value, code)
    assert err.status == 400


def test_a_folder_or_a_missing_file_is_refused(tree: Path) -> None:
    f = files(tree)
    refused(f, str(tree / "root" / "sub"), "not_a_file")
    refused(f, str(tree / "root" / "nope.png"), "file_not_found")


def test_files_must_be_a_short_list_and_each_bad_one_is_named(tree: Path) -> None:
    f = files(tree)
    good = str(tree / "root" / "sub" / "img.png")
    with pytest.raises(FileReferenceError) as info:
        f.resolve_input({"files": [good, "rel.png"]})
    assert info.value.field == "input.files[1]"
    with pytest.raises(FileReferenceError) as info:
        f.resolve_input({"files": good})
    assert info.value.code == "invalid_path"
    with pytest.raises(FileReferenceError) as info:
        f.resolve_input({"files": [good] * 1000})
    assert info.value.code == "too_many_files"


def test_a_root_that_does_not_exist_is_a_config_error(tree: Path) -> None:
    with pytest.raises(ConfigError, match="nope"):
        files(tree, roots=(str(tree / "nope"),))


def test_settings_split_roots_like_path_or_by_commas(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPULANE_ALLOWED_ROOTS", f"/a{os.pathsep}/b,/c")
    monkeypatch.setenv("GPULANE_FILE_RETAIN_S", "12h")
    s = Settings.load()
    assert s.allowed_roots == ["/a", "/b", "/c"] and s.file_retain_s == 12 * 3600
    assert s.uploads_dir == s.data_dir / "files"


async def chunks(*parts: bytes) -> AsyncIterator[bytes]:
    for part in parts:
        yield part
        await asyncio.sleep(0)


async def endless() -> AsyncIterator[bytes]:
    while True:
        yield b"x" * 100
        await asyncio.sleep(0)


def on_disk(tree: Path) -> list[str]:
    return sorted(os.listdir(tree / "uploads"))


async def test_an_upload_is_stored_whole_under_its_id_with_its_record(tree: Path) -> None:
    f = files(tree)
    up = await f.save(chunks(b"hello ", b"world"), content_type="text/plain",
                      name="../../etc/My Photo?.png", owner="a")
    assert (up.bytes, up.sha256) == (11, hashlib.sha256(b"hello world").hexdigest())
    assert (up.content_type, up.name, up.uploaded_by) == ("text/plain", "My Photo_.png", "a")
    assert up.expires_at == pytest.approx(up.created_at + 60)
    assert on_disk(tree) == [up.id, f"{up.id}.json"]
    assert f.resolve_input({"file": up.id}, owner="a") == {
        "file": str((tree / "uploads" / up.id).resolve())}
    assert f.find(up.id, "a") == up and f.find(up.id, None) == up


async def test_an_upload_is_another_keys_404_unless_admin(tree: Path) -> None:
    f = files(tree)
    up = await f.save(chunks(b"x"), owner="a")
    for call in (lambda: f.find(up.id, "b"), lambda: f.delete(up.id, "b"),
                 lambda: f.resolve_input({"file": up.id}, owner="b")):
        with pytest.raises(NotFoundError) as info:
            call()
        assert info.value.code == "unknown_file"
    f.admins = frozenset({"root"})
    assert f.resolve_input({"files": [up.id]}, owner="root")["files"][0].endswith(up.id)
    assert f.delete(up.id, "a") == up and on_disk(tree) == []
    with pytest.raises(NotFoundError):
        f.find(up.id, "a")
    with pytest.raises(NotFoundError) as info:
        f.resolve_input({"file": "file-" + "f" * 32}, "tasks[0].")
    assert info.value.field == "tasks[0].input.file"


@pytest.mark.parametrize("declared", [2048, None])
async def test_an_oversized_upload_is_413_and_leaves_nothing(tree: Path,
                                                             declared: int | None) -> None:
    f = files(tree)
    with pytest.raises(PayloadTooLargeError) as info:
        await f.save(endless(), declared=declared)
    err = info.value
    assert err.code == "upload_too_large" and "1024" in err.message
    assert err.headers["Connection"] == "close"
    assert on_disk(tree) == []


async def test_retention_removes_expired_uploads_and_crashed_leftovers(tree: Path) -> None:
    now = [1_000_000.0]
    f = Files((), tree / "uploads", max_bytes=100, retain_s=60, clock=lambda: now[0])
    old = await f.save(chunks(b"old"))
    now[0] += 30
    young = await f.save(chunks(b"young"))
    crashed = tree / "uploads" / f"file-{'a' * 32}{TEMP_SUFFIX}"
    orphan = tree / "uploads" / f"file-{'b' * 32}"  # renamed, its record never written
    fresh = tree / "uploads" / f"file-{'c' * 32}{TEMP_SUFFIX}"  # an upload under way
    mine = tree / "uploads" / "README"
    theirs = tree / "uploads" / "notes.part"  # not an upload's: left alone, however old
    for p in (crashed, orphan, fresh, mine, theirs):
        p.write_bytes(b"x")
    stale = now[0] - TEMP_GRACE_S - 1
    for p in (crashed, orphan, theirs):
        os.utime(p, (stale, stale))
    fresh_at = now[0] + 40 - 5
    os.utime(fresh, (fresh_at, fresh_at))
    now[0] += 40  # old is 70 s old, young 40 s
    assert f.purge() == 1
    assert on_disk(tree) == sorted([young.id, f"{young.id}.json", fresh.name, "README",
                                    "notes.part"])
    with pytest.raises(NotFoundError):
        f.find(old.id)
    assert f.find(young.id) == young


def test_names_are_kept_safe() -> None:
    assert clean_name("C:\\Users\\me\\face.jpg") == "face.jpg"
    assert clean_name("..") is None and clean_name(None) is None
    assert clean_name("a\x00\nb") == "a_b"
    assert len(clean_name("a" * 1000) or "") == 255


def test_docker_workers_get_each_root_read_only_at_its_own_path(tree: Path) -> None:
    f = files(tree, roots=(str(tree / "root"), str(tree / "root2")))
    preset = Preset(name="w", runtime="docker", image="img")
    spec = DockerLauncher().build(preset, DeviceAssignment("cpu"), "w-1", f.worker_env())
    mounts = [spec.argv[i + 1] for i, a in enumerate(spec.argv) if a == "-v"]
    roots = [str((tree / d).resolve()) for d in ("root", "root2", "uploads")]
    assert mounts == [f"{r}:{r}:ro" for r in roots]
    assert spec.argv.index("-v") < spec.argv.index("img")
    assert ENV_ALLOWED_ROOTS in spec.argv and spec.env[ENV_ALLOWED_ROOTS] == os.pathsep.join(roots)
    plain = ProcessLauncher().build(Preset(name="p", argv=("python", "w.py")),
                                    DeviceAssignment("cpu"), "p-1", f.worker_env())
    assert plain.env[ENV_ALLOWED_ROOTS] == os.pathsep.join(roots)
