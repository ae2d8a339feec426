"""How the Redis store's methods fail, and how it writes numbers for its scripts.

Out of redis.py so that the store's methods fit one module: ``guarded`` turns a Redis that
cannot be reached (refused, reset, timed out, out of memory) into StoreUnavailableError and
any other refused call into StoreError; ``num`` writes a float as the scripts read it back.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Coroutine
from typing import Any, Concatenate, ParamSpec, Protocol, TypeVar

from gpulane.errors import StoreError, StoreUnavailableError
from gpulane.store.redis_conn import PASSING_ERRORS, RedisDown, RedisReplyError

P = ParamSpec("P")
R = TypeVar("R")


class HasUrl(Protocol):
    url: str


S = TypeVar("S", bound=HasUrl)


def guarded(fn: Callable[Concatenate[S, P], Coroutine[Any, Any, R]]
            ) -> Callable[Concatenate[S, P], Coroutine[Any, Any, R]]:
    """Redis that cannot be reached (refused, reset, timed out) is StoreUnavailableError."""
    @functools.wraps(fn)
    async def wrapper(self: S, /, *args: P.args, **kw: P.kwargs) -> R:
        try:
            return await fn(self, *args, **kw)
        except (RedisDown, OSError) as exc:
            raise StoreUnavailableError(f"Redis at {self.url} failed ({exc})") from exc
        except RedisReplyError as exc:
            if str(exc).startswith(PASSING_ERRORS):
                raise StoreUnavailableError(f"Redis at {self.url} failed ({exc})") from exc
            if str(exc).startswith("OOM"):  # full: no write until memory is freed
                raise StoreUnavailableError(
                    f"Redis at {self.url} is out of memory and refuses writes ({exc}): raise "
                    "its maxmemory, or shorten --retain so that the purge frees more (keep "
                    "maxmemory-policy noeviction: an evicted task is lost)") from exc
            raise StoreError(f"Redis at {self.url} refused a call ({exc})") from exc
    return wrapper


def num(x: float) -> str:
    """A float as the scripts take it: exact (repr) and parsed back to the same value."""
    return repr(float(x))
