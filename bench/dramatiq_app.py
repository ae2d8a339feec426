"""The Dramatiq peer of the dispatch benchmark: one no-op actor mirroring gpulane's ``sleep``.

A ``RedisBroker`` with the ``Results`` middleware on a ``RedisBackend``, both on the Redis that
``BENCH_REDIS_URL`` names (the benchmark starts a private ``redis-server`` and sets it for the
workers and the client alike), as Dramatiq's docs set up results. Settings are Dramatiq's
defaults otherwise.

Workers: ``dramatiq bench.dramatiq_app --processes 2 --threads 8``
"""

from __future__ import annotations

import os
import time
from typing import Any

import dramatiq
from dramatiq.brokers.redis import RedisBroker
from dramatiq.results import Results
from dramatiq.results.backends import RedisBackend

REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")

broker = RedisBroker(url=REDIS_URL)
broker.add_middleware(Results(backend=RedisBackend(url=REDIS_URL)))
dramatiq.set_broker(broker)


@dramatiq.actor(store_results=True, actor_name="bench_sleep")
def sleep(ms: float = 0) -> dict[str, Any]:
    """Sleep ``ms`` milliseconds, then return ``{"slept_ms": ms}`` (gpulane's sleep worker)."""
    if ms:
        time.sleep(ms / 1000)
    return {"slept_ms": ms}
