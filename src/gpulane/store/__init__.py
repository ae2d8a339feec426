"""Where tasks, events and idempotency keys live: SQLite embedded, Redis for fleets."""

from gpulane.store.base import (
    Finish,
    LaneStats,
    NewEvent,
    PurgeReport,
    QueuedTask,
    QueueHead,
    QueueStats,
    Store,
    TaskNotifier,
    body_hash,
    wait_final,
    wait_final_many,
)
from gpulane.store.factory import open_store, store_for

__all__ = ["Finish", "LaneStats", "NewEvent", "PurgeReport", "QueueHead", "QueueStats",
           "QueuedTask", "Store", "TaskNotifier", "body_hash", "open_store", "store_for",
           "wait_final", "wait_final_many"]
