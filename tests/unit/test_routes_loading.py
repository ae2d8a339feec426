"""Content-type routes: patterns and matching, precedence, and every load error of a
registry's ``routes:`` section with its FILE:LINE and fix (issue 13, item 2)."""

from __future__ import annotations

from pathlib import Path

import pytest

from gpulane.errors import PresetError
from gpulane.presets import Preset, check_file, example_presets_dir, load_presets
from gpulane.presets.content_types import (
    ContentRoute,
    RouteTable,
    accepted,
    covers,
    is_pattern,
    normalize,
)

PRESETS = """\
presets:
  - name: faces
    argv: [python, w.py]
    accepts: [application/json, image/*]
  - name: embed
    argv: [python, w.py]
    accepts: [application/json, text/plain]
  - name: anything
    argv: [python, w.py]
    accepts: ["*/*"]
"""


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def problems(*paths: Path) -> list[str]:
    with pytest.raises(PresetError) as info:
        load_presets(paths)
    return info.value.problems


# -- patterns and matching --------------------------------------------------------------------


@pytest.mark.parametrize(("given", "want"), [
    ("image/PNG; q=1", "image/png"), ("  Text/Plain ", "text/plain"),
    ("application/json;charset=utf-8", "application/json")])
def test_normalize_lowercases_and_drops_parameters(given: str, want: str) -> None:
    assert normalize(given) == want


@pytest.mark.parametrize("text", ["image/png", "image/*", "*/*", "application/vnd.a+json"])
def test_patterns(text: str) -> None:
    assert is_pattern(text)


@pytest.mark.parametrize("text", ["image", "*/png", "image/", "/png", "image/png/x", "*", ""])
def test_not_patterns(text: str) -> None:
    assert not is_pattern(text)


def test_the_most_specific_route_wins_whatever_the_order() -> None:
    table = RouteTable({"*/*": "anything", "image/png": "png", "image/*": "faces"})
    assert table.match("image/png") == "png"
    assert table.match("IMAGE/PNG; q=1") == "png"
    assert table.match("image/jpeg") == "faces"
    assert table.match("text/plain") == "anything"
    assert table.patterns() == ["image/png", "image/*", "*/*"]
    assert table.view()[0] == {"content_type": "image/png", "preset": "png"}


def test_no_route_matches() -> None:
    table = RouteTable({"image/*": "faces"})
    assert table.match("text/plain") is None
    assert table.match("imagex/png") is None
    assert RouteTable().match("image/png") is None and len(RouteTable()) == 0


def test_accepts_take_wildcards() -> None:
    assert accepted(["application/json", "image/*"], "image/PNG; q=1")
    assert not accepted(["application/json", "image/*"], "text/plain")
    assert accepted(["*/*"], "text/plain")


@pytest.mark.parametrize(("accepts", "pattern", "want"), [
    (["image/*"], "image/png", True), (["image/*"], "image/*", True),
    (["image/png"], "image/*", False), (["*/*"], "*/*", True), (["image/*"], "*/*", False),
    (["text/plain"], "text/plain", True), (["text/plain"], "text/html", False)])
def test_covers(accepts: list[str], pattern: str, want: bool) -> None:
    assert covers(accepts, pattern) is want


def test_a_preset_refuses_an_accepts_entry_that_is_no_pattern() -> None:
    with pytest.raises(ValueError, match="is not a content type"):
        Preset(name="p", argv=("x",), accepts=("*/png",))
    assert Preset(name="p", argv=("x",), accepts=("image/*",)).accepts == ("image/*",)


# -- loading ----------------------------------------------------------------------------------


def test_routes_load_in_both_shapes_across_files(tmp_path: Path) -> None:
    presets = write(tmp_path, "a.yaml", PRESETS)
    mapping = write(tmp_path, "b.yaml", 'routes:\n  "image/*": faces\n  text/plain: embed\n')
    listed = write(tmp_path, "c.yaml", "routes:\n  - {content_type: '*/*', preset: anything}\n")
    registry = load_presets([presets, mapping, listed])
    assert registry.routes.view() == [
        {"content_type": "text/plain", "preset": "embed"},
        {"content_type": "image/*", "preset": "faces"},
        {"content_type": "*/*", "preset": "anything"}]
    assert check_file(mapping) == []  # a routes-only file is a file of its own


def test_routes_beside_presets_in_one_file(tmp_path: Path) -> None:
    path = write(tmp_path, "a.yaml", PRESETS + "routes:\n  Image/PNG: faces\n")
    assert load_presets([path]).routes.match("image/png") == "faces"


def test_a_registry_made_in_code_has_no_routes_unless_given() -> None:
    from gpulane.presets import PresetRegistry

    assert len(PresetRegistry().routes) == 0
    assert PresetRegistry(routes={"image/*": "faces"}).routes.match("image/gif") == "faces"


def test_an_unknown_preset(tmp_path: Path) -> None:
    presets = write(tmp_path, "a.yaml", PRESETS)
    routes = write(tmp_path, "b.yaml", "routes:\n  image/*: facez\n  text/plain: nope\n")
    found = problems(presets, routes)
    assert found == [
        f"{routes}:2: route 'image/*': preset 'facez' is not known; fix: did you mean "
        "'faces'?",
        f"{routes}:3: route 'text/plain': preset 'nope' is not known; fix: route it to one "
        "of: faces, embed, anything"]


@pytest.mark.parametrize("pattern", ["image", "'*/png'", "image/png/x", "3"])
def test_a_bad_pattern(tmp_path: Path, pattern: str) -> None:
    path = write(tmp_path, "a.yaml", PRESETS + f"routes:\n  {pattern}: faces\n")
    (found,) = problems(path)
    assert found.startswith(f"{path}:12: route ")
    assert "is not a content type pattern; fix: write type/subtype, type/* or */*" in found


def test_a_later_file_s_route_replaces_an_earlier_one(tmp_path: Path) -> None:
    presets = write(tmp_path, "a.yaml", PRESETS)
    one = write(tmp_path, "b.yaml", "routes:\n  image/*: faces\n  image/png: faces\n")
    two = write(tmp_path, "c.yaml", "routes:\n  Image/*: anything\n")
    registry = load_presets([presets, one, two])
    assert registry.routes.view() == [{"content_type": "image/png", "preset": "faces"},
                                      {"content_type": "image/*", "preset": "anything"}]


def test_a_user_file_overrides_the_examples_routes(tmp_path: Path) -> None:
    """The examples are loaded first by default: a user's image/* route is no duplicate."""
    from gpulane.presets.loading import check_routes

    mine = write(tmp_path, "mine.yaml", PRESETS.replace("faces", "my-faces")
                 + "routes:\n  image/*: my-faces\n")
    registry = load_presets([example_presets_dir(), mine])
    assert registry.routes.match("image/jpeg") == "my-faces"
    assert registry.routes.match("text/plain") == "embed"  # the examples' route stays
    assert check_routes([mine]) == []


def test_presets_check_without_the_examples(tmp_path: Path) -> None:
    """A route to an example preset is unknown when the examples are not loaded."""
    from gpulane.presets.loading import check_routes

    mine = write(tmp_path, "mine.yaml", "routes:\n  image/gif: faces\n")
    assert check_routes([mine]) == []
    (found,) = check_routes([mine], examples=False)
    assert found.startswith(f"{mine}:2: route 'image/gif': preset 'faces' is not known")


def test_the_same_pattern_twice_in_one_file(tmp_path: Path) -> None:
    path = write(tmp_path, "a.yaml", PRESETS + "routes:\n  image/*: faces\n  image/*: faces\n")
    assert problems(path) == [
        f"{path}:13: route 'image/*' is given twice in this file (first on line 12); fix: "
        "keep only one of them"]


def test_a_route_to_a_preset_that_does_not_accept_the_type(tmp_path: Path) -> None:
    path = write(tmp_path, "a.yaml", PRESETS + "routes:\n  image/*: embed\n")
    assert problems(path) == [
        f"{path}:12: route 'image/*': preset 'embed' does not accept image/* (its accepts: "
        "[application/json, text/plain]); fix: add image/* to the accepts of preset 'embed', "
        "or route the type to a preset that takes it (a later file's route replaces it)"]


def test_a_later_file_that_narrows_a_preset_breaks_its_route(tmp_path: Path) -> None:
    presets = write(tmp_path, "a.yaml", PRESETS + "routes:\n  image/*: faces\n")
    narrower = write(tmp_path, "b.yaml", "presets:\n  - {name: faces, argv: [x]}\n")
    (found,) = problems(presets, narrower)
    assert "preset 'faces' does not accept image/*" in found


@pytest.mark.parametrize(("section", "line", "what"), [
    ("routes: [image/png]", 11, "entry #1 of 'routes' is not a mapping"),
    ("routes:\n  - {content_type: image/png}", 12, "entry #1 of 'routes' has no preset"),
    ("routes:\n  - {content_type: image/png, preset: faces, prio: 1}", 12,
     "entry #1 of 'routes': 'prio' is not a known field"),
    ("routes: faces", 11, "'routes' must be a mapping of content type: preset"),
    ("routes:\n  image/png: [faces]", 12, "route 'image/png': the preset must be a preset's "
     "name"),
])
def test_malformed_sections(tmp_path: Path, section: str, line: int, what: str) -> None:
    path = write(tmp_path, "a.yaml", PRESETS + section + "\n")
    found = problems(path)
    assert any(p.startswith(f"{path}:{line}: {what}") and "; fix: " in p for p in found), found


def test_a_route_made_in_code_has_no_source() -> None:
    assert ContentRoute("image/*", "faces").source == ":0"


# -- check_routes (gpulane presets check) ------------------------------------------------------


def test_check_routes_sees_the_other_files_and_the_examples(tmp_path: Path) -> None:
    from gpulane.presets.loading import check_routes

    presets = write(tmp_path, "a.yaml", PRESETS.replace("faces", "my-faces"))
    routes = write(tmp_path, "b.yaml", 'routes:\n  image/png: my-faces\n  text/csv: nope\n'
                   '  image/gif: faces\n')  # faces: an example preset
    assert check_routes([presets, routes]) == [
        f"{routes}:3: route 'text/csv': preset 'nope' is not known; fix: route it to one of: "
        + ", ".join([*load_presets([example_presets_dir()]).names(), "my-faces", "anything"])]


def test_check_routes_of_the_examples_themselves_counts_them_once() -> None:
    from gpulane.presets.loading import check_routes

    folder = example_presets_dir()
    assert check_routes(sorted(folder.glob("*.yaml"))) == []
    assert check_routes([folder / "routes.yaml"]) == []
