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
import re
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
DEFAULT_TASK_PREEMPT_GRACE_S = DEFAULT_LEASE_GRACE_S
"""How long a worker preempted for an immediate task has to finish its batch (then it is
killed; what it held goes back to the queue unspent): as long as a lease's holders get."""
DEFAULT_AGEING_S = 30.0
"""A queued task gains one priority point per this many seconds of waiting (0 turns it off):
background work (10) overtakes fresh normal work (50) after 20 minutes."""
DEFAULT_ONLINE_SPILL_AFTER_S = 2.0
"""A task of a ``durable: false`` preset still queued or running this long after its submit
is written to the store, and lives there from then on (docs/reliability.md, "The online
lane"): the most a crash of the node can lose of it is this window's worth."""
DEFAULT_ONLINE_KEEP_S = 300.0
"""How long a succeeded or cancelled online task's result stays readable in the node's memory
(``GET /v1/tasks/{id}``); after it, 404."""
DEFAULT_ONLINE_MAX_TASKS = 100_000
"""Most online tasks one node holds in memory (queued, running and finished together);
submits above it go to the store, as a durable preset's do: nothing is refused or lost."""
GPU_LOCK_DIRS = ("/run/gpulane/gpu-locks",)
"""Host-wide folders tried, in order, for the per-GPU lock files when gpu_lock_dir is not
set (never world-writable /tmp); the data dir's ``gpu-locks`` is the last resort."""
DEFAULT_RETAIN_S = 7 * 24 * 3600.0
"""How long finished tasks, their events, files and idempotency keys are kept (7 days)."""
DEFAULT_CLAIM_TTL_S = 30.0
"""A running task whose owner has not heartbeat for this long goes back to the queue."""
DEFAULT_MAX_QUEUED = 100_000
"""Queued tasks one preset may hold before submits get 429 queue_full (a preset's own
max_queued overrides it)."""
DEFAULT_RATE_LIMIT_PER_S = 0.0
"""Requests per second one API key may make (token bucket; 0: no limit). A key in the keys
file may set its own."""
DEFAULT_RATE_BURST = 0
"""Requests a key may make at once above its rate (0: one second's worth)."""
DEFAULT_NODE_TTL_S = 5.0
"""A fleet node unheard of for this long is dead: another node requeues its running tasks, its
leases end and its devices leave GET /v1/gpus. A node heartbeats three times per TTL."""
DEFAULT_WARM_WINDOW_S = 0.25
"""For this long after a task is queued, a node with no warm worker for its preset leaves it
to a node that has one (a cold start costs seconds); after it any node with room takes it."""
DEFAULT_DRAIN_GRACE_S = 30.0
"""On SIGTERM or ``gpulane drain``: how long running work may take to finish before what is
left goes back to the queue (its attempts given back)."""
DEFAULT_EVENTS_MAX = 10_000
"""Most events kept per task in a Redis store (the stream is capped; SQLite keeps all)."""
DURABILITY_SYNCHRONOUS = {"normal": "NORMAL", "full": "FULL"}
"""SQLite's synchronous pragma per durability: what a 202 can lose is in docs/reliability.md."""
DEFAULT_UPLOAD_MAX_BYTES = 256 * 1024 * 1024
"""Largest upload POST /v1/files takes (413 upload_too_large above it)."""
DEFAULT_FILE_RETAIN_S = 24 * 3600.0
"""How long an upload is kept after it was made (then retention removes it)."""


_ORIGIN = re.compile(r"^https?://(\[[0-9A-Fa-f:.]+\]|[^/\s:*\[\]]+)(:\d{1,5})?$")
"""An origin as browsers send it in the Origin header (no path, no wildcard)."""
_DURATION_UNITS_S = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}


def parse_duration_s(text: str) -> float:
    """Seconds in "7d", "12h", "30m", "45s", "1w" or a plain number of seconds."""
    t = text.strip().lower()
    try:
        if t and t[-1] in _DURATION_UNITS_S:
            value = float(t[:-1]) * _DURATION_UNITS_S[t[-1]]
        else:
            value = float(t)
    except ValueError:
        raise ValueError(f"{text!r} is not a duration: use e.g. 7d, 12h, 30m, 45s or a "
                         "number of seconds") from None
    if not value > 0 or value == float("inf"):
        raise ValueError(f"{text!r} is not a positive duration")
    return value


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
    token: str | None = None  # one admin API key (named "token"), besides the keys file
    keys_file: Path | None = None  # API keys: name, sha256 of the key, scopes (docs/security.md)
    keys: str | None = None  # API keys inline, "name:key:scope+scope,..." (env GPULANE_KEYS)
    insecure_no_auth: bool = False  # allow a non-loopback bind without any key
    # origins allowed to call from a browser (CORS is off when empty); comma-separated in env
    cors_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)
    max_input_bytes: int = Field(DEFAULT_MAX_INPUT_BYTES, ge=1024)
    max_queued: int = Field(DEFAULT_MAX_QUEUED, ge=1)  # per preset, unless it sets its own
    rate_limit_per_s: float = Field(DEFAULT_RATE_LIMIT_PER_S, ge=0)  # per key; 0: off
    rate_burst: int = Field(DEFAULT_RATE_BURST, ge=0)  # 0: one second's worth
    retain: float = Field(DEFAULT_RETAIN_S, gt=0)  # seconds ("7d", "12h" too) finished work is kept
    claim_ttl_s: float = Field(DEFAULT_CLAIM_TTL_S, ge=1)  # requeue running tasks unheard of
    node_ttl_s: float = Field(DEFAULT_NODE_TTL_S, ge=1)  # fleet: a node unheard of is dead
    warm_window_s: float = Field(DEFAULT_WARM_WINDOW_S, ge=0)  # fleet: warm nodes claim first
    drain_grace_s: float = Field(DEFAULT_DRAIN_GRACE_S, ge=0)  # SIGTERM/drain: finish within
    events_max: int = Field(DEFAULT_EVENTS_MAX, ge=100)  # redis: events kept per task
    advertise_url: str | None = None  # fleet: this node's API URL as others reach it
    durability: str = "normal"  # normal: survives a process crash; full: power loss too
    log_level: str = "info"
    ageing_s: float = Field(DEFAULT_AGEING_S, ge=0)  # +1 priority per this many s queued; 0: off
    gpu_lock_dir: str | None = None  # per-GPU lock files; None: GPU_LOCK_DIRS, else data dir
    worker_stderr_lines: int = Field(DEFAULT_WORKER_STDERR_LINES, ge=1, le=10_000)
    worker_stop_grace_s: float = Field(DEFAULT_WORKER_STOP_GRACE_S, ge=0, le=3600)
    # a worker preempted for an immediate task finishes its batch within this, or is killed
    task_preempt_grace_s: float = Field(DEFAULT_TASK_PREEMPT_GRACE_S, ge=0, le=LEASE_GRACE_MAX_S)
    # folders whose files a task's input may name (canonicalised at start; env: separated by
    # os.pathsep or commas); none: tasks name files by upload only
    allowed_roots: Annotated[list[str], NoDecode] = Field(default_factory=list)
    files_dir: Path | None = None  # where uploads are kept; None: <data_dir>/files
    upload_max_bytes: int = Field(DEFAULT_UPLOAD_MAX_BYTES, ge=1)  # per upload; 413 above
    file_retain_s: float = Field(DEFAULT_FILE_RETAIN_S, gt=0)  # uploads ("24h" too) kept this long
    # the online lane (presets with durable: false): docs/reliability.md, "The online lane"
    online_spill_after_s: float = Field(DEFAULT_ONLINE_SPILL_AFTER_S, gt=0, le=3600)
    online_keep_s: float = Field(DEFAULT_ONLINE_KEEP_S, ge=0)
    online_max_tasks: int = Field(DEFAULT_ONLINE_MAX_TASKS, ge=0)  # 0: the lane is off

    @field_validator("durability")
    @classmethod
    def _durability(cls, v: str) -> str:
        if v.lower() not in DURABILITY_SYNCHRONOUS:
            raise ValueError("use normal (survives a process crash) or full (survives power "
                             "loss too)")
        return v.lower()

    @field_validator("retain", mode="before")
    @classmethod
    def _retain(cls, v: Any) -> Any:
        return parse_duration_s(v) if isinstance(v, str) else v

    @field_validator("file_retain_s", mode="before")
    @classmethod
    def _file_retain(cls, v: Any) -> Any:
        return parse_duration_s(v) if isinstance(v, str) else v

    @field_validator("allowed_roots", mode="before")
    @classmethod
    def _split_roots(cls, v: Any) -> Any:
        # GPULANE_ALLOWED_ROOTS=/data:/scratch like PATH, or /data,/scratch.
        if isinstance(v, str):
            return [p.strip() for p in re.split(f"[,{re.escape(os.pathsep)}]", v) if p.strip()]
        return v

    @property
    def uploads_dir(self) -> Path:
        """Where uploads are kept: files_dir, else <data_dir>/files."""
        return self.files_dir if self.files_dir is not None else self.data_dir / "files"

    @field_validator("advertise_url")
    @classmethod
    def _advertise_url(cls, v: str | None) -> str | None:
        if v is not None and not re.match(r"^https?://[^/\s]+", v):
            raise ValueError(f"{v!r} is not a URL other hosts can reach: write it as "
                             "http(s)://HOST:PORT, e.g. http://gpu-a.lan:8765")
        return v.rstrip("/") if v is not None else v

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _split_origins(cls, v: Any) -> Any:
        if isinstance(v, str):
            return [o.strip() for o in v.split(",") if o.strip()]
        return v

    @field_validator("cors_origins")
    @classmethod
    def _origins(cls, v: list[str]) -> list[str]:
        # A browser sends Origin as scheme://host[:port]; anything else would never match,
        # and CORS would stay off without a word.
        for origin in v:
            if not _ORIGIN.match(origin):
                raise ValueError(f"{origin!r} is not an origin: write it as a browser sends "
                                 "it, scheme://host[:port] without a path, e.g. "
                                 "https://app.example or http://localhost:3000")
        # Browsers send scheme and host in lower case, and CORS compares exactly: as written,
        # "https://App.example" would never match.
        return [origin.lower() for origin in v]

    @property
    def sqlite_synchronous(self) -> str:
        """SQLite's synchronous pragma for the chosen durability."""
        return DURABILITY_SYNCHRONOUS[self.durability]

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
    def node_url(self) -> str:
        """This node's API as other hosts reach it: advertise_url, else its bind address."""
        return self.advertise_url or f"http://{self.host}:{self.port}"

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
