"""The online lane: a Store that keeps ``durable: false`` tasks in memory, the rest on disk.

``open_store`` builds it over the SQLite store, so the node, the scheduler and the runtime
see one Store. Each submit goes by its spec's ``durable``: a durable one to the durable store
as always, an online one to the memory tier (``memory.py``), unless the tier holds
``max_tasks`` already (then to the durable store: nothing is refused). Every later call goes
to whichever tier holds the task's id; queue heads, counters and stats are the two merged.
Both tiers wake one notifier, so result waits and event streams follow a task across a spill.

An online task leaves memory for the durable store (a spill, ``adopt``) when:
- it fails: a dead letter is kept like any other, to be read and retried;
- it is still queued or running ``spill_after_s`` after its submit: from then it lives there
  (its finish, fenced by the same token, lands there; the reaper covers it);
- the store closes (a drain, SIGTERM): every task still in memory, results included.
What a crash (kill -9) loses is what is in memory then: docs/reliability.md, "The online
lane". Reaping, recovery, retention and ageing are the durable store's alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from gpulane.errors import StaleTokenError
from gpulane.model import Event, Task, TaskSpec, TaskState
from gpulane.store.base import (
    Finish,
    LaneStats,
    NewEvent,
    PurgeReport,
    QueuedTask,
    QueueHead,
    QueueStats,
    Store,
    finish_one,
    follow_by_notifier,
)
from gpulane.store.memory import Held, MemoryStore

log = logging.getLogger("gpulane.store")

UPKEEP_MAX_S = 0.25
"""Longest between two spill rounds: a task passes its window by at most this much."""
SPILL_BATCH = 500
"""Most tasks one spill transaction writes (about 20 ms of SQLite on the event loop); a
backlog that outlived the window together is written in several, the loop served between."""


@dataclass(frozen=True, slots=True)
class OnlineLimits:
    """The online lane's settings (config.py documents each)."""

    spill_after_s: float
    keep_s: float
    max_tasks: int


class TieredStore:
    """A durable Store with the online lane's memory tier in front of it."""

    def __init__(self, durable: Store, adopt: Callable[[Sequence[Held]], None],
                 limits: OnlineLimits, memory: MemoryStore | None = None) -> None:
        self.durable = durable
        self.memory = memory if memory is not None else MemoryStore()
        self.notifier = durable.notifier
        self.memory.notifier = self.notifier  # one notifier: waits follow a task across tiers
        self.limits = limits
        self._adopt = adopt
        self._upkeep: asyncio.Task[None] | None = None
        self.spilled = {"failed": 0, "window": 0, "close": 0}
        """Online tasks written to the durable store since open, by why."""

    @property
    def on_work(self) -> Callable[[], None]:
        return self.durable.on_work

    @on_work.setter
    def on_work(self, fn: Callable[[], None]) -> None:
        self.durable.on_work = fn

    # -- lifecycle -------------------------------------------------------------------------

    async def open(self) -> None:
        await self.durable.open()
        self._upkeep = asyncio.create_task(self._upkeep_loop(), name="gpulane-online-spill")

    async def close(self) -> None:
        if self._upkeep is not None:
            self._upkeep.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._upkeep
            self._upkeep = None
        # A clean stop loses nothing: what memory holds goes to disk, results included.
        ids = self.memory.ids()
        try:
            self._spill(ids, "close")
        except Exception:  # the store still closes; say what a failed last write lost
            log.exception("online lane: writing %d in-memory task(s) to the durable store at "
                          "close failed; they are lost", len(ids))
        await self.durable.close()

    async def _upkeep_loop(self) -> None:
        every = min(self.limits.spill_after_s / 4, UPKEEP_MAX_S)
        while True:
            await asyncio.sleep(every)
            try:
                more = self.upkeep()
                while more:  # a big backlog: the loop serves others between the batches
                    await asyncio.sleep(0)
                    more = self.upkeep()
            except Exception:  # a full disk, say: the tasks stay in memory, tried next round
                log.exception("online lane: spilling to the durable store failed")

    def upkeep(self) -> bool:
        """One step: spill up to SPILL_BATCH tasks that outlived the window, forget results
        past their keep. True when more are due (call again)."""
        clock = self.memory.clock()
        due = self.memory.due(clock - self.limits.spill_after_s, SPILL_BATCH)
        try:
            self._spill(due, "window")
        except BaseException:
            self.memory.not_yet(due)
            raise
        self.memory.evict(clock - self.limits.keep_s)
        return len(due) == SPILL_BATCH

    def _spill(self, task_ids: Sequence[str], why: str) -> None:
        """Write these memory tasks to the durable store, then drop them from memory: in
        that order, so a failed write leaves them where they were."""
        if not task_ids:
            return
        held = [self.memory.held(tid) for tid in task_ids]
        self._adopt(held)
        for tid in task_ids:
            self.memory.take(tid)
        self.spilled[why] += len(task_ids)

    # -- submit ----------------------------------------------------------------------------

    async def submit(self, spec: TaskSpec) -> tuple[Task, bool]:
        return (await self.submit_many([spec]))[0]

    async def submit_many(self, specs: Sequence[TaskSpec]) -> list[tuple[Task, bool]]:
        # First every check (keys of either tier, within the batch too), then the durable
        # write, then the memory adds: a refused batch leaves nothing behind.
        memory = self.memory
        room = self.limits.max_tasks - len(memory)
        tier: list[Task | bool] = []  # a known task, True: memory, False: durable
        batch_keys: dict[str, bool] = {}  # a key seen earlier in the batch: its tier
        for spec in specs:
            known = memory.known(spec)
            if known is not None:
                tier.append(known)
                continue
            key = spec.idempotency_key
            if key is not None and key in batch_keys:
                tier.append(batch_keys[key])  # that tier answers the repeat with its task
                continue
            online = not spec.durable and room > 0
            if online and key is not None and await self.durable.task_for_key(key):
                online = False  # spilled, or made durable: the durable store answers
            if key is not None:
                batch_keys[key] = online
            room -= online
            tier.append(online)
        durable_specs = [s for s, t in zip(specs, tier, strict=True) if t is False]
        stored = iter(await self.durable.submit_many(durable_specs) if durable_specs else [])
        out: list[tuple[Task, bool]] = []
        for spec, t in zip(specs, tier, strict=True):
            if isinstance(t, Task):
                out.append((t, False))
            elif t is False:
                out.append(next(stored))
            else:
                again = memory.known(spec)  # the same key twice in one batch
                out.append((again, False) if again is not None else (memory.add(spec), True))
        return out

    async def task_for_key(self, key: str) -> Task | None:
        return self.memory.task_for_key(key) or await self.durable.task_for_key(key)

    # -- reads -----------------------------------------------------------------------------

    async def get(self, task_id: str) -> Task | None:
        task = self.memory.get(task_id)
        return task if task is not None else await self.durable.get(task_id)

    async def get_many(self, ids: Sequence[str]) -> list[Task | None]:
        """Each id's task (None when unknown), in the order asked: memory's from memory,
        the rest in one read of the durable store."""
        out = [self.memory.get(tid) for tid in ids]
        rest = [tid for tid, t in zip(ids, out, strict=True) if t is None]
        if rest:
            found = iter(await self.durable.get_many(rest))
            out = [next(found) if t is None else t for t in out]
        return out

    async def list_tasks(self, state: TaskState | None = None, preset: str | None = None,
                         limit: int = 50, cursor: str | None = None
                         ) -> tuple[list[Task], str | None]:
        # The durable store's listing: an online task is listed once it is written there
        # (docs/reliability.md); GET by id reads either tier.
        return await self.durable.list_tasks(state, preset, limit, cursor)

    async def queue_heads(self, lanes: Iterable[tuple[str, str]]) -> list[QueueHead]:
        lanes = list(lanes)
        best = {(h.preset, h.lane): h for h in await self.durable.queue_heads(lanes)}
        for h in self.memory.queue_heads(lanes):
            other = best.get((h.preset, h.lane))
            if other is None or (h.priority, other.task_id) > (other.priority, h.task_id):
                best[(h.preset, h.lane)] = h
        return list(best.values())

    async def queued_count(self) -> int:
        return await self.durable.queued_count() + self.memory.queued_count()

    async def queue_stats(self) -> Mapping[str, QueueStats]:
        stats = dict(await self.durable.queue_stats())
        queued, claimed = self.memory.lane_counts()
        for preset in {p for p, _ in queued} | set(claimed):
            lanes = {lane: n for (p, lane), n in queued.items() if p == preset and n > 0}
            have = stats.get(preset, QueueStats(0, 0))
            merged = dict(have.lanes)
            for lane, n in lanes.items():
                merged[lane] = merged.get(lane, 0) + n
            stats[preset] = QueueStats(have.queued + sum(lanes.values()),
                                       have.claimed_total + claimed.get(preset, 0), merged)
        return stats

    async def age_queued(self, step_s: float, at: float | None = None) -> int:
        # An online task is queued for less than the window; ageing is for the durable one.
        return await self.durable.age_queued(step_s, at)

    async def queued(self, preset: str, lane: str, limit: int) -> list[QueuedTask]:
        mine = self.memory.queued(preset, lane, limit)
        theirs = await self.durable.queued(preset, lane, limit)
        if not mine:
            return theirs
        # By age across the tiers (a task's priority is not in QueuedTask; both tiers list
        # theirs in claim order already, and a spilled task is older than any in memory).
        return [*theirs, *mine][:limit]

    async def lane_stats(self) -> Mapping[tuple[str, str], LaneStats]:
        stats = dict(await self.durable.lane_stats())
        for lane, mine in self.memory.lane_stats().items():
            have = stats.get(lane)
            if have is None:
                stats[lane] = mine
                continue
            ages = [a for a in (have.oldest_queued_at, mine.oldest_queued_at) if a is not None]
            stats[lane] = LaneStats(have.queued + mine.queued, have.running + mine.running,
                                    min(ages) if ages else None)
        return stats

    # -- claim, events, finish ---------------------------------------------------------------

    async def claim(self, preset: str, lane: str, limit: int, node: str,
                    device: str) -> list[Task]:
        if not self.memory.queue_heads([(preset, lane)]):
            return await self.durable.claim(preset, lane, limit, node, device)
        # Both tiers may hold this queue: memory's tasks that rank before the durable head
        # first, then the durable ones, then memory's again if there is room left.
        heads = await self.durable.queue_heads([(preset, lane)])
        ahead = (heads[0].priority, heads[0].task_id) if heads else None
        got = self.memory.claim(preset, lane, limit, node, device, ahead_of=ahead)
        if heads and len(got) < limit:
            got += await self.durable.claim(preset, lane, limit - len(got), node, device)
        if len(got) < limit:
            got += self.memory.claim(preset, lane, limit - len(got), node, device)
        return got

    async def append_events(self, task_id: str, events: Sequence[NewEvent]) -> list[Event]:
        if task_id in self.memory:
            return self.memory.append_events(task_id, events)
        return await self.durable.append_events(task_id, events)

    async def events(self, task_id: str, after: int = 0, limit: int = 1000) -> list[Event]:
        if task_id in self.memory:
            return self.memory.events(task_id, after, limit)
        return await self.durable.events(task_id, after, limit)

    def follow(self, task_id: str, after: int, quiet_s: float) -> AsyncIterator[list[Event]]:
        return follow_by_notifier(self, task_id, after, quiet_s)

    async def finish(self, task_id: str, token: int, state: TaskState, output: Any = None,
                     error: dict[str, Any] | None = None,
                     events: Sequence[NewEvent] = ()) -> Task:
        return await finish_one(self, task_id, token, state, output, error, events)

    async def finish_many(self, items: Sequence[Finish]) -> list[Task | StaleTokenError]:
        out: list[Task | StaleTokenError | None] = []
        durable: list[Finish] = []
        failed: list[str] = []
        for item in items:
            if item.task_id not in self.memory:
                durable.append(item)
                out.append(None)
                continue
            try:
                task = self.memory.finish(item)
            except StaleTokenError as exc:
                out.append(exc)
                continue
            out.append(task)
            if task.state is TaskState.FAILED:
                failed.append(task.id)
        if failed:  # a dead letter is kept on disk, to be read and retried
            try:
                self._spill(failed, "failed")
            except Exception:
                log.exception("online lane: writing %d failed tasks to the store failed; "
                              "they stay in memory", len(failed))
        if durable:
            got = iter(await self.durable.finish_many(durable))
            out = [next(got) if o is None else o for o in out]
        return [o for o in out if o is not None]

    async def requeue(self, task_id: str, token: int, error: dict[str, Any] | None,
                      events: Sequence[NewEvent] = (), *, spent: bool = True,
                      lane: str | None = None, fallback_reason: str | None = None) -> Task:
        if task_id in self.memory:
            return self.memory.requeue(task_id, token, error, events, spent=spent, lane=lane,
                                       fallback_reason=fallback_reason)
        return await self.durable.requeue(task_id, token, error, events, spent=spent,
                                          lane=lane, fallback_reason=fallback_reason)

    async def move_queued(self, task_ids: Sequence[str], lane: str, reason: str,
                          events: Sequence[NewEvent] = ()) -> list[Task]:
        mine = [t for t in task_ids if t in self.memory]
        if not mine:
            return await self.durable.move_queued(task_ids, lane, reason, events)
        moved = {t.id: t for t in self.memory.move_queued(mine, lane, reason, events)}
        rest = [t for t in task_ids if t not in moved and t not in mine]
        if rest:
            moved.update((t.id, t) for t in await self.durable.move_queued(rest, lane, reason,
                                                                           events))
        return [moved[t] for t in dict.fromkeys(task_ids) if t in moved]

    async def cancel_queued(self, task_id: str) -> Task | None:
        if task_id in self.memory:
            return self.memory.cancel_queued(task_id)
        return await self.durable.cancel_queued(task_id)

    async def retry_failed(self, task_id: str) -> Task | None:
        if task_id in self.memory:
            return self.memory.retry_cancelled(task_id)
        return await self.durable.retry_failed(task_id)

    # -- ownership and upkeep: the durable store's ------------------------------------------

    async def heartbeat(self, node: str, held: Sequence[tuple[str, int]]
                        ) -> list[tuple[str, int]]:
        mine = [h for h in held if h[0] in self.memory]
        if not mine:
            return await self.durable.heartbeat(node, held)
        rest = [h for h in held if h[0] not in self.memory]
        lost = self.memory.heartbeat(node, mine)
        return lost + (await self.durable.heartbeat(node, rest) if rest else [])

    async def reap(self, stale_before: float,
                   max_attempts: Mapping[str, int] | None = None) -> list[Task]:
        return await self.durable.reap(stale_before, max_attempts)

    async def reap_node(self, node: str, max_attempts: Mapping[str, int] | None = None
                        ) -> list[Task]:
        return await self.durable.reap_node(node, max_attempts)

    async def purge(self, finished_before: float, max_batches: int | None = None
                    ) -> PurgeReport:
        return await self.durable.purge(finished_before, max_batches)

    async def recover(self, node: str) -> int:
        return await self.durable.recover(node)

    async def running_nodes(self) -> set[str]:
        return await self.durable.running_nodes() | self.memory.running_nodes()
