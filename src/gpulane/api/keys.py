"""API keys: who may call, with which scopes and rate. Loaded once, held only as digests.

Three sources add up: the keys file (``keys_file``, YAML, each key's SHA-256 and scopes), the
inline ``keys`` setting (env ``GPULANE_KEYS="name:secret:scope+scope,..."``) and the old single
``token`` (a key named ``token`` with every scope). The secrets themselves are never kept: a
presented key is hashed and looked up by its digest, which leaks nothing a timing attacker can
use (they would have to find SHA-256 preimages byte by byte). Every mistake is a ConfigError
naming the source, the entry and the field, with the fix.
"""

from __future__ import annotations

import hashlib
import logging
import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from gpulane.config import Settings
from gpulane.errors import ConfigError

log = logging.getLogger(__name__)

SCOPES = ("tasks", "leases", "admin")
"""What a key may be allowed: submit and manage tasks, take leases, run the node (admin implies
the other two)."""
ADMIN = "admin"
"""The scope that implies every other one (reload presets, drain, cancel anyone's task)."""
TOKEN_KEY_NAME = "token"
"""Name of the key the single ``token`` setting stands for (every scope, for compatibility)."""
TOKEN_SOURCE = "token (--token or GPULANE_TOKEN)"
"""Where the ``token`` setting comes from, as errors and warnings name it."""
KEY_PREFIX = "glk_"
"""Prefix of generated keys, so a leaked one is recognisable in logs and secret scanners."""
KEY_BYTES = 32
"""Random bytes in a generated key (256 bits)."""
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
"""A key's name: what tasks record as ``submitted_by`` and what errors and logs show."""
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
"""A SHA-256 digest written as hex."""
_FILE_FIELDS = frozenset({"name", "sha256", "key", "scopes", "rate_per_s", "burst"})
"""Fields an entry of the keys file may have."""


@dataclass(frozen=True, slots=True)
class Caller:
    """Who made a request: the key's name, its scopes and its own rate limit (None: the
    node's)."""

    name: str
    scopes: frozenset[str]
    rate_per_s: float | None = None
    burst: int | None = None

    @property
    def is_admin(self) -> bool:
        return ADMIN in self.scopes

    def allows(self, scope: str) -> bool:
        """Whether this key may use routes of ``scope`` (admin may use them all)."""
        return scope in self.scopes or ADMIN in self.scopes


def digest(secret: bytes) -> bytes:
    """The SHA-256 of a key, the only form in which keys are held."""
    return hashlib.sha256(secret).digest()


class KeyRing:
    """Every key a node accepts, by digest. Empty: the node needs no key."""

    def __init__(self, keys: Iterable[tuple[bytes, Caller]] = ()) -> None:
        self._by_digest: dict[bytes, Caller] = {}
        for d, caller in keys:
            self.add(d, caller, "")

    def add(self, key_digest: bytes, caller: Caller, where: str) -> None:
        for other in self._by_digest.values():
            if other.name == caller.name:
                raise ConfigError(f"{where}: a key named {caller.name!r} is already defined: "
                                  "give each key its own name")
        if key_digest in self._by_digest:
            raise ConfigError(f"{where}: key {caller.name!r} is the same secret as key "
                              f"{self._by_digest[key_digest].name!r}: make a fresh one with "
                              "'gpulane keys new NAME'")
        self._by_digest[key_digest] = caller

    def find(self, secret: bytes) -> Caller | None:
        """The caller a presented key belongs to, or None for an unknown key."""
        return self._by_digest.get(digest(secret))

    @property
    def callers(self) -> list[Caller]:
        return list(self._by_digest.values())

    def __bool__(self) -> bool:
        return bool(self._by_digest)

    def __len__(self) -> int:
        return len(self._by_digest)


def load_keys(settings: Settings) -> KeyRing:
    """The node's keys from the keys file, ``keys`` (GPULANE_KEYS) and ``token``."""
    ring = KeyRing()
    if settings.keys_file is not None:
        for d, caller, where in parse_keys_file(settings.keys_file):
            ring.add(d, caller, where)
    if settings.keys:
        for d, caller, where in parse_keys_env(settings.keys):
            ring.add(d, caller, where)
    if settings.token:
        # GPULANE_TOKEN is also what the SDK and CLI send: a node started from a shell set up
        # for a client would take that client's key as a second, admin one.
        token_digest = digest(settings.token.encode())
        clash = ring.find(settings.token.encode())
        if clash is not None:
            raise ConfigError(
                f"{TOKEN_SOURCE}: it is key {clash.name!r}'s secret, and would make that key "
                "an admin: unset GPULANE_TOKEN in the node's environment (it is the "
                "client's variable) or drop --token")
        if ring:
            log.warning("%s adds key %r with every scope beside the other keys; if it was "
                        "meant for a client, unset GPULANE_TOKEN where the node starts",
                        TOKEN_SOURCE, TOKEN_KEY_NAME)
        ring.add(token_digest, Caller(TOKEN_KEY_NAME, frozenset(SCOPES)), TOKEN_SOURCE)
    return ring


def parse_keys_env(text: str) -> list[tuple[bytes, Caller, str]]:
    """Keys written ``name:secret:scope+scope`` and separated by commas."""
    out = []
    for i, item in enumerate(p.strip() for p in text.split(",")):
        if not item:
            continue
        where = f"GPULANE_KEYS entry {i + 1}"
        parts = item.split(":")
        if len(parts) != 3 or not all(parts):
            raise ConfigError(f"{where}: expected name:secret:scope+scope (e.g. "
                              f"ci:glk_...:tasks+leases), got {len(parts)} part(s); a secret "
                              "may not hold ':' or ','")
        name, secret, scopes = parts
        caller = Caller(check_name(name, where), check_scopes(scopes.split("+"), where))
        out.append((digest(secret.encode()), caller, f"{where} ({name})"))
    return out


def parse_keys_file(path: Path) -> list[tuple[bytes, Caller, str]]:
    """Entries ``{name, sha256, scopes, rate_per_s?, burst?}`` under ``keys:``."""
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"keys_file {path}: cannot read it: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"keys_file {path}: not valid YAML: {exc}") from None
    entries = data.get("keys") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise ConfigError(f"keys_file {path}: expected 'keys:' with a list of entries (see "
                          "'gpulane keys new NAME' for one to paste)")
    out = []
    for i, entry in enumerate(entries):
        where = f"keys_file {path}: entry {i + 1}"
        if not isinstance(entry, dict):
            raise ConfigError(f"{where}: expected a mapping with name, sha256 and scopes")
        out.append(_file_entry(entry, where))
    return out


def _file_entry(entry: dict[str, Any], where: str) -> tuple[bytes, Caller, str]:
    unknown = sorted(set(map(str, entry)) - _FILE_FIELDS)
    if unknown:
        raise ConfigError(f"{where}: unknown field {unknown[0]!r}: use "
                          f"{', '.join(sorted(_FILE_FIELDS))}")
    name = check_name(entry.get("name"), where)
    where = f"{where} ({name})"
    hexed, secret = entry.get("sha256"), entry.get("key")
    if (hexed is None) == (secret is None):
        raise ConfigError(f"{where}: field 'sha256': give the key's SHA-256 (hex) or, less "
                          "safely, the key itself as 'key', exactly one of them")
    if secret is not None:
        if not isinstance(secret, str) or not secret:
            raise ConfigError(f"{where}: field 'key': expected the key as a string")
        log.warning("%s: the key is written in clear; store its sha256 instead "
                    "(printf %%s KEY | sha256sum)", where)
        key_digest = digest(secret.encode())
    else:
        if not isinstance(hexed, str) or not _HEX64.match(hexed.strip().lower()):
            raise ConfigError(f"{where}: field 'sha256': {hexed!r} is not 64 hex digits: "
                              "write the output of 'printf %s KEY | sha256sum'")
        key_digest = bytes.fromhex(hexed.strip())
    scopes = entry.get("scopes")
    if not isinstance(scopes, list):
        raise ConfigError(f"{where}: field 'scopes': expected a list drawn from "
                          f"{', '.join(SCOPES)}, e.g. [tasks, leases]")
    rate, burst = entry.get("rate_per_s"), entry.get("burst")
    if rate is not None and (isinstance(rate, bool) or not isinstance(rate, int | float)
                             or not 0 <= rate < float("inf")):
        raise ConfigError(f"{where}: field 'rate_per_s': {rate!r} is not a number >= 0 "
                          "(requests per second; 0 means no limit)")
    if burst is not None and (isinstance(burst, bool) or not isinstance(burst, int)
                              or burst < 0):
        raise ConfigError(f"{where}: field 'burst': {burst!r} is not a whole number >= 0 "
                          "(0 means one second's worth)")
    caller = Caller(name, check_scopes(scopes, where),
                    None if rate is None else float(rate), burst)
    return key_digest, caller, where


def check_name(value: Any, where: str) -> str:
    """``value`` as a key name, else a ConfigError naming ``where`` and the fix."""
    if not isinstance(value, str) or not _NAME.match(value):
        raise ConfigError(f"{where}: field 'name': {value!r} is not a key name: use 1-64 "
                          "letters, digits, '.', '_' or '-'")
    return value


def check_scopes(values: list[Any], where: str) -> frozenset[str]:
    """``values`` as a set of scopes, else a ConfigError naming ``where`` and the fix."""
    for v in values:
        if v not in SCOPES:
            raise ConfigError(f"{where}: field 'scopes': {v!r} is not a scope: use "
                              f"{', '.join(SCOPES)}")
    if not values:
        raise ConfigError(f"{where}: field 'scopes': empty: give at least one of "
                          f"{', '.join(SCOPES)}")
    return frozenset(values)


def new_key() -> str:
    """A fresh random key."""
    return KEY_PREFIX + secrets.token_urlsafe(KEY_BYTES)


def file_entry(name: str, key: str, scopes: Iterable[str]) -> str:
    """The keys file entry (YAML) for ``key``: its digest, never the key itself."""
    entry = {"name": name, "sha256": hashlib.sha256(key.encode()).hexdigest(),
             "scopes": list(scopes)}
    return yaml.safe_dump([entry], sort_keys=False, default_flow_style=None)
