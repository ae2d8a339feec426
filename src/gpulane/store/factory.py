"""Which store a URL names: the one place that knows every backend."""

from __future__ import annotations

from gpulane.errors import ConfigError
from gpulane.store.base import Store
from gpulane.store.sqlite import SqliteStore


def open_store(url: str, synchronous: str = "NORMAL") -> Store:
    """Build the store a URL names: ``sqlite:///path`` (embedded) or ``redis://`` (fleet)."""
    if url.startswith("sqlite://"):
        # SQLAlchemy's convention: sqlite:///relative/path, sqlite:////absolute/path.
        path = url.removeprefix("sqlite:///") if url.startswith("sqlite:///") else ""
        return SqliteStore(path or ":memory:", synchronous=synchronous)
    raise ConfigError(
        f"store={url!r} is not supported yet: use sqlite:///PATH (the embedded default)")
