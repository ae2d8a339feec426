"""Which running attempts the SQLite store takes back, and the error each one carries: those
unheard of past the claim TTL (``reap``) and those of a node that died (``reap_node``).

Reads only: ``sqlite.py`` requeues or fails each row, fenced by its token. The partial running
index holds only running tasks, so these read it, never the table.
"""

from __future__ import annotations

import sqlite3
from typing import Any

from gpulane.model import ErrorKind, now, task_error

Row = tuple[str, int, int, str, dict[str, Any]]
"""One attempt to take back: task id, token, attempts, preset, the error it ends with."""


def stale(db: sqlite3.Connection, stale_before: float) -> list[Row]:
    """Running attempts whose heartbeat (their claim, when they never had one) is older than
    ``stale_before``."""
    at = now()
    rows = db.execute(
        "SELECT id, token, attempts, preset, node, COALESCE(heartbeat_at, started_at, 0) "
        "FROM tasks WHERE state='running' AND node IS NOT NULL "
        "AND COALESCE(heartbeat_at, started_at, 0) < ?", (stale_before,)).fetchall()
    return [(tid, token, attempts, preset, task_error(
                ErrorKind.WORKER_DIED,
                f"node {node} stopped heartbeating this attempt ({at - seen:.0f} s without a "
                "word, past the claim TTL): its owner died or no longer holds it",
                code="claim_expired"))
            for tid, token, attempts, preset, node, seen in rows]


def of_node(db: sqlite3.Connection, node: str) -> list[Row]:
    """Every running attempt of ``node`` (dead: its registration expired)."""
    rows = db.execute(
        "SELECT id, token, attempts, preset FROM tasks WHERE state='running' AND node=?",
        (node,)).fetchall()
    error = task_error(ErrorKind.WORKER_DIED,
                       f"node {node} died (its registration expired) while running this "
                       "attempt", code="node_lost")
    return [(*r, error) for r in rows]
