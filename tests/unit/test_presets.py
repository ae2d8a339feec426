"""Preset schema, YAML loading (both shapes), size parsing and the error messages' file:line."""

from __future__ import annotations

import json
import logging
import re
import textwrap
from pathlib import Path

import pydantic
import pytest

from gpulane.errors import PresetError
from gpulane.presets import (
    BatchSettings,
    DeviceKind,
    Mode,
    Preset,
    PresetRegistry,
    Runtime,
    check_file,
    example_presets_dir,
    load_file,
    load_presets,
    parse_size_mb,
)

PROBLEM = re.compile(r"^(?P<file>.+?):(?P<line>\d+): (?P<body>.+); fix: (?P<fix>.+)$")


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
    return path


def parts(problem: str) -> tuple[str, int, str, str]:
    m = PROBLEM.match(problem)
    assert m, f"not in FILE:LINE: ...; fix: ... form: {problem!r}"
    return m["file"], int(m["line"]), m["body"], m["fix"]


def one_problem(path: Path) -> tuple[int, str, str]:
    problems = check_file(path)
    assert len(problems) == 1, problems
    file, line, body, fix = parts(problems[0])
    assert file == str(path)
    return line, body, fix


MODELS_YAML = """
models:
  whisper-small:
    command: python serve_whisper.py --model small
    env: {HF_HOME: /cache, THREADS: 4, DEBUG: true, RATIO: 0.5}
    model_path: /models/whisper-small
    resources: {vram: 2GiB, gpu: true}
    mode: session
  llm:
    docker_image: ghcr.io/acme/llm:1.2
    command: [serve, --port, 8000]
    resources: {vram_mb: 16000, devices: [gpu, cpu]}
  tiny:
    image: busybox
    resources: {gpu: false}
    mode: oneoff
    batch: {max_size: 16, max_wait_ms: 4, target_latency_ms: 50}
    timeout_s: 12.5
    accepts: [application/json, image/png]
"""


# --- the models: shape -------------------------------------------------------------------------

def test_models_shape_maps_every_alias(tmp_path: Path) -> None:
    path = write(tmp_path, "model_presets.yaml", MODELS_YAML)
    assert check_file(path) == []
    whisper, llm, tiny = load_file(path)

    assert whisper.name == "whisper-small"
    assert whisper.runtime is Runtime.PROCESS
    assert whisper.argv == ("python", "serve_whisper.py", "--model", "small")
    assert whisper.env == {"HF_HOME": "/cache", "THREADS": "4", "DEBUG": "true", "RATIO": "0.5"}
    assert whisper.model_path == "/models/whisper-small"
    assert whisper.vram_mb == 2048
    assert whisper.devices == (DeviceKind.GPU,)
    assert whisper.mode is Mode.SESSION
    assert whisper.source == f"{path}:2"
    assert whisper.workdir == str(tmp_path.absolute())

    assert llm.runtime is Runtime.DOCKER
    assert llm.image == "ghcr.io/acme/llm:1.2"
    assert llm.command == ("serve", "--port", "8000")
    assert llm.argv == ()
    assert llm.vram_mb == 16000
    assert llm.devices == (DeviceKind.GPU, DeviceKind.CPU)
    assert llm.source == f"{path}:8"

    assert tiny.runtime is Runtime.DOCKER and tiny.image == "busybox" and tiny.command == ()
    assert tiny.devices == (DeviceKind.CPU,)
    assert tiny.mode is Mode.ONEOFF
    assert tiny.batch == BatchSettings(max_size=16, max_wait_ms=4, target_latency_ms=50)
    assert tiny.timeout_s == 12.5
    assert tiny.accepts == ("application/json", "image/png")


def test_fields_may_appear_directly_and_defaults_apply(tmp_path: Path) -> None:
    path = write(tmp_path, "p.yaml", """
        models:
          embed:
            argv: [python, embed.py, --dim, 768]
            devices: cpu
            vram: 512MiB
            max_attempts: 5
            replicas: 2
            preemptible: false
            description: sentence embeddings
            idle_unload_s: 0
            start_timeout_s: 5
            batch: 8
        """)
    (p,) = load_file(path)
    assert p.argv == ("python", "embed.py", "--dim", "768")
    assert p.devices == (DeviceKind.CPU,)
    assert (p.vram_mb, p.max_attempts, p.replicas, p.preemptible) == (512, 5, 2, False)
    assert p.description == "sentence embeddings"
    assert (p.idle_unload_s, p.start_timeout_s, p.timeout_s) == (0, 5, 300.0)
    assert p.batch.max_size == 8 and p.batch.adaptive is True
    assert p.accepts == ("application/json",)


def test_vram_mb_accepts_a_size_string_too(tmp_path: Path) -> None:
    path = write(tmp_path, "p.yaml", "models:\n  a: {command: x, vram_mb: 1GiB}\n")
    assert load_file(path)[0].vram_mb == 1024


def test_workdir_is_relative_to_the_yaml_file(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    path = write(tmp_path / "sub", "p.yaml", """
        models:
          a: {command: x, workdir: ../workers}
          b: {command: x, workdir: /srv/b}
          c: {command: x}
        """)
    a, b, c = load_file(path)
    assert Path(a.workdir or "") == tmp_path.absolute() / "sub" / ".." / "workers"
    assert b.workdir == "/srv/b"
    assert c.workdir == str((tmp_path / "sub").absolute())


def test_yaml_merge_keys_share_defaults(tmp_path: Path) -> None:
    path = write(tmp_path, "p.yaml", """
        models:
          base: &base {command: python w.py, vram: 1GiB, mode: oneoff}
          big:
            <<: *base
            vram: 8GiB
        """)
    base, big = load_file(path)
    assert big.argv == ("python", "w.py") and big.mode is Mode.ONEOFF
    assert big.vram_mb == 8192 and base.vram_mb == 1024


# --- the presets: shape ------------------------------------------------------------------------

def test_presets_list_and_mapping_and_both_keys_in_one_file(tmp_path: Path) -> None:
    listed = write(tmp_path, "list.yaml", """
        presets:
          - name: embed
            argv: [python, embed.py]
          - name: ocr
            runtime: docker
            image: ocr:latest
            command: "--lang 'en us'"
        """)
    embed, ocr = load_file(listed)
    assert embed.argv == ("python", "embed.py") and embed.source == f"{listed}:2"
    assert ocr.command == ("--lang", "en us") and ocr.source == f"{listed}:4"

    mapped = write(tmp_path, "map.yaml", """
        presets:
          embed: {argv: [python, embed.py], name: embed}
        models:
          whisper: {command: python w.py}
        """)
    assert [p.name for p in load_file(mapped)] == ["embed", "whisper"]


# --- sizes -------------------------------------------------------------------------------------

@pytest.mark.parametrize(("value", "mb"), [
    (0, 0), (512, 512), (1.0, 1), ("512", 512), ("24GiB", 24576), ("512MiB", 512),
    ("1.5GB", 1430), ("2TiB", 2 * 1024 * 1024), ("4gib", 4096), (" 4 GiB ", 4096),
    ("8Gi", 8192), ("1GB", 953), ("1048576B", 1), ("1KB", 1), ("0GiB", 0), ("1.5GiB", 1536),
    ("1TB", 953674), ("100MB", 95), ("2048KiB", 2),
])
def test_parse_size_mb(value: object, mb: int) -> None:
    assert parse_size_mb(value, "vram") == mb


@pytest.mark.parametrize("value", ["lots", "4 GiBs", "-1GiB", -5, "GiB", "", None, True,
                                   [4], "1e3MB", "4XB"])
def test_parse_size_mb_rejects_and_names_field_and_forms(value: object) -> None:
    with pytest.raises(ValueError, match=r"field 'vram'.*'4GiB'"):
        parse_size_mb(value, "vram")


# --- errors: each cites FILE:LINE and a fix ----------------------------------------------------

def test_pydantic_errors_are_translated(tmp_path: Path) -> None:
    path = write(tmp_path, "p.yaml", """
        models:
          embed:
            command: python e.py
            vram_mb: -5
        """)
    line, body, fix = one_problem(path)
    assert line == 4
    assert body == "field 'vram_mb' of preset 'embed': must be >= 0, got -5"
    assert ">= 0" in fix


def test_unknown_key_suggests_the_close_one(tmp_path: Path) -> None:
    path = write(tmp_path, "p.yaml", "models:\n  a:\n    command: x\n    vrma: 2GiB\n")
    line, body, fix = one_problem(path)
    assert line == 4 and "field 'vrma' of preset 'a'" in body
    assert "did you mean 'vram'" in fix


def test_unknown_key_far_from_all_lists_the_known_ones(tmp_path: Path) -> None:
    path = write(tmp_path, "p.yaml", "models:\n  a:\n    command: x\n    zzzzzz: 1\n")
    _, _, fix = one_problem(path)
    assert "known:" in fix and "model_path" in fix


def test_unknown_resource_and_batch_keys(tmp_path: Path) -> None:
    path = write(tmp_path, "p.yaml", """
        models:
          a:
            command: x
            resources:
              vram: 1GiB
              gpus: true
            batch:
              max_size: 4
              max_wait: 3
        """)
    problems = [parts(p) for p in check_file(path)]
    assert [(line, fix) for _, line, _, fix in problems] == [
        (6, "did you mean 'gpu'?"), (9, "did you mean 'max_wait_ms'?")]
    assert "field 'resources.gpus' of preset 'a'" in problems[0][2]
    assert "field 'batch.max_wait' of preset 'a'" in problems[1][2]


def test_nested_and_list_errors_cite_the_inner_line(tmp_path: Path) -> None:
    path = write(tmp_path, "p.yaml", """
        models:
          a:
            command: x
            devices: [gpu, gpux]
            batch:
              adaptive: true
              max_size: 5000
            mode: sesion
        """)
    problems = [parts(p) for p in check_file(path)]
    lines = {body.split(":")[0]: (line, fix) for _, line, body, fix in problems}
    assert lines["field 'devices[1]' of preset 'a'"] == (4, "did you mean 'gpu'?")
    assert lines["field 'batch.max_size' of preset 'a'"][0] == 7
    assert lines["field 'mode' of preset 'a'"] == (8, "did you mean 'session'?")


def test_missing_program_cites_the_entry(tmp_path: Path) -> None:
    path = write(tmp_path, "p.yaml", "models:\n  ok: {command: x}\n  a:\n    mode: oneoff\n")
    line, body, fix = one_problem(path)
    assert line == 3 and "field 'argv' of preset 'a'" in body and "required" in body
    assert "command:" in fix


def test_docker_rules(tmp_path: Path) -> None:
    path = write(tmp_path, "p.yaml", """
        models:
          a: {runtime: docker, command: serve}
          b: {image: x, argv: [serve]}
          c: {runtime: process, image: x, command: run}
        """)
    problems = [parts(p) for p in check_file(path)]
    assert [(line, body.split(":")[0]) for _, line, body, _ in problems] == [
        (2, "field 'image' of preset 'a'"), (3, "field 'argv' of preset 'b'"),
        (4, "field 'image' of preset 'c'")]


def test_conflicting_spellings_of_one_field(tmp_path: Path) -> None:
    path = write(tmp_path, "p.yaml", """
        models:
          a:
            command: x
            argv: [y]
            vram: 1GiB
            resources: {vram_mb: 5, gpu: true}
            devices: [cpu]
            image: i
            docker_image: j
        """)
    problems = [parts(p) for p in check_file(path)]
    assert [line for _, line, _, _ in problems] == [4, 6, 7, 9]  # 4: argv of a docker preset
    assert all("keep only one" in fix for _, _, _, fix in problems[1:])
    assert "sets vram_mb again (already set by 'vram' on line 5)" in problems[1][2]

    process = write(tmp_path, "q.yaml", "models:\n  a:\n    command: x\n    argv: [y]\n")
    line, body, fix = one_problem(process)
    assert line == 3 and "field 'command' of preset 'a'" in body and "keep only one" in fix


def test_bad_gpu_flag_and_bad_size(tmp_path: Path) -> None:
    path = write(tmp_path, "p.yaml", """
        models:
          a:
            command: x
            resources: {gpu: maybe, vram: lots}
        """)
    problems = [parts(p) for p in check_file(path)]
    assert len(problems) == 2 and all(line == 4 for _, line, _, _ in problems)
    bodies = " | ".join(body for _, _, body, _ in problems)
    assert "resources.gpu" in bodies and "'lots' is not a memory size" in bodies


def test_yaml_syntax_error_is_one_problem_with_its_line(tmp_path: Path) -> None:
    path = write(tmp_path, "p.yaml", "models:\n  a:\n    command: [x\n    mode: b: c\n")
    line, body, _ = one_problem(path)
    assert "YAML syntax error" in body and 3 <= line <= 5


def test_empty_file_and_file_without_the_keys(tmp_path: Path) -> None:
    empty = write(tmp_path, "empty.yaml", "")
    line, body, fix = one_problem(empty)
    assert line == 1 and "empty" in body and "'models:'" in fix and "'presets:'" in fix

    neither = write(tmp_path, "other.yaml", "model:\n  a: {command: x}\n")
    problems = [parts(p) for p in check_file(neither)]
    assert any("'models:'" in b and "'presets:'" in b for _, _, b, _ in problems)
    assert any(fix == "did you mean 'models'?" for _, _, _, fix in problems)

    listed = write(tmp_path, "list.yaml", "- a\n- b\n")
    assert "models" in one_problem(listed)[2]


def test_wrong_container_shapes(tmp_path: Path) -> None:
    path = write(tmp_path, "p.yaml", """
        models: just text
        presets:
          - {argv: [x]}
          - 5
          - {name: 7, argv: [x]}
          - {name: ok, argv: [x]}
        """)
    problems = check_file(path)
    assert len(problems) == 4
    assert all(parts(p)[3] for p in problems)


def test_duplicate_names_within_a_file(tmp_path: Path) -> None:
    path = write(tmp_path, "p.yaml", """
        models:
          a: {command: x}
          a: {command: y}
        presets:
          - {name: b, argv: [x]}
          - {name: b, argv: [x]}
          - {name: a, argv: [x]}
        """)
    problems = [parts(p) for p in check_file(path)]
    assert [line for _, line, _, _ in problems] == [3, 6, 7]
    assert all("used twice" in body for _, _, body, _ in problems)


def test_duplicate_key_in_an_entry(tmp_path: Path) -> None:
    path = write(tmp_path, "p.yaml", "models:\n  a:\n    command: x\n    command: y\n")
    line, body, fix = one_problem(path)
    assert "keep only one" in fix
    assert line == 4 and "'command' appears twice" in body and "first on line 3" in body


def test_all_problems_are_reported_at_once(tmp_path: Path) -> None:
    path = write(tmp_path, "p.yaml", """
        models:
          a:
            command: python a.py
            timeout_s: 0
            max_attempts: 0
            replicas: two
            env: {X: [1]}
            accepts: json
            source: here
          "bad name":
            command: x
          b:
            mode: nope
        """)
    problems = check_file(path)
    assert len(problems) == 9, problems
    lines = [parts(p)[1] for p in problems]
    assert lines == sorted(lines)
    with pytest.raises(PresetError) as info:
        load_file(path)
    assert info.value.problems == problems


# --- folders, several files, overrides ---------------------------------------------------------

def test_load_presets_from_a_folder_sorted_not_recursive(tmp_path: Path) -> None:
    write(tmp_path, "b.yml", "models:\n  two: {command: x}\n")
    write(tmp_path, "a.yaml", "models:\n  one: {command: x}\n")
    write(tmp_path, "notes.txt", "not yaml: [")
    (tmp_path / "deeper").mkdir()
    write(tmp_path / "deeper", "c.yaml", "models:\n  three: {command: x}\n")
    registry = load_presets([tmp_path])
    assert registry.names() == ["one", "two"]


def test_a_later_file_overrides(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    first = write(tmp_path, "first.yaml", "models:\n  a: {command: one}\n  b: {command: x}\n")
    second = write(tmp_path, "second.yaml", "models:\n  a: {command: two}\n")
    with caplog.at_level(logging.INFO, logger="gpulane.presets"):
        registry = load_presets([first, second])
    assert registry["a"].argv == ("two",) and registry["a"].source == f"{second}:2"
    assert registry.names() == ["a", "b"]
    assert any("overrides" in r.getMessage() for r in caplog.records)


def test_problems_from_every_file_and_missing_paths(tmp_path: Path) -> None:
    bad1 = write(tmp_path, "bad1.yaml", "models:\n  a: {command: x, vram_mb: -1}\n")
    bad2 = write(tmp_path, "bad2.yaml", "models:\n  b: {}\n")
    good = write(tmp_path, "good.yaml", "models:\n  c: {command: x}\n")
    missing = tmp_path / "nope.yaml"
    with pytest.raises(PresetError) as info:
        load_presets([bad1, good, bad2, missing])
    problems = info.value.problems
    assert len(problems) == 3
    assert problems[0].startswith(f"{bad1}:2: ") and problems[1].startswith(f"{bad2}:2: ")
    assert problems[2].startswith(str(missing)) and "fix:" in problems[2]
    assert str(info.value) == "\n".join(problems)


def test_load_presets_of_nothing_is_empty(tmp_path: Path) -> None:
    assert len(load_presets([])) == 0
    assert len(load_presets([tmp_path])) == 0


def test_load_presets_takes_a_single_path_too(tmp_path: Path) -> None:
    path = write(tmp_path, "p.yaml", "models:\n  a: {command: x}\n")
    assert load_presets(str(path)).names() == ["a"]
    assert load_presets(tmp_path).names() == ["a"]  # type: ignore[arg-type]


def test_example_presets_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("GPULANE_EXAMPLES_DIR", raising=False)
    default = example_presets_dir()
    assert default.parts[-2:] == ("examples", "presets")
    assert (default.parent.parent / "pyproject.toml").exists()
    monkeypatch.setenv("GPULANE_EXAMPLES_DIR", str(tmp_path))
    assert example_presets_dir() == tmp_path


def test_shipped_examples_load_if_present() -> None:
    folder = example_presets_dir()
    if not any(folder.glob("*.y*ml")):
        pytest.skip("no example presets yet")
    assert len(load_presets([folder])) > 0


# --- the model and the registry ----------------------------------------------------------------

def preset(name: str = "p", **kw: object) -> Preset:
    kw.setdefault("argv", ["python", "w.py"])
    return Preset.model_validate({"name": name, **kw})


def test_registry_is_an_ordered_mapping() -> None:
    a, b, c = preset("a"), preset("b"), preset("c")
    registry = PresetRegistry([b, a])
    registry.add(c)
    assert list(registry) == ["b", "a", "c"] == registry.names()
    assert len(registry) == 3 and "a" in registry and "z" not in registry
    assert registry["a"] is a and registry.get("z") is None
    assert dict(registry.items()) == {"b": b, "a": a, "c": c}
    with pytest.raises(KeyError):
        registry["z"]
    newer = preset("a", vram_mb=5)
    registry.add(newer)
    assert registry["a"] is newer and registry.names() == ["b", "a", "c"]
    assert "PresetRegistry" in repr(registry)


@pytest.mark.parametrize(("devices", "needs", "gpu", "cpu"), [
    (["gpu"], True, True, False), (["cpu"], False, False, True),
    (["gpu", "cpu"], False, True, True), (["cpu", "gpu"], False, True, True),
])
def test_device_properties(devices: list[str], needs: bool, gpu: bool, cpu: bool) -> None:
    p = preset(devices=devices)
    assert (p.needs_gpu, p.allows_gpu, p.allows_cpu) == (needs, gpu, cpu)


def test_to_json_round_trip() -> None:
    p = preset("x", env={"A": "1"}, devices=["cpu"], vram_mb=10, mode="oneoff",
               batch={"max_size": 4, "target_latency_ms": 20}, source="f.yaml:3")
    data = p.to_json()
    assert json.loads(json.dumps(data)) == data
    assert data["mode"] == "oneoff" and data["devices"] == ["cpu"] and data["runtime"] == "process"
    assert data["batch"]["max_size"] == 4 and data["argv"] == ["python", "w.py"]
    assert set(data) == set(Preset.model_fields)
    assert Preset.model_validate(data) == p
    docker = Preset(name="d", runtime=Runtime.DOCKER, image="img", command=("a",))
    assert Preset.model_validate(docker.to_json()) == docker


def test_model_defaults_and_immutability() -> None:
    p = preset()
    assert p.runtime is Runtime.PROCESS and p.mode is Mode.SESSION
    assert p.devices == (DeviceKind.GPU, DeviceKind.CPU) and p.batch == BatchSettings()
    assert (p.vram_mb, p.idle_unload_s, p.start_timeout_s, p.timeout_s) == (0, 300, 60, 300)
    assert (p.max_attempts, p.replicas, p.preemptible) == (3, 1, True)
    assert p.workdir is None and p.source is None
    with pytest.raises(pydantic.ValidationError):
        p.vram_mb = 3
    assert len({p, preset()}) == 1


@pytest.mark.parametrize("kw", [
    {"name": "bad name"}, {"name": ""}, {"name": "x" * 65}, {"name": "-x"},
    {"argv": []}, {"argv": "a 'b"}, {"image": "x"}, {"command": ["c"]},
    {"runtime": "docker"}, {"runtime": "docker", "image": "i", "argv": ["a"]},
    {"runtime": "docker", "image": " "},
    {"devices": []}, {"devices": ["gpu", "gpu"]}, {"devices": ["tpu"]},
    {"vram_mb": -1}, {"timeout_s": 0}, {"start_timeout_s": -1}, {"idle_unload_s": -1},
    {"max_attempts": 0}, {"replicas": 0}, {"accepts": ["json"]}, {"env": {"A=B": "x"}},
    {"batch": {"max_size": 0}}, {"batch": {"max_size": 4097}}, {"batch": {"max_wait_ms": -1}},
    {"batch": {"target_latency_ms": 0}}, {"batch": {"nope": 1}}, {"timeout_s": float("inf")},
    {"extra": 1},
])
def test_model_rejects(kw: dict[str, object]) -> None:
    with pytest.raises(pydantic.ValidationError):
        Preset.model_validate({"name": "p", "argv": ["python", "w.py"], **kw})


def test_model_accepts_friendly_spellings() -> None:
    p = preset(argv="python 'my worker.py' 3", devices="CPU, gpu", accepts="text/plain",
               env={"N": 3, "B": False, "E": None}, runtime="PROCESS", batch=16)
    assert p.argv == ("python", "my worker.py", "3")
    assert p.devices == (DeviceKind.CPU, DeviceKind.GPU)
    assert p.accepts == ("text/plain",)
    assert p.env == {"N": "3", "B": "false", "E": ""}
    assert p.batch.max_size == 16
    assert preset(name="a" * 64).name == "a" * 64
