"""The embedded store: one SQLite file in WAL mode, owned by one node.

Calls run on the event loop's thread: each statement here takes tens of microseconds (WAL,
no fsync per commit with synchronous=NORMAL), less than a hop to a thread pool would cost.
Only the upkeep runs on threads of its own (WAL checkpoints, the retention purge: see
sqlite_upkeep.py). The node's data-dir lock guarantees no other process writes this file, so
the store keeps its queue counters in memory: no read of the table answers how many are queued.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import threading
from collections import Counter
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import orjson

from gpulane.errors import StaleTokenError, StoreError
from gpulane.model import ErrorKind, Event, Task, TaskSpec, TaskState, now, task_error
from gpulane.store import sqlite_lanes, sqlite_submit, sqlite_takeback, sqlite_upkeep
from gpulane.store.base import (
    Finish,
    LaneStats,
    NewEvent,
    PurgeReport,
    QueuedTask,
    QueueHead,
    QueueStats,
    TaskNotifier,
    finish_one,
    follow_by_notifier,
    requeued_event,
)
from gpulane.store.group_commit import SubmitGroups
from gpulane.store.sqlite_listing import PageReader, read_page
from gpulane.store.sqlite_schema import (
    COLUMNS,
    INSERT_EVENT,
    SCHEMA,
    dumps,
    migrate,
    row_to_task,
)

log = logging.getLogger("gpulane.store")


class SqliteStore:
    """Store on one SQLite file (or ``:memory:`` for tests)."""

    def __init__(self, path: str | Path, synchronous: str = "NORMAL") -> None:
        self.path = str(path)
        self.synchronous = synchronous
        self.notifier = TaskNotifier()
        self.on_work = _nothing  # only this process writes the file: nobody else queues
        self._db: sqlite3.Connection | None = None
        # (preset, lane) queues that may hold queued tasks: this node owns the file, so it
        # knows every insert; queue_heads skips the rest instead of querying each one.
        self._maybe_queued: set[tuple[str, str]] = set()
        # Per (preset, lane): tasks queued now; per preset: claims since open. Kept in step
        # with every write (after its commit), so admission, /readyz and the status view read
        # counters, never the table.
        self._queued: Counter[tuple[str, str]] = Counter()
        self._claimed: Counter[str] = Counter()
        self._closing = threading.Event()
        self._write_gate = threading.Lock()  # this process's writers: the loop and the purge
        self._checkpointer: threading.Thread | None = None
        self._pages: PageReader | None = None  # listings, off the loop (sqlite_listing.py)
        self.submit_groups = SubmitGroups(lambda specs: self._submit_now(specs))

    # -- lifecycle -------------------------------------------------------------------------

    async def open(self) -> None:
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        db = sqlite_upkeep.connect_main(self.path, self.synchronous)
        db.executescript(SCHEMA)
        migrate(db)
        self._db = db
        self._maybe_queued = set()
        self._queued = Counter()
        for preset, lane, n in db.execute(
                "SELECT preset, lane, COUNT(*) FROM tasks WHERE state='queued' "
                "GROUP BY preset, lane"):
            self._maybe_queued.add((preset, lane))
            self._queued[(preset, lane)] += n
        self._claimed = Counter()
        self._closing = threading.Event()  # a reopened store's threads must not see the close
        if self.path != ":memory:":
            # A checkpoint syncs the database file to disk: 15-20 ms that must not stall the
            # event loop. Commits stop checkpointing; a thread with its own connection does it.
            db.execute("PRAGMA wal_autocheckpoint=0")
            self._checkpointer = threading.Thread(target=self._checkpoint_loop,
                                                  name="gpulane-sqlite-checkpoint", daemon=True)
            self._checkpointer.start()
            self._pages = PageReader(self.path, self.synchronous)

    def _checkpoint_loop(self) -> None:
        conn = sqlite_upkeep.connect(self.path, self.synchronous)
        try:
            sqlite_upkeep.checkpoint_until(conn, self._closing)
        finally:
            conn.close()

    async def close(self) -> None:
        self._closing.set()
        if self._checkpointer is not None:
            self._checkpointer.join(timeout=5)
            self._checkpointer = None
        if self._pages is not None:
            self._pages.close()
            self._pages = None
        if self._db is not None:
            with contextlib.suppress(sqlite3.Error):
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            self._db.close()
            self._db = None

    @property
    def db(self) -> sqlite3.Connection:
        if self._db is None:
            raise StoreError("the SQLite store is not open (call open() first)")
        return self._db

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction; IMMEDIATE takes the write lock up front (no upgrade race).
        The in-process write gate comes first: a purge batch in flight is waited for and
        handed over at once, instead of by SQLite's busy handler, which sleeps in steps of
        up to tens of milliseconds (an event-loop stall)."""
        db = self.db
        with self._write_gate:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
                db.execute("COMMIT")
            except BaseException:
                # A failed COMMIT (a full disk, an I/O error) can leave the transaction open:
                # every later BEGIN would fail for good. SQLite may have rolled back already.
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise

    # -- submit ----------------------------------------------------------------------------

    async def submit(self, spec: TaskSpec) -> tuple[Task, bool]:
        return (await self.submit_many([spec]))[0]

    async def submit_many(self, specs: Sequence[TaskSpec]) -> list[tuple[Task, bool]]:
        # Submits made side by side share one transaction (store/group_commit.py).
        return await self.submit_groups.submit(specs) if specs else []

    async def _submit_now(self, specs: Sequence[TaskSpec]) -> list[tuple[Task, bool]]:
        out: list[tuple[Task, bool]] = []
        with self._tx() as db:
            for spec in specs:
                task = sqlite_submit.known(db, spec)
                if task is not None:
                    out.append((task, False))
                    continue
                self._maybe_queued.add((spec.preset, spec.lane))
                out.append((sqlite_submit.insert(db, spec), True))
        for task, created in out:
            if created:
                self._queued[(task.preset, task.lane)] += 1
                self.notifier.notify(task.id, task)
        return out

    async def task_for_key(self, key: str) -> Task | None:
        row = self.db.execute("SELECT task_id FROM idempotency WHERE key=?", (key,)).fetchone()
        return self._get(row[0]) if row else None

    # -- reads -----------------------------------------------------------------------------

    def _get(self, task_id: str) -> Task | None:
        row = self.db.execute(f"SELECT {COLUMNS} FROM tasks WHERE id=?", (task_id,)).fetchone()
        return row_to_task(row) if row else None

    async def get(self, task_id: str) -> Task | None:
        return self._get(task_id)

    async def get_many(self, ids: Sequence[str]) -> list[Task | None]:
        return sqlite_submit.get_many(self.db, ids)

    async def list_tasks(self, state: TaskState | None = None, preset: str | None = None,
                         limit: int = 50, cursor: str | None = None
                         ) -> tuple[list[Task], str | None]:
        if self._pages is None:  # in memory: no second connection sees it
            return read_page(self.db, state, preset, limit, cursor)
        return await self._pages.page(state, preset, limit, cursor)

    async def queue_heads(self, lanes: Iterable[tuple[str, str]]) -> list[QueueHead]:
        heads = []
        for preset, lane in lanes:
            if (preset, lane) not in self._maybe_queued:
                continue
            row = self.db.execute(
                "SELECT priority, seq, id FROM tasks WHERE state='queued' AND preset=? "
                "AND lane=? ORDER BY priority DESC, seq LIMIT 1", (preset, lane)).fetchone()
            if row:
                heads.append(QueueHead(preset, lane, row[0], row[1], row[2]))
            else:
                self._maybe_queued.discard((preset, lane))
        return heads

    async def age_queued(self, step_s: float, at: float | None = None) -> int:
        """Lift each queued task's effective priority by 1 per ``step_s`` it has waited (up
        to 100), so background work is never starved for ever; returns rows changed."""
        at = now() if at is None else at
        with self._tx() as db:
            cur = db.execute(
                "UPDATE tasks SET priority = MIN(100, base_priority + "
                "CAST((? - created_at) / ? AS INTEGER)) WHERE state='queued' AND priority < "
                "MIN(100, base_priority + CAST((? - created_at) / ? AS INTEGER))",
                (at, step_s, at, step_s))
        return cur.rowcount

    async def queued_count(self) -> int:
        return sum(self._queued.values())

    async def queue_stats(self) -> Mapping[str, QueueStats]:
        return sqlite_lanes.queue_stats(self._queued, self._claimed)

    async def queued(self, preset: str, lane: str, limit: int) -> list[QueuedTask]:
        return sqlite_lanes.queued(self.db, preset, lane, limit)

    async def lane_stats(self) -> Mapping[tuple[str, str], LaneStats]:
        return sqlite_lanes.lane_stats(self.db, self._queued)

    # -- claim, events, finish ---------------------------------------------------------------

    async def claim(self, preset: str, lane: str, limit: int, node: str,
                    device: str) -> list[Task]:
        started = now()
        with self._tx() as db:
            # One statement moves the whole batch; RETURNING hands back the rows as updated.
            rows = db.execute(
                f"UPDATE tasks SET state='running', attempts=attempts+1, token=token+1, "
                f"started_at=?, heartbeat_at=?, node=?, "
                f"device=?, event_seq=event_seq+1 WHERE seq IN (SELECT seq FROM tasks WHERE "
                f"state='queued' AND preset=? AND lane=? ORDER BY priority DESC, seq LIMIT ?) "
                f"RETURNING {COLUMNS}, event_seq, priority",
                (started, started, node, device, preset, lane, limit)).fetchall()
            # RETURNING follows no order: put the batch back in queue order.
            rows.sort(key=lambda r: (-r[-1], r[0]))
            tasks = [row_to_task(r[:-2]) for r in rows]
            db.executemany(
                INSERT_EVENT,
                [(t.id, r[-2], "state", dumps({
                    "state": "running", "attempt": t.attempts, "node": node, "device": device,
                    "fallback_reason": t.fallback_reason}), started)
                 for t, r in zip(tasks, rows, strict=True)])
        if tasks:
            self._queued[(preset, lane)] -= len(tasks)
            self._claimed[preset] += len(tasks)
        for t in tasks:
            self.notifier.notify(t.id, t)
        return tasks

    def _append(self, task_id: str, events: Sequence[NewEvent]) -> tuple[list[Event], bool]:
        """Number and insert events; returns them, and whether the task is final."""
        if not events:
            return [], False
        row = self.db.execute(
            "UPDATE tasks SET event_seq=event_seq+? WHERE id=? RETURNING event_seq, state",
            (len(events), task_id)).fetchone()
        if row is None:
            raise StoreError(f"no task {task_id!r} to append events to")
        first = row[0] - len(events) + 1
        ts = now()
        out = [Event(task_id, first + i, e.type, e.data, ts) for i, e in enumerate(events)]
        self.db.executemany(
            INSERT_EVENT,
            [(e.task_id, e.seq, e.type, dumps(e.data), e.ts) for e in out])
        return out, TaskState(row[1]).final

    async def append_events(self, task_id: str, events: Sequence[NewEvent]) -> list[Event]:
        with self._tx():
            out, final = self._append(task_id, events)
        if out:
            self.notifier.notify(task_id)
            if final:  # a late event of an attempt that ended (cancelled, reaped): no entry
                self.notifier.forget(task_id)
        return out

    def follow(self, task_id: str, after: int, quiet_s: float) -> AsyncIterator[list[Event]]:
        return follow_by_notifier(self, task_id, after, quiet_s)

    async def events(self, task_id: str, after: int = 0, limit: int = 1000) -> list[Event]:
        rows = self.db.execute(
            "SELECT seq, type, data, ts FROM events WHERE task_id=? AND seq>? "
            "ORDER BY seq LIMIT ?", (task_id, after, limit)).fetchall()
        return [Event(task_id, r[0], r[1], orjson.loads(r[2]), r[3]) for r in rows]

    def _check_token(self, task_id: str, token: int) -> None:
        row = self.db.execute("SELECT state, token FROM tasks WHERE id=?",
                              (task_id,)).fetchone()
        if row is None:
            raise StoreError(f"no task {task_id!r}")
        if row[0] != TaskState.RUNNING.value or row[1] != token:
            raise StaleTokenError(
                f"task {task_id} token {token} is stale: the task is {row[0]} with token "
                f"{row[1]}")

    async def finish(self, task_id: str, token: int, state: TaskState, output: Any = None,
                     error: dict[str, Any] | None = None,
                     events: Sequence[NewEvent] = ()) -> Task:
        return await finish_one(self, task_id, token, state, output, error, events)

    async def finish_many(self, items: Sequence[Finish]) -> list[Task | StaleTokenError]:
        for item in items:
            if not item.state.final:
                raise StoreError(f"finish() needs a final state, not {item.state.value}")
        out: list[Task | StaleTokenError] = []
        finished = now()
        rows: list[tuple[Any, ...]] = []
        with self._tx() as db:
            for item in items:
                events = [*item.events, NewEvent("state", {"state": item.state.value,
                                                            "error": item.error})]
                # The fencing check is the UPDATE's own WHERE: a stale attempt changes nothing.
                row = db.execute(
                    f"UPDATE tasks SET state=?, output=?, error=?, finished_at=?, "
                    f"event_seq=event_seq+? WHERE id=? AND state='running' AND token=? "
                    f"RETURNING {COLUMNS}, event_seq",
                    (item.state.value, dumps(item.output),
                     dumps(item.error) if item.error else None, finished, len(events),
                     item.task_id, item.token)).fetchone()
                if row is None:
                    out.append(self._stale(item.task_id, item.token))
                    continue
                first = row[-1] - len(events) + 1
                rows.extend((item.task_id, first + i, e.type, dumps(e.data), finished)
                            for i, e in enumerate(events))
                out.append(row_to_task(row[:-1]))
            db.executemany(INSERT_EVENT, rows)
        for got in out:
            if isinstance(got, Task):
                self.notifier.notify(got.id, got)
        return out

    def _stale(self, task_id: str, token: int) -> StaleTokenError:
        """Why a finish changed nothing: the task moved on, or there is no such task."""
        try:
            self._check_token(task_id, token)
        except StaleTokenError as exc:
            return exc
        except StoreError as exc:  # no such task: no attempt of it can be current
            return StaleTokenError(str(exc))
        return StaleTokenError(f"task {task_id} token {token} is stale")

    async def requeue(self, task_id: str, token: int, error: dict[str, Any] | None,
                      events: Sequence[NewEvent] = (), *, spent: bool = True,
                      lane: str | None = None, fallback_reason: str | None = None) -> Task:
        with self._tx() as db:
            self._check_token(task_id, token)
            self._append(task_id, [*events, requeued_event(error, lane, fallback_reason)])
            db.execute("UPDATE tasks SET state='queued', error=?, node=NULL, device=NULL, "
                       "heartbeat_at=NULL, attempts=attempts-?, lane=COALESCE(?, lane), "
                       "fallback_reason=COALESCE(?, fallback_reason) WHERE id=?",
                       (dumps(error) if error else None, 0 if spent else 1, lane,
                        fallback_reason, task_id))
            task = self._get(task_id)
        return self._queued_again(task)

    async def move_queued(self, task_ids: Sequence[str], lane: str, reason: str,
                          events: Sequence[NewEvent] = ()) -> list[Task]:
        with self._tx():
            moved = sqlite_lanes.move(self.db, task_ids, lane, reason, events)
        for old, task in moved:  # counted and announced once committed
            self._queued[(task.preset, old)] -= 1
            self._queued[(task.preset, lane)] += 1
            self._maybe_queued.add((task.preset, lane))
            self.notifier.notify(task.id, task)
        return [task for _, task in moved]

    def _queued_again(self, task: Task | None) -> Task:
        """A task just put back in its queue (committed): count it, wake its waiters."""
        assert task is not None
        self._maybe_queued.add((task.preset, task.lane))
        self._queued[(task.preset, task.lane)] += 1
        self.notifier.notify(task.id, task)
        return task

    async def cancel_queued(self, task_id: str) -> Task | None:
        with self._tx() as db:
            row = db.execute("SELECT state FROM tasks WHERE id=?", (task_id,)).fetchone()
            if row is None or row[0] != TaskState.QUEUED.value:
                return None
            error = task_error(ErrorKind.CANCELLED, "cancelled by request")
            self._append(task_id, [NewEvent("state", {"state": "cancelled", "error": error})])
            db.execute("UPDATE tasks SET state='cancelled', error=?, finished_at=? WHERE id=?",
                       (dumps(error), now(), task_id))
            task = self._get(task_id)
        assert task is not None
        self._queued[(task.preset, task.lane)] -= 1
        self.notifier.notify(task_id, task)
        return task

    async def retry_failed(self, task_id: str) -> Task | None:
        with self._tx() as db:
            row = db.execute("SELECT state FROM tasks WHERE id=?", (task_id,)).fetchone()
            if row is None or row[0] not in (TaskState.FAILED.value, TaskState.CANCELLED.value):
                return None
            self._append(task_id, [NewEvent("state", {"state": "queued",
                                                      "reason": f"retried after {row[0]}"})])
            # A fresh start: attempts back to 0 (the token keeps rising: a late finish of an
            # old attempt stays stale), and no outcome.
            db.execute("UPDATE tasks SET state='queued', attempts=0, output=NULL, error=NULL, "
                       "node=NULL, device=NULL, started_at=NULL, finished_at=NULL, "
                       "heartbeat_at=NULL WHERE id=?", (task_id,))
            task = self._get(task_id)
        return self._queued_again(task)

    async def heartbeat(self, node: str, held: Sequence[tuple[str, int]]
                        ) -> list[tuple[str, int]]:
        if not held:
            return []
        at = now()
        lost = []
        with self._tx() as db:
            for tid, token in held:
                if db.execute("UPDATE tasks SET heartbeat_at=? WHERE id=? AND token=? AND "
                              "state='running' AND node=?", (at, tid, token, node)
                              ).rowcount == 0:
                    lost.append((tid, token))
        return lost

    async def reap(self, stale_before: float,
                   max_attempts: Mapping[str, int] | None = None) -> list[Task]:
        return await self._take_back(sqlite_takeback.stale(self.db, stale_before),
                                     max_attempts or {})

    async def reap_node(self, node: str, max_attempts: Mapping[str, int] | None = None
                        ) -> list[Task]:
        return await self._take_back(sqlite_takeback.of_node(self.db, node), max_attempts or {})

    async def _take_back(self, rows: list[sqlite_takeback.Row],
                         limits: Mapping[str, int]) -> list[Task]:
        """Requeue (or fail, past max_attempts) each running attempt, spent."""
        out: list[Task] = []
        for tid, token, attempts, preset, error in rows:
            # Each one fenced by its token: one that moved on since the read is left alone.
            if attempts >= limits.get(preset, attempts + 1):
                got = await self.finish_many([Finish(tid, token, TaskState.FAILED,
                                                     error=error)])
                out.extend(t for t in got if isinstance(t, Task))
            else:
                with contextlib.suppress(StaleTokenError):
                    out.append(await self.requeue(tid, token, error))
        return out

    async def running_nodes(self) -> set[str]:
        return {r[0] for r in self.db.execute(
            "SELECT DISTINCT node FROM tasks WHERE state='running' AND node IS NOT NULL")}

    async def purge(self, finished_before: float, max_batches: int | None = None
                    ) -> PurgeReport:
        if self.path == ":memory:":  # no second connection can see it: purge in place
            return sqlite_upkeep.purge(self.db, finished_before, max_batches=max_batches,
                                       gate=self._write_gate)
        return await asyncio.to_thread(self._purge_in_thread, finished_before, max_batches)

    def _purge_in_thread(self, finished_before: float, max_batches: int | None) -> PurgeReport:
        conn = sqlite_upkeep.connect(self.path, self.synchronous)
        try:
            return sqlite_upkeep.purge(conn, finished_before, stop=self._closing,
                                       max_batches=max_batches, gate=self._write_gate)
        finally:
            conn.close()

    async def recover(self, node: str) -> int:
        with self._tx() as db:
            rows = db.execute(
                "SELECT id, preset, lane FROM tasks WHERE state='running' AND node=?",
                (node,)).fetchall()
            for tid, _, _ in rows:
                self._append(tid, [NewEvent("state", {"state": "queued",
                                                      "reason": "node restarted"})])
            # A restart is not the task's fault: the attempt is given back (the token stays).
            db.execute("UPDATE tasks SET state='queued', node=NULL, device=NULL, "
                       "heartbeat_at=NULL, attempts=MAX(0, attempts-1) "
                       "WHERE state='running' AND node=?", (node,))
        for tid, preset, lane in rows:
            self._maybe_queued.add((preset, lane))
            self._queued[(preset, lane)] += 1
            self.notifier.notify(tid)
        return len(rows)


def _nothing() -> None:
    """``on_work`` of a store no other process writes."""
