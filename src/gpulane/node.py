"""A node: one ``gpulane serve`` process wiring store, devices, scheduling and runtime.

Lifecycle: ``start()`` takes the data-dir lock, opens the store, requeues what a previous run
left running, and starts the scheduler; ``stop()`` stops workers (their tasks go back to the
queue) and closes the store. ``drain()`` stops claiming queued work (running work finishes)
and refuses submits until ``resume()``; ``reload_presets()`` swaps the preset registry. The
API layer talks to the node only through its methods.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

from gpulane.config import (
    GPU_LOCK_DIRS,
    Settings,
)
from gpulane.devices import CpuPool, DeviceProvider, DeviceSnapshot, cpu_pool, select_provider
from gpulane.errors import (
    ConfigError,
    ConflictError,
    NotFoundError,
    PresetError,
    RequestError,
    UnavailableError,
    ValidationError,
)
from gpulane.locks import FileLock, gpu_lock_dir
from gpulane.model import DeviceWish, Event, Priority, Task, TaskSpec, TaskState
from gpulane.presets import PresetRegistry, example_presets_dir, load_presets
from gpulane.runtime.circuit import PresetCircuit
from gpulane.runtime.supervisor import Supervisor
from gpulane.scheduling.admission import Admission
from gpulane.scheduling.housekeeping import PURGE_INTERVAL_S, Housekeeper
from gpulane.scheduling.leases import Lease, LeaseManager, LeaseRequest
from gpulane.scheduling.ledger import Ledger
from gpulane.scheduling.router import route
from gpulane.scheduling.scheduler import CapacityEvents, Scheduler
from gpulane.store import Store, open_store, wait_final
from gpulane.store.base import body_hash

log = logging.getLogger("gpulane.node")

DEVICE_POLL_S = 2.0
"""How often device readings (measured free VRAM, utilisation) are refreshed; queue drain
rates are read as often."""
DRAINING_RETRY_S = 30
"""Retry-After of a submit refused while the node drains: a restart or a resume is usually
a matter of tens of seconds."""
ENV_HIDDEN = "(hidden)"
"""What the presets view shows for the value of each of a preset's ``env`` variables."""


class Node:
    """Everything one host runs, behind a small async API."""

    def __init__(self, settings: Settings, registry: PresetRegistry | None = None,
                 provider: DeviceProvider | None = None) -> None:
        self.settings = settings
        self.name = settings.node
        self.registry = registry if registry is not None else self._load_registry(settings)
        if provider is None:
            try:
                provider, reason = select_provider(settings.simulate_gpus)
            except ValueError as exc:
                raise ConfigError(f"simulate_gpus: {exc}") from None
        else:
            reason = f"using provider {provider.name}"
        self.provider = provider
        self.provider_reason = reason
        self.cpu: CpuPool = cpu_pool(settings.cpu_concurrency)
        self.store: Store = open_store(settings.store_url, settings.sqlite_synchronous)
        self.gpus: list[DeviceSnapshot] = provider.snapshot()
        self.ledger = Ledger(self.gpus, self.cpu.concurrency)
        # Runtime reports freed capacity; scheduling's handler gives it back to the ledger
        # and wakes whoever waits for it (_on_capacity).
        self.supervisor = Supervisor(
            self.store, self.name, scratch_dir=str(settings.data_dir / "scratch"),
            stderr_tail_lines=settings.worker_stderr_lines,
            shutdown_grace_s=settings.worker_stop_grace_s,
            listener=CapacityEvents(self.ledger, self._on_capacity))
        self.housekeeper = Housekeeper(
            self.store, self.name, held=self.supervisor.held_runs,
            max_attempts=lambda: {p.name: p.max_attempts for p in self.registry.values()},
            retain_s=settings.retain, claim_ttl_s=settings.claim_ttl_s,
            scratch_dir=settings.data_dir / "scratch", on_reaped=lambda: self.scheduler.wake(),
            # A short retention (a test, a soak) is purged within about half of it.
            purge_every_s=min(PURGE_INTERVAL_S, settings.retain / 2),
            on_lost=self.supervisor.abandon_lost)
        self.scheduler = Scheduler(self.store, self.registry, self.ledger, self.supervisor,
                                   self.name)
        self.leases = LeaseManager(self.ledger, on_change=self.scheduler.wake,
                                   preempt_worker=self.supervisor.preempt)
        self.scheduler.reserved = self.leases.reserved_devices
        self.scheduler.ageing_s = settings.ageing_s
        self._lock = FileLock(settings.data_dir / "node.lock", f"data dir {settings.data_dir}")
        self._locked = False
        self._gpu_locks: list[FileLock] = []
        self._poller: asyncio.Task[None] | None = None
        self.started = False
        self.admission = Admission(settings.max_queued)
        self.draining = False
        self._reloading = asyncio.Lock()

    @staticmethod
    def _load_registry(settings: Settings) -> PresetRegistry:
        paths: list[str] = []
        if settings.examples or not settings.presets:
            paths.append(str(example_presets_dir()))
        paths.extend(settings.presets)
        return load_presets(paths)

    # -- lifecycle ---------------------------------------------------------------------------

    def lock(self) -> None:
        """Become the one owner of the data dir and of every real GPU; ConfigError names the
        pid that owns it. Simulated GPUs are private to their node and take no lock."""
        if self._locked:
            return
        self._lock.acquire()
        self._gpu_locks = []
        try:
            if not self.provider.simulated and self.gpus:
                lock_dir = gpu_lock_dir(self.settings.gpu_lock_dir, GPU_LOCK_DIRS,
                                        self.settings.data_dir)
                for snap in self.gpus:
                    lock = FileLock(lock_dir / f"{snap.uuid}.lock",
                                    f"GPU {snap.index} ({snap.uuid})")
                    lock.acquire()
                    self._gpu_locks.append(lock)
        except BaseException:
            for lock in self._gpu_locks:
                lock.release()
            self._lock.release()
            raise
        self._locked = True

    async def start(self) -> None:
        self.lock()
        try:
            await self.store.open()
            recovered = await self.store.recover(self.name)
        except BaseException:
            self._unlock()
            raise
        if recovered:
            log.info("requeued %d task(s) left running by a previous run of node %s",
                     recovered, self.name)
        log.info("devices: %s; CPU pool: %d slot(s)", self.provider_reason,
                 self.cpu.concurrency)
        log.info("presets: %s", ", ".join(self.registry.names()) or "(none)")
        self.supervisor.start_reaper()
        self.scheduler.start()
        self.leases.start()
        self.housekeeper.start()
        self._poller = asyncio.create_task(self._poll_devices(), name="gpulane-devices")
        self.started = True
        self.scheduler.wake()

    async def stop(self) -> None:
        if not self.started:
            return
        self.started = False
        if self._poller is not None:
            self._poller.cancel()
        await self.scheduler.stop()
        await self.housekeeper.stop()
        await self.leases.stop()
        await self.supervisor.stop_all()
        await self.store.close()
        self.provider.close()
        self._unlock()

    def _unlock(self) -> None:
        if self._locked:
            for lock in self._gpu_locks:
                lock.release()
            self._lock.release()
            self._locked = False

    def _on_capacity(self) -> None:
        self.scheduler.wake()
        self.leases.grant()

    async def _poll_devices(self) -> None:
        while True:
            await asyncio.sleep(DEVICE_POLL_S)
            with contextlib.suppress(Exception):
                self.admission.observe(await self.store.queue_stats())
            with contextlib.suppress(Exception):
                snaps = await asyncio.to_thread(self.provider.snapshot)
                self.gpus = snaps
                self.ledger.observe(snaps)

    # -- tasks -------------------------------------------------------------------------------

    def build_spec(self, *, preset: str, input: Any, device: str = "auto",
                   priority: int = Priority.NORMAL, timeout_s: float | None = None,
                   content_type: str | None = None, idempotency_key: str | None = None,
                   where: str = "", submitted_by: str | None = None) -> TaskSpec:
        """One well-formed submit (the API's request model checked each field) checked
        against what only the node knows: the registry, what a preset accepts, the router."""
        found = self.registry.get(preset)
        if found is None:
            raise NotFoundError(
                "unknown_preset", f"{where}preset {preset!r} is not known here: use one "
                f"of {self.registry.names()} (GET /v1/presets lists them)",
                field=f"{where}preset")
        if content_type is not None and content_type not in found.accepts:
            raise ValidationError(
                "unsupported_content_type", f"{where}content_type={content_type!r} is not "
                f"accepted by preset {found.name!r}: use one of {list(found.accepts)}",
                field=f"{where}content_type")
        wish = DeviceWish(device)
        r = route(found, wish, self.ledger.gpu_totals_mb())
        return TaskSpec(
            preset=found.name, input=input, device_wish=wish, priority=priority,
            timeout_s=float(timeout_s) if timeout_s is not None else None,
            content_type=content_type, idempotency_key=idempotency_key,
            body_hash=body_hash({"preset": found.name, "input": input,
                                 "device": wish.value, "priority": priority,
                                 "timeout_s": timeout_s, "content_type": content_type})
            if idempotency_key else None, lane=r.lane,
            fallback_reason=r.fallback_reason, submitted_by=submitted_by)

    async def submit(self, spec: TaskSpec) -> tuple[Task, bool]:
        """Queue a task, or answer the one its idempotency key made; UnavailableError (503)
        while draining, TooManyRequestsError (429) when its preset's queue is full."""
        await self._admit([spec], bulk=False)
        task, created = await self.store.submit(spec)
        if created:
            self.scheduler.wake()
        return task, created

    async def submit_many(self, specs: list[TaskSpec]) -> list[tuple[Task, bool]]:
        """Queue many tasks in one transaction, all or none: refused whole (503, 429) when
        the new ones among them would not all be taken."""
        await self._admit(specs, bulk=True)
        out = await self.store.submit_many(specs)
        self.scheduler.wake()
        return out

    async def _admit(self, specs: list[TaskSpec], *, bulk: bool) -> None:
        """Refuse new tasks while draining (503) or past a queue limit (429). A repeated
        keyed submit was taken before: it still gets its task (the store answers it)."""
        refusal = await self._refusal(specs, bulk)
        if refusal is None:
            return
        fresh = [s for s in specs if s.idempotency_key is None
                 or await self.store.task_for_key(s.idempotency_key) is None]
        if len(fresh) < len(specs):
            refusal = await self._refusal(fresh, bulk) if fresh else None
        if refusal is not None:
            raise refusal

    async def _refusal(self, specs: list[TaskSpec], bulk: bool) -> RequestError | None:
        if self.draining:
            return UnavailableError(
                "draining", f"node {self.name} is draining and takes no new tasks: retry "
                f"after {DRAINING_RETRY_S} s or send them to another node",
                headers={"Retry-After": str(DRAINING_RETRY_S)})
        return await self._queue_refusal([s.preset for s in specs], bulk)

    async def _queue_refusal(self, presets: list[str], bulk: bool) -> RequestError | None:
        """The refusal (422, 429) for queueing one task of each of ``presets``, or None."""
        stats = await self.store.queue_stats()
        self.admission.observe(stats)
        adding: dict[str, tuple[int, str]] = {}
        for i, name in enumerate(presets):
            n, where = adding.get(name, (0, f"tasks[{i}]." if bulk else ""))
            adding[name] = (n + 1, where)
        for preset, (n, where) in adding.items():
            found = self.registry.get(preset)
            limit = self.admission.limit(found.max_queued if found else None)
            if n > limit:
                # Never fits, however long the caller waits: not a 429 to come back after.
                return ValidationError(
                    "exceeds_max_queued", f"this request adds {n} tasks of preset {preset!r}, "
                    f"more than its max_queued of {limit} can ever hold: send at most {limit} "
                    "at once, or raise max_queued", field=f"{where}preset",
                    extra={"adding": n, "max_queued": limit})
            refusal = self.admission.refusal(preset, found.max_queued if found else None,
                                             stats[preset].queued if preset in stats else 0,
                                             n, where)
            if refusal is not None:
                return refusal
        return None

    async def get(self, task_id: str) -> Task:
        task = await self.store.get(task_id)
        if task is None:
            raise NotFoundError("unknown_task", f"no task with id {task_id!r}", field="id")
        return task

    async def wait(self, task_id: str, wait_s: float) -> Task:
        task = await wait_final(self.store, task_id, wait_s)
        if task is None:
            raise NotFoundError("unknown_task", f"no task with id {task_id!r}", field="id")
        return task

    async def list_tasks(self, state: TaskState | None, preset: str | None, limit: int,
                         cursor: str | None) -> tuple[list[Task], str | None]:
        """A page of tasks, newest first, and the cursor of the next page."""
        return await self.store.list_tasks(state, preset, limit, cursor)

    async def queued_count(self) -> int:
        return await self.store.queued_count()

    async def follow(self, task_id: str, after: int, quiet_s: float
                     ) -> AsyncIterator[list[Event]]:
        """The task's events after number ``after``, in batches as they land; an empty batch
        after ``quiet_s`` without one. Ends after the task's final state event."""
        async for batch in self.store.follow(task_id, after, quiet_s):
            yield batch

    async def retry(self, task_id: str) -> Task:
        """Put a dead letter (a failed or cancelled task) back in the queue with fresh
        attempts; ConflictError (409) for a task in another state. Held against the queue
        limit like a submit (429 queue_full): else submit, cancel and retry would fill a
        queue past it. While draining it is taken, and waits in the queue."""
        found = await self.get(task_id)  # 404 when unknown
        if found.state in (TaskState.FAILED, TaskState.CANCELLED):
            refusal = await self._queue_refusal([found.preset], bulk=False)
            if refusal is not None:
                raise refusal
        task = await self.store.retry_failed(task_id)
        if task is None:
            found = await self.get(task_id)  # its state now
            raise ConflictError(
                "not_retryable", f"task {task_id} is {found.state.value}: only a failed or "
                "cancelled task can be retried (submit a new one instead)", field="id",
                extra={"state": found.state.value})
        self.scheduler.wake()
        return task

    async def cancel(self, task_id: str) -> Task:
        task = await self.get(task_id)
        if task.state.final:
            return task
        cancelled = await self.store.cancel_queued(task_id)
        if cancelled is not None:
            return cancelled
        await self.supervisor.cancel(task_id)
        return await self.get(task_id)

    # -- admin -------------------------------------------------------------------------------

    def drain(self) -> None:
        """Stop claiming queued work (running batches finish) and refuse submits (503)."""
        self.draining = True
        self.scheduler.paused = True
        log.info("draining: no new tasks are taken or started")

    def resume(self) -> None:
        """Take and start tasks again after ``drain()``."""
        self.draining = False
        self.scheduler.paused = False
        self.scheduler.wake()
        log.info("resumed after a drain")

    async def reload_presets(self) -> dict[str, list[str]]:
        """Read the preset files again and swap the registry; PresetError lists every
        problem and leaves the old one in place. Workers of a changed or removed preset are
        retired after their current batch; the answer names what was added, changed,
        removed and retired."""
        async with self._reloading:
            try:
                fresh = await asyncio.to_thread(self._load_registry, self.settings)
            except PresetError as exc:
                raise ValidationError(
                    "invalid_presets", f"{len(exc.problems)} problem(s) in the preset files; "
                    "the presets in use are unchanged: fix each one listed in problems and "
                    "reload again", field="presets", extra={"problems": exc.problems}) from None
            old = self.registry
            changed = sorted(n for n in fresh.names()
                             if n in old.names() and fresh[n] != old[n])
            removed = sorted(n for n in old.names() if fresh.get(n) is None)
            self.registry = self.scheduler.registry = fresh
            retired = []
            for worker in list(self.supervisor.workers.values()):
                if worker.alive and worker.preset_name in (*changed, *removed):
                    self.supervisor.preempt(worker.id, worker.preset.timeout_s)
                    retired.append(worker.id)
            self.scheduler.wake()
            log.info("presets reloaded: %s", ", ".join(fresh.names()) or "(none)")
            return {"added": sorted(n for n in fresh.names() if n not in old.names()),
                    "changed": changed, "removed": removed, "retired_workers": sorted(retired)}

    # -- leases ------------------------------------------------------------------------------

    async def acquire_lease(self, *, holder: str, vram_mb: int, gpus: int, device: int | None,
                            priority: int, ttl_s: float, preemptible: bool, grace_s: float,
                            wait_s: float, owner: str | None = None) -> Lease:
        """Grant a lease now or within ``wait_s`` (LeaseTimeout after); refuse one this node
        cannot serve (an unknown device, more than its GPUs hold)."""
        req = LeaseRequest(holder, vram_mb, gpus, device, priority, ttl_s, preemptible, grace_s,
                           owner)
        self.leases.check(req)
        return await self.leases.acquire(req, wait_s)

    def lease(self, lease_id: str) -> Lease:
        return self.leases.get(lease_id)

    def active_leases(self) -> list[Lease]:
        return self.leases.active()

    def renew_lease(self, lease_id: str, token: int) -> Lease:
        return self.leases.renew(lease_id, token)

    def release_lease(self, lease_id: str, token: int) -> Lease:
        return self.leases.release(lease_id, token)

    async def follow_lease(self, lease_id: str, after: int, quiet_s: float
                           ) -> AsyncIterator[list[dict[str, Any]]]:
        """The lease's events after number ``after`` in batches, an empty batch after
        ``quiet_s`` without one; ends once the lease is final (a preempted holder's stream
        stays open until its ``resume``)."""
        leases = self.leases
        while True:
            seen = leases.notifier.version(lease_id)
            lease = leases.get(lease_id)
            fresh = lease.events[after:]
            if fresh:
                after = fresh[-1]["id"]
                yield fresh
            if lease.state.final and after >= len(lease.events) and not lease.awaiting_resume:
                return
            if not await leases.notifier.wait(lease_id, seen, quiet_s):
                yield []

    # -- views -------------------------------------------------------------------------------

    def presets_view(self) -> list[dict[str, Any]]:
        """Every preset with the state of its circuit (closed when it never tripped). Its
        ``env`` shows names only: a worker's credentials live there, and any key may read
        this view."""
        circuits = self.supervisor.circuits
        return [{**p.to_json(), "env": dict.fromkeys(p.env, ENV_HIDDEN),
                 "circuit": (circuits.get(p.name) or PresetCircuit()).to_json()}
                for p in self.registry.values()]

    def gpus_view(self) -> dict[str, Any]:
        devices = []
        for snap in self.gpus:
            acct = self.ledger.gpus.get(snap.index)
            d = snap.to_json()
            if acct is not None:
                d["declared_vram_mb"] = acct.declared_mb
                d["schedulable_free_vram_mb"] = acct.free_mb
                d["holders"] = [{"holder": h.holder, "vram_mb": h.vram_mb}
                                for h in acct.holdings.values()]
            devices.append(d)
        return {"node": self.name, "provider": self.provider.name,
                "simulated": self.provider.simulated, "reason": self.provider_reason,
                "devices": devices,
                "cpu": {**self.cpu.to_json(), "in_use": self.ledger.cpu_used}}

    def workers_view(self) -> list[dict[str, Any]]:
        return [w.to_json() for w in self.supervisor.workers.values()]

    async def status_view(self) -> dict[str, Any]:
        """The node at a glance: draining or not, each preset's queue against its limit and
        how fast it drains, and the housekeeping of its store."""
        stats = await self.store.queue_stats()
        self.admission.observe(stats)
        queues = {p.name: self.admission.view(
            p.name, p.max_queued, stats[p.name].queued if p.name in stats else 0)
            for p in self.registry.values()}
        return {"node": self.name, "started": self.started, "draining": self.draining,
                "queued": sum(q["queued"] for q in queues.values()), "presets": queues,
                "housekeeping": self.housekeeping_view(),
                # In-memory tables that must return to their idle size (nothing grows unbounded).
                "tables": {"leases": self.leases.table_size(),
                           "task_notifier": len(self.store.notifier)}}

    def housekeeping_view(self) -> dict[str, Any]:
        """Retention (last purge, purged counts, database size), heartbeats and the reaper,
        as the housekeeper reports them."""
        return self.housekeeper.view()
