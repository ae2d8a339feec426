"""The Celery peer of the dispatch benchmark: one no-op task mirroring gpulane's ``sleep``.

Broker and result backend are both the Redis that ``BENCH_REDIS_URL`` names (the benchmark
starts a private ``redis-server`` and sets it for the worker and the client alike). Settings
are Celery's defaults except where noted.

Worker: ``celery -A bench.celery_app worker --pool prefork --concurrency 2 --loglevel warning``
"""

from __future__ import annotations

import os
import time
from typing import Any

from celery import Celery

REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")

app = Celery("bench", broker=REDIS_URL, backend=REDIS_URL)
app.conf.update(
    broker_connection_retry_on_startup=True,  # silences a deprecation warning, same behaviour
    result_expires=3600,
    worker_hijack_root_logger=False,
)


@app.task(name="bench.sleep")
def sleep(ms: float = 0) -> dict[str, Any]:
    """Sleep ``ms`` milliseconds, then return ``{"slept_ms": ms}`` (gpulane's sleep worker)."""
    if ms:
        time.sleep(ms / 1000)
    return {"slept_ms": ms}
