"""API keys: the keys file, GPULANE_KEYS and the old token add up, held as digests only; every
mistake is one ConfigError naming the source, the entry, the field and the fix."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

import pytest
import yaml

from gpulane.api.keys import (
    KEY_PREFIX,
    Caller,
    file_entry,
    load_keys,
    new_key,
    parse_keys_env,
    parse_keys_file,
)
from gpulane.config import Settings
from gpulane.errors import ConfigError


def sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def write(tmp_path: Path, entries: Any) -> Path:
    path = tmp_path / "keys.yaml"
    path.write_text(yaml.safe_dump({"keys": entries}))
    return path


def settings(**values: Any) -> Settings:
    return Settings.model_validate(values)


def test_the_three_sources_add_up_and_only_digests_are_kept(tmp_path: Path) -> None:
    path = write(tmp_path, [{"name": "ci", "sha256": sha("k-ci"), "scopes": ["tasks"],
                             "rate_per_s": 5, "burst": 10}])
    ring = load_keys(settings(keys_file=path, keys="ops:k-ops:leases+admin", token="k-tok"))
    assert len(ring) == 3
    assert ring.find(b"k-ci") == Caller("ci", frozenset({"tasks"}), 5.0, 10)
    ops = ring.find(b"k-ops")
    assert ops is not None and ops.is_admin and ops.allows("tasks")
    tok = ring.find(b"k-tok")
    assert tok is not None and tok.name == "token" and tok.is_admin
    assert ring.find(b"k-ci ") is None and ring.find(b"") is None
    # No secret is held anywhere in the ring, only its SHA-256.
    held = repr(ring._by_digest)
    assert "k-ci" not in held and "k-ops" not in held and "k-tok" not in held


def test_no_source_is_no_key() -> None:
    ring = load_keys(settings())
    assert not ring and ring.find(b"anything") is None


def test_a_caller_may_use_its_scopes_and_admin_may_use_all() -> None:
    tasks = Caller("t", frozenset({"tasks"}))
    assert tasks.allows("tasks") and not tasks.allows("leases") and not tasks.is_admin
    admin = Caller("a", frozenset({"admin"}))
    assert all(admin.allows(s) for s in ("tasks", "leases", "admin"))


def test_a_plain_key_in_the_file_works_but_is_warned_about(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = write(tmp_path, [{"name": "dev", "key": "s3cr3t-v4lue", "scopes": ["tasks"]}])
    with caplog.at_level(logging.WARNING):
        [(digest, caller, _)] = parse_keys_file(path)
    assert digest == hashlib.sha256(b"s3cr3t-v4lue").digest() and caller.name == "dev"
    assert "sha256" in caplog.text and "s3cr3t-v4lue" not in caplog.text


@pytest.mark.parametrize(("entry", "field", "fix"), [
    ({"sha256": sha("x"), "scopes": ["tasks"]}, "'name'", "letters, digits"),
    ({"name": "has space", "sha256": sha("x"), "scopes": ["tasks"]}, "'name'", "letters"),
    ({"name": "a", "scopes": ["tasks"]}, "'sha256'", "exactly one"),
    ({"name": "a", "sha256": sha("x"), "key": "x", "scopes": ["tasks"]}, "'sha256'",
     "exactly one"),
    ({"name": "a", "sha256": "abc", "scopes": ["tasks"]}, "'sha256'", "sha256sum"),
    ({"name": "a", "sha256": sha("x")}, "'scopes'", "[tasks, leases]"),
    ({"name": "a", "sha256": sha("x"), "scopes": ["gpus"]}, "'scopes'", "tasks, leases"),
    ({"name": "a", "sha256": sha("x"), "scopes": []}, "'scopes'", "at least one"),
    ({"name": "a", "sha256": sha("x"), "scopes": ["tasks"], "rate_per_s": -1},
     "'rate_per_s'", ">= 0"),
    ({"name": "a", "sha256": sha("x"), "scopes": ["tasks"], "burst": 1.5}, "'burst'",
     "whole number"),
    ({"name": "a", "sha256": sha("x"), "scopes": ["tasks"], "scope": ["x"]}, "'scope'",
     "use burst, key, name"),
])
def test_a_bad_file_entry_names_file_entry_field_and_fix(
        tmp_path: Path, entry: dict[str, Any], field: str, fix: str) -> None:
    path = write(tmp_path, [{"name": "ok", "sha256": sha("ok"), "scopes": ["tasks"]}, entry])
    with pytest.raises(ConfigError) as err:
        parse_keys_file(path)
    message = str(err.value)
    assert str(path) in message and "entry 2" in message, message
    assert field in message and fix in message, message


@pytest.mark.parametrize(("text", "fix"), [
    ("", "'keys:' with a list"),
    ("keys: {a: 1}", "'keys:' with a list"),
    ("keys: [1]", "a mapping with name"),
    ("keys: [", "not valid YAML"),
])
def test_a_bad_file_says_what_it_should_hold(tmp_path: Path, text: str, fix: str) -> None:
    path = tmp_path / "keys.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match="keys_file") as err:
        parse_keys_file(path)
    assert fix in str(err.value)


def test_a_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read it"):
        load_keys(settings(keys_file=tmp_path / "nope.yaml"))


def test_two_keys_may_not_share_a_name_or_a_secret(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="already defined"):
        load_keys(settings(keys="a:s1:tasks,a:s2:leases"))
    with pytest.raises(ConfigError, match="same secret"):
        load_keys(settings(keys="a:s1:tasks,b:s1:leases"))
    # The old token is one more key: its name and secret are taken too.
    with pytest.raises(ConfigError, match="unset GPULANE_TOKEN"):
        load_keys(settings(keys="a:s1:tasks", token="s1"))


def test_a_client_key_left_in_gpulane_token_is_named_not_made_an_admin(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # The shell that ran 'gpulane keys new' and tried the key as a client (GPULANE_TOKEN)
    # then starts the node: that key is not made an admin named 'token'.
    path = write(tmp_path, [{"name": "alice", "sha256": sha("k-alice"), "scopes": ["tasks"]}])
    with pytest.raises(ConfigError) as info:
        load_keys(settings(keys_file=path, token="k-alice"))
    message = str(info.value)
    assert "GPULANE_TOKEN" in message and "'alice'" in message and "admin" in message
    # Another secret beside the keys file is taken, and said out loud.
    with caplog.at_level(logging.WARNING):
        ring = load_keys(settings(keys_file=path, token="k-other"))
    assert len(ring) == 2 and "GPULANE_TOKEN" in caplog.text and "k-other" not in caplog.text


@pytest.mark.parametrize(("text", "fix"), [
    ("ci:secret", "name:secret:scope+scope"),
    ("ci::tasks", "name:secret:scope+scope"),
    ("ci:a:b:tasks", "may not hold ':'"),
    ("ci:secret:tasks+gpus", "'gpus' is not a scope"),
    ("c i:secret:tasks", "'c i' is not a key name"),
])
def test_a_bad_env_entry_names_it_and_the_fix(text: str, fix: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_keys_env("ok:s:tasks," + text)
    assert "GPULANE_KEYS entry 2" in str(err.value) and fix in str(err.value)


def test_a_new_key_is_random_and_its_entry_loads_back(tmp_path: Path) -> None:
    key, other = new_key(), new_key()
    assert key.startswith(KEY_PREFIX) and key != other and len(key) > 40
    entry = file_entry("ci", key, ["tasks", "leases"])
    assert key not in entry
    path = tmp_path / "keys.yaml"
    path.write_text("keys:\n" + entry)
    ring = load_keys(settings(keys_file=path))
    assert ring.find(key.encode()) == Caller("ci", frozenset({"tasks", "leases"}))
