"""Settings: defaults, and the layers YAML file < GPULANE_* environment < flags."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from gpulane.client._core import DEFAULT_URL
from gpulane.config import Settings
from gpulane.errors import ConfigError
from gpulane.store import open_store
from gpulane.store.sqlite import SqliteStore


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No GPULANE_* variables from the caller, and a working directory without gpulane.yaml."""
    for name in list(os.environ):
        if name.upper().startswith("GPULANE_"):
            monkeypatch.delenv(name)
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    return work


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# -- defaults ---------------------------------------------------------------------------------


def test_defaults(clean_env: Path) -> None:
    s = Settings.load()
    assert (s.host, s.port) == ("127.0.0.1", 8765)
    assert DEFAULT_URL == "http://127.0.0.1:8765"
    assert s.data_dir == Path(".gpulane")
    assert s.store is None
    assert s.store_url == f"sqlite:///{(clean_env / '.gpulane' / 'gpulane.db').resolve()}"
    assert s.presets == [] and s.examples is True
    assert s.durability == "normal" and s.sqlite_synchronous == "NORMAL"
    assert s.token is None and s.cpu_concurrency is None


def test_default_store_url_opens_a_sqlite_file_under_the_data_dir(clean_env: Path) -> None:
    s = Settings.load(data_dir="somewhere")
    store = open_store(s.store_url)
    assert isinstance(store, SqliteStore)
    assert Path(store.path) == (clean_env / "somewhere" / "gpulane.db").resolve()
    assert Path(store.path).is_absolute()


def test_open_store_urls() -> None:
    rel = open_store("sqlite:///rel/x.db", synchronous="FULL")
    assert isinstance(rel, SqliteStore) and rel.path == "rel/x.db" and rel.synchronous == "FULL"
    mem = open_store("sqlite://")
    assert isinstance(mem, SqliteStore) and mem.path == ":memory:"
    with pytest.raises(ConfigError, match="store="):
        open_store("postgres://localhost/db")


def test_explicit_store_wins(clean_env: Path) -> None:
    assert Settings.load(store="sqlite:////tmp/x.db").store_url == "sqlite:////tmp/x.db"


def test_node_name_defaults_to_the_hostname() -> None:
    import socket

    assert Settings.load().node == socket.gethostname()
    assert Settings.load(node_name="n7").node == "n7"


# -- layers -----------------------------------------------------------------------------------


def test_file_then_env_then_flags(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    cfg = write(tmp_path / "gl.yaml", "port: 1111\nhost: 0.0.0.0\nlog-level: debug\n")
    s = Settings.load(cfg)
    assert (s.port, s.host, s.log_level) == (1111, "0.0.0.0", "debug")

    monkeypatch.setenv("GPULANE_PORT", "2222")
    s = Settings.load(cfg)
    assert (s.port, s.host, s.log_level) == (2222, "0.0.0.0", "debug")  # env beats the file

    s = Settings.load(cfg, port=3333, host=None, presets=())  # None / () mean "not given"
    assert (s.port, s.host, s.log_level) == (3333, "0.0.0.0", "debug")  # flags beat both


def test_env_alone_and_flags_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPULANE_HOST", "0.0.0.0")
    monkeypatch.setenv("GPULANE_EXAMPLES", "false")
    monkeypatch.setenv("GPULANE_DATA_DIR", "/var/lib/gpulane")
    s = Settings.load()
    assert (s.host, s.examples, s.data_dir) == ("0.0.0.0", False, Path("/var/lib/gpulane"))
    s = Settings.load(port=9000)
    assert (s.host, s.port, s.examples) == ("0.0.0.0", 9000, False)


def test_default_config_file_is_read_from_the_working_directory(clean_env: Path) -> None:
    write(clean_env / "gpulane.yaml", "port: 4444\nsimulate_gpus: 1x80GB\n")
    s = Settings.load()
    assert s.port == 4444 and s.simulate_gpus == "1x80GB"


def test_an_empty_config_file_means_defaults(tmp_path: Path) -> None:
    assert Settings.load(write(tmp_path / "empty.yaml", "")).port == 8765
    assert Settings.load(write(tmp_path / "comment.yaml", "# nothing\n")).port == 8765


def test_client_variables_are_not_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPULANE_URL", "http://elsewhere:1")
    monkeypatch.setenv("GPULANE_EXAMPLES_DIR", "/x")
    assert Settings.load().port == 8765


def test_token_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPULANE_TOKEN", "s3cret")
    assert Settings.load().token == "s3cret"


def test_worker_settings_reach_the_supervisor(monkeypatch: pytest.MonkeyPatch,
                                              tmp_path: Path) -> None:
    """The worker knobs are settings like any other (file < env < flags), and the node hands
    them to the runtime instead of a constant of its own."""
    from gpulane.node import Node

    assert (Settings().worker_stderr_lines, Settings().worker_stop_grace_s) == (20, 5.0)
    monkeypatch.setenv("GPULANE_WORKER_STOP_GRACE_S", "1.5")
    s = Settings.load(worker_stderr_lines=50, data_dir=tmp_path, simulate_gpus="1x8GiB")
    assert (s.worker_stderr_lines, s.worker_stop_grace_s) == (50, 1.5)
    supervisor = Node(s).supervisor
    assert (supervisor.stderr_tail_lines, supervisor.shutdown_grace_s) == (50, 1.5)


# -- presets paths ----------------------------------------------------------------------------


def test_presets_env_is_split_on_pathsep(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPULANE_PRESETS", os.pathsep.join(["a.yaml", "dir/", "", "b.yml"]))
    assert Settings.load().presets == ["a.yaml", "dir/", "b.yml"]
    monkeypatch.setenv("GPULANE_PRESETS", "only.yaml")
    assert Settings.load().presets == ["only.yaml"]
    monkeypatch.setenv("GPULANE_PRESETS", '["x.yaml", "y/"]')  # a JSON list is read as one
    assert Settings.load().presets == ["x.yaml", "y/"]


def test_presets_from_file_and_flags(tmp_path: Path) -> None:
    cfg = write(tmp_path / "gl.yaml", "presets: [a.yaml, b/]\n")
    assert Settings.load(cfg).presets == ["a.yaml", "b/"]
    assert Settings.load(cfg, presets=["c.yaml"]).presets == ["c.yaml"]
    text = write(tmp_path / "gl2.yaml", f"presets: a.yaml{os.pathsep}b/\n")
    assert Settings.load(text).presets == ["a.yaml", "b/"]


# -- errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("flags", "field"), [
    ({"port": 70000}, "port"),
    ({"port": -1}, "port"),
    ({"durability": "sometimes"}, "durability"),
    ({"retain": "forever"}, "retain"),
    ({"retain": "-3d"}, "retain"),
    ({"cpu_concurrency": 0}, "cpu_concurrency"),
    ({"max_input_bytes": 10}, "max_input_bytes"),
    ({"worker_stderr_lines": 0}, "worker_stderr_lines"),
    ({"worker_stop_grace_s": -1}, "worker_stop_grace_s"),
])
def test_invalid_flags_name_the_field(flags: dict[str, object], field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        Settings.load(**flags)


def test_durability_picks_sqlite_synchronous() -> None:
    assert Settings.load().sqlite_synchronous == "NORMAL"
    assert Settings.load(durability="FULL").sqlite_synchronous == "FULL"


@pytest.mark.parametrize(("text", "seconds"), [
    ("7d", 604800.0), ("12h", 43200.0), ("30m", 1800.0), ("45s", 45.0), ("1w", 604800.0),
    ("90", 90.0), (" 2D ", 172800.0)])
def test_retain_reads_durations(text: str, seconds: float) -> None:
    assert Settings.load(retain=text).retain == seconds


def test_cors_origins_split_on_commas(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPULANE_CORS_ORIGINS", "https://a.example, https://b.example")
    assert Settings.load().cors_origins == ["https://a.example", "https://b.example"]


def test_cors_origins_are_kept_as_browsers_send_them() -> None:
    # A browser sends "https://app.example" whatever case the operator wrote.
    assert Settings.load(cors_origins=["https://App.Example:8443"]).cors_origins == [
        "https://app.example:8443"]


@pytest.mark.parametrize(("name", "value", "field"), [
    ("GPULANE_PORT", "eighty", "port"),
    ("GPULANE_PORT", "99999", "port"),
    ("GPULANE_DURABILITY", "nope", "durability"),
    ("GPULANE_CPU_CONCURRENCY", "0", "cpu_concurrency"),
])
def test_invalid_env_names_the_field(monkeypatch: pytest.MonkeyPatch, name: str, value: str,
                                     field: str) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=field):
        Settings.load()


def test_invalid_file_value_names_the_field(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="port"):
        Settings.load(write(tmp_path / "gl.yaml", "port: many\n"))


def test_unknown_file_key_names_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="prot"):
        Settings.load(write(tmp_path / "gl.yaml", "prot: 80\n"))


def test_bad_yaml_and_non_mapping_files(tmp_path: Path) -> None:
    bad = write(tmp_path / "bad.yaml", "port: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        Settings.load(bad)
    listed = write(tmp_path / "list.yaml", "- port\n- 1\n")
    with pytest.raises(ConfigError, match="mapping"):
        Settings.load(listed)


def test_missing_config_file_is_an_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="no such file") as info:
        Settings.load(missing)
    assert str(missing) in str(info.value)
    with pytest.raises(ConfigError):
        Settings.load(str(missing))


def test_missing_default_config_file_is_fine(clean_env: Path) -> None:
    assert not (clean_env / "gpulane.yaml").exists()
    assert Settings.load().port == 8765
