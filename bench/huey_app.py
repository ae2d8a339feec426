"""The Huey peer of the dispatch benchmark: one no-op task mirroring gpulane's ``sleep``.

A ``RedisHuey`` on the Redis that ``BENCH_REDIS_URL`` names (the benchmark starts a private
``redis-server`` and sets it for the consumer and the client alike), results on (Huey's
default) and ``notify_result=True``: a blocking ``result.get(blocking=True)`` waits on a
Redis BLPOP instead of polling with back-off (Huey's documented low-latency option).

Consumer: ``huey_consumer bench.huey_app.huey -w 2 -k process``
"""

from __future__ import annotations

import os
import time
from typing import Any

from huey import RedisHuey

REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")

huey = RedisHuey("bench", url=REDIS_URL, results=True, notify_result=True)


@huey.task()
def sleep(ms: float = 0) -> dict[str, Any]:
    """Sleep ``ms`` milliseconds, then return ``{"slept_ms": ms}`` (gpulane's sleep worker)."""
    if ms:
        time.sleep(ms / 1000)
    return {"slept_ms": ms}
