"""Settings: a YAML file (``gpulane.yaml``) < environment variables ``GPULANE_*`` < flags.

Every setting a user can tune lives here, with its default and a one-line doc;
``Settings.load(file, **flags)`` merges the three layers (a flag given as ``None`` means "not
given" and does not override). Constants nobody tunes live beside their use, with the reason.
The lease bounds below are the one exception: they are a contract that two layers check (the
API's request model publishes them, the lease manager applies the defaults), and this
foundation module is the one place both may import.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict, SettingsError

from gpulane.errors import ConfigError

DEFAULT_HOST = "127.0.0.1"
"""Bind address: loopback, so a fresh install is not reachable from the network."""
DEFAULT_PORT = 8765
"""TCP port of the HTTP API."""
DEFAULT_DATA_DIR = ".gpulane"
"""Folder for the SQLite database, locks and worker scratch files."""
DEFAULT_CONFIG_FILE = "gpulane.yaml"
"""Config file read from the working directory when --config is not given."""
DEFAULT_MAX_INPUT_BYTES = 10 * 1024 * 1024
"""Largest request body accepted (413 above it)."""
DEFAULT_WORKER_STDERR_LINES = 20
"""How many of a dead worker's last stderr lines a failed task's error carries."""
DEFAULT_WORKER_STOP_GRACE_S = 5.0
"""How long a worker has to exit after the shutdown op (then SIGTERM) before it is killed."""
DEFAULT_LEASE_TTL_S = 30.0
"""TTL of a lease whose request gives none."""
LEASE_TTL_MIN_S = 1.0
"""Shortest TTL a lease may ask for."""
LEASE_TTL_MAX_S = 3600.0
"""Longest TTL a lease may ask for; renew to hold longer."""
LEASE_WAIT_MAX_S = 3600.0
"""Longest a lease request may wait to be granted."""
DEFAULT_LEASE_GRACE_S = 10.0
"""How long a preempted lease holder has to release before it is revoked."""
LEASE_GRACE_MAX_S = 600.0
"""Longest grace a lease request may give its preempted holders."""
DEFAULT_AGEING_S = 30.0
"""A queued task gains one priority point per this many seconds of waiting (0 turns it off):
background work (10) overtakes fresh normal work (50) after 20 minutes."""
DEFAULT_GPU_LOCK_DIR = "/tmp/gpulane-gpu-locks"
"""Host-wide folder of per-GPU lock files: two nodes never own the same GPU."""


class Settings(BaseSettings):
    """A node's settings. Environment variables are ``GPULANE_<FIELD>``, e.g. GPULANE_PORT."""

    model_config = SettingsConfigDict(env_prefix="GPULANE_", extra="forbid")

    host: str = DEFAULT_HOST
    port: int = Field(DEFAULT_PORT, ge=0, le=65535)
    data_dir: Path = Path(DEFAULT_DATA_DIR)
    store: str | None = None  # sqlite:///path (default: <data_dir>/gpulane.db) or redis://...
    # files or folders, added to the examples; NoDecode: GPULANE_PRESETS is a path list, not JSON
    presets: Annotated[list[str], NoDecode] = Field(default_factory=list)
    examples: bool = True  # load examples/presets too
    simulate_gpus: str | None = None  # e.g. "2x24GiB"; None = NVML, else simulated default
    cpu_concurrency: int | None = Field(None, ge=1)  # default: number of cores
    node_name: str | None = None  # default: hostname
    token: str | None = None  # bearer token required by the API when set
    max_input_bytes: int = Field(DEFAULT_MAX_INPUT_BYTES, ge=1024)
    sqlite_synchronous: str = "NORMAL"  # NORMAL: durable across process crashes; FULL: power loss
    log_level: str = "info"
    ageing_s: float = Field(DEFAULT_AGEING_S, ge=0)  # +1 priority per this many s queued; 0: off
    gpu_lock_dir: str = DEFAULT_GPU_LOCK_DIR  # one lock file per real GPU uuid, host-wide
    worker_stderr_lines: int = Field(DEFAULT_WORKER_STDERR_LINES, ge=1, le=10_000)
    worker_stop_grace_s: float = Field(DEFAULT_WORKER_STOP_GRACE_S, ge=0, le=3600)

    @field_validator("sqlite_synchronous")
    @classmethod
    def _sync_mode(cls, v: str) -> str:
        if v.upper() not in ("OFF", "NORMAL", "FULL", "EXTRA"):
            raise ValueError("use OFF, NORMAL, FULL or EXTRA")
        return v.upper()

    @field_validator("presets", mode="before")
    @classmethod
    def _split_presets(cls, v: Any) -> Any:
        # GPULANE_PRESETS=a.yaml:b/ is friendlier in a shell than JSON (a JSON list works too).
        if isinstance(v, str):
            if v.lstrip().startswith("["):
                # Not JSON after all: fall through and split it like a PATH.
                with contextlib.suppress(ValueError):
                    return json.loads(v)
            return [p for p in v.split(os.pathsep) if p]
        return v

    @property
    def store_url(self) -> str:
        return self.store or f"sqlite:///{(self.data_dir / 'gpulane.db').resolve()}"

    @property
    def node(self) -> str:
        import socket

        return self.node_name or socket.gethostname()

    @classmethod
    def load(cls, config_file: str | Path | None = None, **flags: Any) -> Settings:
        """Merge file < env < flags; flags that are None are ignored."""
        path = Path(config_file) if config_file else Path(DEFAULT_CONFIG_FILE)
        file_values: dict[str, Any] = {}
        if path.exists():
            try:
                loaded = yaml.safe_load(path.read_text()) or {}
            except yaml.YAMLError as exc:
                raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
            if not isinstance(loaded, dict):
                raise ConfigError(f"{path}: expected a mapping of settings at the top level")
            file_values = {k.replace("-", "_"): v for k, v in loaded.items()}
        elif config_file:
            raise ConfigError(f"--config {config_file}: no such file")
        given = {k: v for k, v in flags.items() if v is not None and v != ()}
        try:
            # Env beats the file: build from env first, then lay the file under it.
            env_only = cls()  # type: ignore[call-arg]  # pydantic-settings fills it from env
            env_set = {k for k in cls.model_fields if f"GPULANE_{k.upper()}" in os.environ}
            merged = {**file_values, **{k: getattr(env_only, k) for k in env_set}, **given}
            return cls.model_validate(merged) if merged else env_only
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
            raise ConfigError(f"invalid settings: {problems}") from exc
        except SettingsError as exc:  # an environment variable pydantic-settings cannot read
            raise ConfigError(f"invalid settings: {exc}") from exc
