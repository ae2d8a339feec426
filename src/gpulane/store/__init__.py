"""Where tasks, events and idempotency keys live: SQLite embedded, Redis for fleets."""

from gpulane.store.base import Finish, NewEvent, Notifier, QueueHead, Store, open_store, wait_final

__all__ = ["Finish", "NewEvent", "Notifier", "QueueHead", "Store", "open_store", "wait_final"]
