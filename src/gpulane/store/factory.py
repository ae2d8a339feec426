"""Which store a URL names: the one place that knows every backend."""

from __future__ import annotations

from collections.abc import Sequence

from gpulane.config import Settings
from gpulane.errors import ConfigError
from gpulane.store.base import Store
from gpulane.store.memory import Held
from gpulane.store.redis import DEFAULT_EVENTS_MAX, DEFAULT_RETAIN_S, RedisStore
from gpulane.store.sqlite import SqliteStore
from gpulane.store.sqlite_adopt import adopt
from gpulane.store.tiered import OnlineLimits, TieredStore


def open_store(url: str, synchronous: str = "NORMAL", *, retain_s: float = DEFAULT_RETAIN_S,
               events_max: int = DEFAULT_EVENTS_MAX, online: OnlineLimits | None = None
               ) -> Store:
    """Build the store a URL names: ``sqlite:///path`` (embedded) or ``redis://host:port/db``
    (a fleet's). ``retain_s`` and ``events_max`` are the Redis store's (its TTLs and its
    per-task stream cap); SQLite's retention is the node's purge round alone. ``online``:
    the online lane's limits, for a SQLite store (``tiered.py``); None, or a Redis store,
    keeps every task in the store (a fleet's nodes must all see every task)."""
    if url.startswith("sqlite://"):
        # SQLAlchemy's convention: sqlite:///relative/path, sqlite:////absolute/path.
        path = url.removeprefix("sqlite:///") if url.startswith("sqlite:///") else ""
        sqlite = SqliteStore(path or ":memory:", synchronous=synchronous)
        if online is None or online.max_tasks <= 0:
            return sqlite

        def spill(tasks: Sequence[Held]) -> None:
            adopt(sqlite, tasks)

        return TieredStore(sqlite, spill, online)
    if url.startswith(("redis://", "rediss://")):
        return RedisStore(url, retain_s=retain_s, events_max=events_max)
    raise ConfigError(
        f"store={url!r} is not supported: use sqlite:///PATH (the embedded default) or "
        "redis://HOST:PORT/DB (a fleet)")


def store_for(settings: Settings) -> Store:
    """The store a node's settings name, the online lane's limits included."""
    return open_store(settings.store_url, settings.sqlite_synchronous,
                      retain_s=settings.retain, events_max=settings.events_max,
                      online=OnlineLimits(settings.online_spill_after_s, settings.online_keep_s,
                                          settings.online_max_tasks))
