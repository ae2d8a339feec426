"""Loading presets: registry files, and every problem at once with its file and line.

They come from YAML files, several entries per file, under ``models:`` (the common
model_presets.yaml shape: name -> entry) or ``presets:`` (a list of entries with ``name:``, or
name -> entry). Every problem is reported at once as
``FILE:LINE: field 'x' of preset 'y': what is wrong; fix: how``.

Any file may also hold ``routes:``, content types to preset names (``{"image/*": faces}``, or a
list of ``{content_type, preset}``; see :mod:`gpulane.presets.content_types`). A route may name
a preset of another file, so the checks across files (an unknown preset, one that does not
accept the type) run once every file is read. A pattern given again in a later file replaces
the earlier route, as a later preset replaces one of the same name: the examples' routes are
defaults that a user's files override (within one file a pattern given twice is an error).
"""

from __future__ import annotations

import difflib
import logging
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pydantic
import yaml

from gpulane.errors import PresetError
from gpulane.presets.content_types import (
    PATTERN_FORMS,
    ContentRoute,
    RouteTable,
    covers,
    is_pattern,
    normalize,
)
from gpulane.presets.schema import (
    SIZE_FORMS,
    BatchSettings,
    Preset,
    Runtime,
    lowercase,
    show_value,
    size_mb,
)

log = logging.getLogger("gpulane.presets")


# --- registry --------------------------------------------------------------------------------

class PresetRegistry(Mapping[str, Preset]):
    """Presets by name, in the order first added; adding a known name replaces that preset.
    ``routes``: the content-type routes of its files (checked against its presets when
    loaded from files)."""

    def __init__(self, presets: Iterable[Preset] = (),
                 routes: RouteTable | Mapping[str, str] | None = None) -> None:
        self._presets: dict[str, Preset] = {}
        for p in presets:
            self.add(p)
        self.routes = routes if isinstance(routes, RouteTable) else RouteTable(routes or {})

    def add(self, preset: Preset) -> None:
        old = self._presets.get(preset.name)
        if old is not None:
            log.info("preset %r from %s overrides the one from %s",
                     preset.name, preset.source or "code", old.source or "code")
        self._presets[preset.name] = preset

    def names(self) -> list[str]:
        return list(self._presets)

    def __getitem__(self, name: str) -> Preset:
        return self._presets[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._presets)

    def __len__(self) -> int:
        return len(self._presets)

    def __repr__(self) -> str:
        return f"PresetRegistry({self.names()!r})"


# --- YAML with line numbers ------------------------------------------------------------------

class _LineDict(dict[Any, Any]):
    """A YAML mapping that knows its line, each key's line, and every pair as written
    (PyYAML keeps only the last of two equal keys; ``pairs`` keeps both)."""

    line: int = 0
    key_lines: dict[Any, int]
    pairs: list[tuple[Any, int, Any]]


class _LineLoader(yaml.SafeLoader):
    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.dups: list[tuple[int, Any, int, int]] = []  # id(mapping), key, line, first line


def _construct_map(loader: _LineLoader, node: yaml.MappingNode) -> Iterator[_LineDict]:
    data = _LineDict()
    data.line, data.key_lines, data.pairs = node.start_mark.line + 1, {}, []
    yield data  # first, so that recursive anchors resolve, as in SafeLoader
    own = [(k, v) for k, v in node.value if k.tag != "tag:yaml.org,2002:merge"]
    data.update(loader.construct_mapping(node))  # also flattens `<<` merges into node.value
    for key_node, _ in node.value:  # merged keys come first, so own keys' lines win
        data.key_lines[loader.construct_object(key_node)] = key_node.start_mark.line + 1
    seen: dict[Any, int] = {}
    for key_node, value_node in own:
        key, line = loader.construct_object(key_node), key_node.start_mark.line + 1
        if key in seen:
            loader.dups.append((id(data), key, line, seen[key]))
        seen.setdefault(key, line)
        data.pairs.append((key, line, loader.construct_object(value_node)))
    data.pairs[:0] = [(k, data.key_lines[k], v) for k, v in data.items() if k not in seen]


_LineLoader.add_constructor("tag:yaml.org,2002:map", _construct_map)

# --- files -----------------------------------------------------------------------------------

_TOP_KEYS = ["models", "presets", "routes"]
_ROUTE_KEYS = ["content_type", "preset"]
_ENTRY_KEYS = [*(f for f in Preset.model_fields if f != "source"), "docker_image", "vram",
               "resources"]
_RESOURCE_KEYS = ["vram", "vram_mb", "gpu", "devices"]
_TARGET = {"docker_image": "image", "vram": "vram_mb", "resources.vram": "vram_mb",
           "resources.vram_mb": "vram_mb", "resources.gpu": "devices",
           "resources.devices": "devices"}
_BOUNDS = {"greater_than_equal": ">=", "greater_than": ">", "less_than_equal": "<=",
           "less_than": "<"}


def _near(word: object, options: list[str], lead: str = "remove it; known") -> str:
    close = difflib.get_close_matches(str(word), options, n=1, cutoff=0.6)
    return f"did you mean '{close[0]}'?" if close else f"{lead}: " + ", ".join(options)


class _Problems:
    """The problems of one file, as ``FILE:LINE: field 'x' of preset 'y': what; fix: how``."""

    def __init__(self, file: str) -> None:
        self.file = file
        self.found: list[tuple[int, str]] = []

    def add(self, line: int | None, what: str, fix: str, preset: str | None = None,
            field: str | None = None) -> None:
        head = f"{self.file}:{line}: " if line else f"{self.file}: "
        if preset:
            head += f"field '{field}' of preset '{preset}': " if field else \
                f"preset '{preset}': "
        self.found.append((line or 0, f"{head}{what}; fix: {fix}"))

    def items(self) -> list[str]:
        return [text for _, text in sorted(self.found, key=lambda p: p[0])]


def _explain(err: Mapping[str, Any]) -> tuple[str, str]:
    """One pydantic error as (what is wrong, how to fix it)."""
    kind, ctx, got = err["type"], err.get("ctx") or {}, show_value(err.get("input"))
    if kind == "preset":
        return str(ctx["what"]), str(ctx["fix"])
    if kind in _BOUNDS:
        limit = next(iter(ctx.values()))
        return f"must be {_BOUNDS[kind]} {limit}, got {got}", \
            f"use a value {_BOUNDS[kind]} {limit}"
    if kind == "enum":
        names = re.findall(r"'([^']*)'", str(ctx.get("expected", "")))
        return f"must be {ctx.get('expected')}, got {got}", \
            _near(err.get("input"), names, "use one of")
    num, seq, dct = ("a number", "write a number, e.g. 2.5"), \
        ("a list", "write a list, e.g. [a, b]"), ("a mapping", "write KEY: value pairs")
    simple = {"int": ("a whole number", "write a whole number, e.g. 3"), "float": num,
              "finite": num, "bool": ("true or false", "write true or false"),
              "string": ("text", "write it as a (quoted) string"), "tuple": seq, "list": seq,
              "dict": dct, "model": dct}
    if kind.endswith(("_type", "_parsing", "_from_float", "_number")) and \
            (hit := simple.get(kind.split("_")[0])):
        return f"must be {hit[0]}, got {got}", hit[1]
    return f"{err.get('msg', 'is invalid')}, got {got}", "correct the value"


def _line_of(raw: object, loc: tuple[Any, ...], line: int) -> int:
    """The line of the deepest key along ``loc`` that the YAML recorded."""
    for part in loc:
        if isinstance(raw, _LineDict) and part in raw.key_lines:
            line, raw = raw.key_lines[part], raw[part]
        elif isinstance(raw, list) and isinstance(part, int) and part < len(raw):
            raw = raw[part]
        else:
            break
    return line


def _entry(raw: _LineDict, name: str, line: int, path: Path, out: _Problems) -> Preset | None:
    """Map one YAML entry (either shape) onto Preset fields and validate it."""
    data: dict[str, Any] = {}
    origin: dict[str, tuple[str, int]] = {}  # field -> (key as written, its line)
    before = len(out.found)

    def put(label: str, value: object, at: int) -> None:
        field = _TARGET.get(label, label)
        if field in origin:  # the same key twice is reported with the YAML's duplicates
            if origin[field][0] != label:
                out.add(at, f"sets {field} again (already set by '{origin[field][0]}' on line "
                        f"{origin[field][1]})", "keep only one of them", name, label)
            return
        origin[field], data[field] = (label, at), value

    for key, at, value in raw.pairs:
        if key == "name":
            if value != name:
                out.add(at, f"{show_value(value)} differs from the entry's key {show_value(name)}",
                        "remove name: or make it match", name, "name")
        elif key == "resources" and isinstance(value, _LineDict):
            for rkey, rat, rvalue in value.pairs:
                if rkey in _RESOURCE_KEYS:
                    put(f"resources.{rkey}", rvalue, rat)
                else:
                    out.add(rat, "is not a known resource", _near(rkey, _RESOURCE_KEYS),
                            name, f"resources.{rkey}")
        elif key == "resources":
            out.add(at, f"must be a mapping, got {show_value(value)}",
                    "write e.g. {vram: 2GiB, gpu: true}", name, "resources")
        elif key in _ENTRY_KEYS:
            put(key, value, at)
        else:
            fix = "remove it; the loader sets it" if key == "source" else _near(key, _ENTRY_KEYS)
            out.add(at, "is not a known field", fix, name, str(key))

    label, at = origin.get("vram_mb", ("vram_mb", line))
    if label != "vram_mb" or isinstance(data.get("vram_mb"), str):  # sizes: 4GiB, 512MiB
        try:
            data["vram_mb"] = size_mb(data["vram_mb"])
        except ValueError as e:
            out.add(at, str(e), f"use {SIZE_FORMS}", name, label)
            del data["vram_mb"]
    label, at = origin.get("devices", ("devices", line))
    if label == "resources.gpu":
        if isinstance(data["devices"], bool):
            data["devices"] = ["gpu"] if data["devices"] else ["cpu"]
        else:
            out.add(at, f"must be true or false, got {show_value(data.pop('devices'))}",
                    "gpu: true needs a GPU, gpu: false runs on the CPU", name, label)
    if "image" in data and "runtime" not in data:
        data["runtime"] = Runtime.DOCKER
    if "command" in data and lowercase(data.get("runtime")) in (None, "process"):
        if "argv" in data:  # for a process preset, command *is* its argv
            out.add(origin["command"][1], "gives the program a second time (argv is set)",
                    "keep only one of argv and command", name, "command")
            del data["command"]
        else:
            origin["argv"], data["argv"] = origin["command"], data.pop("command")
    workdir = data.get("workdir")  # relative to the YAML file, so presets travel with it
    if workdir is None or isinstance(workdir, str):
        data["workdir"] = str(path.parent / Path(workdir or ".").expanduser())
    data["name"], data["source"] = name, f"{out.file}:{line}"

    try:
        preset = Preset.model_validate(data)
    except pydantic.ValidationError as e:
        for err in e.errors():
            loc = tuple(err["loc"]) or ("name",)
            if err["type"] == "preset":  # cross-field checks name their field in ctx
                loc = (err["ctx"]["field"], *loc[1:])
            label, at = origin.get(str(loc[0]), (str(loc[0]), line))
            at = _line_of(data.get(str(loc[0])), loc[1:], at)
            sub = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc[1:])
            what, fix = _explain(err)
            if err["type"] == "extra_forbidden":
                what, fix = "is not a known field", _near(loc[-1], [*BatchSettings.model_fields])
            out.add(at, what, fix, name, label + sub)
        return None
    return preset if len(out.found) == before else None


def _parse(path: Path, label: str) -> tuple[list[Preset], list[ContentRoute], list[str]]:
    """(the valid presets, the well-formed routes, every problem) of one file."""
    out = _Problems(label)
    top = "put the presets under a top-level 'models:' or 'presets:' key (routes under 'routes:')"
    try:
        loader = _LineLoader(path.read_text(encoding="utf-8"))
        try:
            doc = loader.get_single_data()
        finally:
            loader.dispose()
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        what = " ".join(str(x) for x in (e.context, e.problem) if x)
        col = f" at column {mark.column + 1}" if mark else ""
        out.add(mark.line + 1 if mark else None, f"YAML syntax error{col}: {what}",
                "correct the YAML here; quote text that holds ': ' or ' #'")
        return [], [], out.items()
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        out.add(None, f"cannot be read: {e}", "make it a readable UTF-8 YAML file")
        return [], [], out.items()

    if not isinstance(doc, _LineDict) or not doc:
        out.add(1, "is empty" if doc is None else "is not a mapping", top)
        return [], [], out.items()
    if not any(k in doc for k in _TOP_KEYS):
        out.add(doc.line, "has none of the keys 'models:', 'presets:', 'routes:'", top)
    named: set[int] = set()  # the mappings whose keys are preset names (or route patterns)
    found: list[tuple[str, int, object]] = []
    routes: list[ContentRoute] = []
    for key, at, value in doc.pairs:
        if key not in _TOP_KEYS:
            out.add(at, f"unknown top-level key {show_value(key)} (only 'models', 'presets' "
                    "and 'routes')", _near(key, _TOP_KEYS))
        elif key == "routes":
            routes += _routes(value, at, out, named)
        elif isinstance(value, _LineDict) and value:
            named.add(id(value))
            found += [(str(n), nat, e) for n, nat, e in value.pairs]
        elif key == "presets" and isinstance(value, list) and value:
            for i, item in enumerate(value):
                n = item.get("name") if isinstance(item, _LineDict) else None
                iat = item.line if isinstance(item, _LineDict) else at
                if isinstance(n, str):
                    found.append((n, iat, item))
                else:
                    out.add(iat, f"entry #{i + 1} of 'presets' " + (
                        "is not a mapping" if not isinstance(item, _LineDict) else
                        "has no name" if n is None else f"has a non-text name {show_value(n)}"),
                        "give each entry fields including `name: my-preset`")
        else:
            kind = "a mapping of name: entry" + (" or a list" if key == "presets" else "")
            out.add(at, f"'{key}' must be {kind} of presets, got {show_value(value)}",
                    "add at least one preset under it")

    presets: list[Preset] = []
    first: dict[str, int] = {}
    for name, line, entry in found:
        if name in first:
            out.add(line, f"preset name {show_value(name)} is used twice in this file (first on "
                    f"line {first[name]})", "rename or remove one of them")
        first.setdefault(name, line)
        if not isinstance(entry, _LineDict):
            out.add(line, f"must be a mapping of fields, got {show_value(entry)}",
                    "write e.g. `command: python worker.py` under it", name)
        elif (p := _entry(entry, name, line, path, out)) and first[name] == line:
            presets.append(p)
    for mapping, key, line, prev in loader.dups:
        if mapping not in named:  # duplicate preset names were reported above
            out.add(line, f"key {show_value(key)} appears twice in one mapping (first on line "
                    f"{prev})", "keep only one of them")
    return presets, routes, out.items()


def _routes(value: object, at: int, out: _Problems, named: set[int]) -> list[ContentRoute]:
    """The well-formed routes of one ``routes:`` section (either shape); what is wrong with
    the others goes to ``out``."""
    written: list[tuple[object, object, int]] = []  # (pattern, preset, line)
    if isinstance(value, _LineDict) and value:
        named.add(id(value))  # a pattern written twice is reported below, once
        written = [(k, v, line) for k, line, v in value.pairs]
    elif isinstance(value, list) and value:
        for i, item in enumerate(value):
            if not isinstance(item, _LineDict):
                out.add(at, f"entry #{i + 1} of 'routes' is not a mapping",
                        "write each entry as {content_type: image/*, preset: faces}")
                continue
            for k, kat, _ in item.pairs:
                if k not in _ROUTE_KEYS:
                    out.add(kat, f"entry #{i + 1} of 'routes': {show_value(k)} is not a known "
                            "field", _near(k, _ROUTE_KEYS))
            lacking = [k for k in _ROUTE_KEYS if k not in item]
            if lacking:
                out.add(item.line, f"entry #{i + 1} of 'routes' has no {lacking[0]}",
                        "give both content_type and preset, e.g. {content_type: image/*, "
                        "preset: faces}")
                continue
            written.append((item["content_type"], item["preset"], item.line))
    else:
        out.add(at, "'routes' must be a mapping of content type: preset, or a list of "
                f"{{content_type, preset}}, got {show_value(value)}",
                "write e.g. routes: {\"image/*\": faces, \"text/plain\": embed}")
    routes: list[ContentRoute] = []
    first: dict[str, int] = {}
    for pattern, preset, line in written:
        ct = normalize(pattern) if isinstance(pattern, str) else ""
        if not is_pattern(ct):
            out.add(line, f"route {show_value(pattern)} is not a content type pattern",
                    f"write {PATTERN_FORMS} (quote */* in YAML)")
        elif not isinstance(preset, str) or not preset.strip():
            out.add(line, f"route '{ct}': the preset must be a preset's name, got "
                    f"{show_value(preset)}", "name a preset, e.g. faces")
        elif ct in first:
            out.add(line, f"route '{ct}' is given twice in this file (first on line "
                    f"{first[ct]})", "keep only one of them")
        else:
            first[ct] = line
            routes.append(ContentRoute(ct, preset.strip(), out.file, line))
    return routes


def _check_routes(routes: list[ContentRoute], registry: PresetRegistry
                  ) -> tuple[list[ContentRoute], list[str]]:
    """The routes in effect (a pattern given again in a later file replaces the earlier route,
    as a later preset of the same name replaces the earlier one: the examples' routes are
    defaults a user's file overrides), and their problems against the presets they name: an
    unknown preset, or one whose accepts does not cover the type."""
    effective: dict[str, ContentRoute] = {}
    for r in routes:
        old = effective.pop(r.content_type, None)
        if old is not None:
            log.info("route %r from %s overrides the one from %s", r.content_type, r.source,
                     old.source)
        effective[r.content_type] = r
    problems: list[str] = []
    for r in effective.values():
        out = _Problems(r.file)
        head = f"route '{r.content_type}'"
        target = registry.get(r.preset)
        if target is None:
            out.add(r.line, f"{head}: preset {show_value(r.preset)} is not known",
                    _near(r.preset, registry.names(), "route it to one of"))
        elif not covers(target.accepts, r.content_type):
            out.add(r.line, f"{head}: preset '{r.preset}' does not accept {r.content_type} "
                    f"(its accepts: [{', '.join(target.accepts)}])",
                    f"add {r.content_type} to the accepts of preset '{r.preset}', or route the "
                    "type to a preset that takes it (a later file's route replaces it)")
        problems += out.items()
    return list(effective.values()), problems


def check_file(path: str | Path) -> list[str]:
    """Every problem in one preset file, each as ``FILE:LINE: ...; fix: ...``; [] if fine."""
    return _parse(Path(path).absolute(), str(path))[2]


def load_file(path: str | Path) -> list[Preset]:
    """The presets of one file; raises PresetError listing every problem."""
    presets, _, problems = _parse(Path(path).absolute(), str(path))
    if problems:
        raise PresetError(problems)
    return presets


def load_presets(paths: Iterable[str | Path]) -> PresetRegistry:
    """Load files and folders (their *.yaml/*.yml, sorted) in order; later files override
    earlier presets of the same name; the routes of every file are checked against the
    presets in the end. One PresetError lists every problem of every file."""
    problems: list[str] = []
    registry = PresetRegistry()
    routes: list[ContentRoute] = []
    for p in map(Path, [paths] if isinstance(paths, str | Path) else paths):  # one path is fine
        if p.is_dir():
            files = sorted(f for f in p.iterdir() if f.suffix in (".yaml", ".yml") and f.is_file())
            if not files:
                log.warning("preset folder %s holds no *.yaml or *.yml files", p)
        elif p.exists():
            files = [p]
        else:
            problems.append(f"{p}: no such file or folder; fix: correct the path, or create it "
                            "(see examples/presets for the format)")
            continue
        for f in files:
            presets, written, found = _parse(f.absolute(), str(f))
            problems += found
            routes += written
            for preset in presets:
                registry.add(preset)
    effective, found_in_routes = _check_routes(routes, registry)
    problems += found_in_routes
    if problems:
        raise PresetError(problems)
    registry.routes = RouteTable(effective)
    return registry


def check_routes(paths: Iterable[str | Path], *, examples: bool = True) -> list[str]:
    """The problems of the routes of these files (each well-formed on its own) against their
    presets and, with ``examples``, the examples', which ``serve`` loads first unless told
    not to (--no-examples); [] if fine."""
    files = [Path(p) for p in paths]
    given = {f.resolve() for f in files}
    folder = example_presets_dir()
    found = sorted([*folder.glob("*.yaml"), *folder.glob("*.yml")]) if examples else []
    registry = PresetRegistry()
    routes: list[ContentRoute] = []
    for f in [*(e for e in found if e.resolve() not in given), *files]:
        presets, written, _ = _parse(f.absolute(), str(f))
        routes += written
        for preset in presets:
            registry.add(preset)
    return _check_routes(routes, registry)[1]


def example_presets_dir() -> Path:
    """The repo's examples/presets folder, or $GPULANE_EXAMPLES_DIR when set."""
    env = os.environ.get("GPULANE_EXAMPLES_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[3] / "examples" / "presets"
