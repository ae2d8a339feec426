"""Which store a URL names: the one place that knows every backend."""

from __future__ import annotations

from gpulane.errors import ConfigError
from gpulane.store.base import Store
from gpulane.store.redis import DEFAULT_EVENTS_MAX, DEFAULT_RETAIN_S, RedisStore
from gpulane.store.sqlite import SqliteStore


def open_store(url: str, synchronous: str = "NORMAL", *, retain_s: float = DEFAULT_RETAIN_S,
               events_max: int = DEFAULT_EVENTS_MAX) -> Store:
    """Build the store a URL names: ``sqlite:///path`` (embedded) or ``redis://host:port/db``
    (a fleet's). ``retain_s`` and ``events_max`` are the Redis store's (its TTLs and its
    per-task stream cap); SQLite's retention is the node's purge round alone."""
    if url.startswith("sqlite://"):
        # SQLAlchemy's convention: sqlite:///relative/path, sqlite:////absolute/path.
        path = url.removeprefix("sqlite:///") if url.startswith("sqlite:///") else ""
        return SqliteStore(path or ":memory:", synchronous=synchronous)
    if url.startswith(("redis://", "rediss://")):
        return RedisStore(url, retain_s=retain_s, events_max=events_max)
    raise ConfigError(
        f"store={url!r} is not supported: use sqlite:///PATH (the embedded default) or "
        "redis://HOST:PORT/DB (a fleet)")
