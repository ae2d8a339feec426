"""A node: one ``gpulane serve`` process wiring store, devices, scheduling and runtime.

Lifecycle: ``start()`` takes the data-dir lock, opens the store, requeues what a previous run
left running, and starts the scheduler; ``stop()`` stops workers (their tasks go back to the
queue) and closes the store. ``drain()`` stops claiming queued work (running work finishes)
and refuses submits until ``resume()``; ``drain(exit=True)`` then waits up to a grace for
running work and asks the process to exit: its stop requeues the rest unspent, ends its leases
and leaves the fleet. ``reload_presets()`` swaps the preset registry. The API layer talks to
the node only through its methods.

In a fleet (nodes on one Redis) a node registers with a heartbeat TTL, reads the others into
``fleet_view`` on each device poll (routing, warm first), and serves other nodes' calls by op
(``calls``: drain, resume, the lease ops), so that any node accepts any request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

from gpulane.config import GPU_LOCK_DIRS, Settings
from gpulane.devices import CpuPool, DeviceProvider, DeviceSnapshot, cpu_pool, select_provider
from gpulane.errors import (
    ConfigError,
    ConflictError,
    NotFoundError,
    PresetError,
    StoreUnavailableError,
    ValidationError,
)
from gpulane.files import Files
from gpulane.fleet import Fleet, NodeInfo
from gpulane.fleet.factory import open_fleet
from gpulane.locks import FileLock, gpu_lock_dir
from gpulane.model import Event, Priority, Task, TaskSpec, TaskState
from gpulane.presets import PresetRegistry, example_presets_dir, load_presets
from gpulane.runtime.supervisor import Supervisor
from gpulane.scheduling.admission import Admission
from gpulane.scheduling.device_health import DeviceHealth
from gpulane.scheduling.drain import Drain
from gpulane.scheduling.fallback import FallbackMover
from gpulane.scheduling.fallbacks import FallbackLog
from gpulane.scheduling.fleet_leases import FleetLeases, Op
from gpulane.scheduling.fleet_view import FleetView, describe_node, nodes_view
from gpulane.scheduling.housekeeping import PURGE_INTERVAL_S, Housekeeper
from gpulane.scheduling.intake import Intake
from gpulane.scheduling.leases import Lease, LeaseManager, LeaseRequest
from gpulane.scheduling.ledger import Ledger
from gpulane.scheduling.metrics import NodeMetrics
from gpulane.scheduling.router import GPU_LANE, route
from gpulane.scheduling.scheduler import CapacityEvents, Scheduler
from gpulane.scheduling.status import status_body
from gpulane.scheduling.targets import device_wish, target_preset, task_spec
from gpulane.scheduling.views import devices_view, fleet_nodes_view, presets_view
from gpulane.store import Store, store_for, wait_final, wait_final_many

log = logging.getLogger("gpulane.node")

DEVICE_POLL_S = 2.0
"""How often device readings (measured free VRAM, utilisation) are refreshed; queue drain
rates are read as often."""


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
        self.store: Store = store_for(settings)  # the online lane too (store/tiered.py)
        self.fleet: Fleet = open_fleet(settings.store_url, self.name)
        self.gpus: list[DeviceSnapshot] = provider.snapshot()
        self.ledger = Ledger(self.gpus, self.cpu.concurrency)
        # Runtime reports freed capacity; scheduling's handler gives it back to the ledger
        # and wakes whoever waits for it (_on_capacity).
        self.supervisor = Supervisor(
            self.store, self.name, scratch_dir=str(settings.data_dir / "scratch"),
            stderr_tail_lines=settings.worker_stderr_lines,
            shutdown_grace_s=settings.worker_stop_grace_s,
            listener=CapacityEvents(self.ledger, self._on_capacity,
                                    lambda reason, p, n: self.fallbacks.record(reason, p, n)))
        self.files = Files.from_settings(settings)  # allowed roots and uploads (files.py)
        self.supervisor.worker_env.update(self.files.worker_env())
        self.housekeeper = Housekeeper(
            self.store, self.name, held=self.supervisor.held_runs,
            max_attempts=lambda: {p.name: p.max_attempts for p in self.registry.values()},
            retain_s=settings.retain, claim_ttl_s=settings.claim_ttl_s,
            scratch_dir=settings.data_dir / "scratch", on_reaped=lambda: self.scheduler.wake(),
            # A short retention (a test, a soak) is purged within about half of it.
            purge_every_s=min(PURGE_INTERVAL_S, settings.retain / 2),
            on_lost=self.supervisor.abandon_lost, fleet=self.fleet, node_info=self.node_info,
            node_ttl_s=settings.node_ttl_s,
            on_node_dead=lambda name: self.fleet_leases.on_node_dead(name))
        self.housekeeper.purge_uploads = self.files.purge
        self.scheduler = Scheduler(self.store, self.registry, self.ledger, self.supervisor,
                                   self.name)
        self.leases = LeaseManager(self.ledger, on_change=self.scheduler.wake,
                                   preempt_worker=self.supervisor.preempt)
        self.scheduler.reserved = self.leases.reserved_devices
        self.scheduler.ageing_s = settings.ageing_s
        self.scheduler.preemption.grace_s = settings.task_preempt_grace_s
        self.scheduler.preemption.on_release = lambda: self._on_capacity()
        self._lock = FileLock(settings.data_dir / "node.lock", f"data dir {settings.data_dir}")
        self._locked = False
        self._gpu_locks: list[FileLock] = []
        self._poller: asyncio.Task[None] | None = None
        self.started = False
        self.admission = Admission(settings.max_queued)
        self.fallbacks = FallbackLog()  # every fallback this node decided, for the status view
        self.drains = Drain(self.name, self.scheduler, self.supervisor, settings.drain_grace_s,
                            fleet=self.fleet, status=self.status_view)
        self.fleet_view = FleetView(self.fleet, self.name)
        # GPU tasks that leave for the CPU, and a lost GPU's work: fallback.py, device_health.py
        self.movers = FallbackMover(
            self.store, lambda: self.registry, self.supervisor, self.ledger,
            record=self.fallbacks.record, on_moved=self.scheduler.wake,
            elsewhere=lambda: any(self.fleet_view.gpu_totals()))
        self.movers.paused = lambda: self.scheduler.paused
        self.health = DeviceHealth(self.ledger, self.supervisor, self.leases, self._on_capacity)
        self.intake = Intake(
            self.name, self.store, self.admission, lambda: self.registry,
            lambda: self.drains.draining and not self.fleet_view.others_take_work())
        self._reloading = asyncio.Lock()
        self.fleet_leases = FleetLeases(self.leases, self.fleet, self.name)
        self.fleet_leases.draining = lambda: self.draining
        self.scheduler.warm_elsewhere = self.fleet_view.warm_elsewhere
        self.scheduler.scaling.elsewhere = self.fleet_view.serving_elsewhere
        self.scheduler.warm_window_s = settings.warm_window_s
        self.calls: dict[str, Op] = {"drain": self.drains.call_drain,  # and the lease ops
                                     "resume": self.drains.call_resume, **self.fleet_leases.ops()}
        self.started_at = time.time()
        self.metrics = NodeMetrics(self)  # GET /metrics; times the store's calls from here on

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
            await self.fleet.open()
        except BaseException:
            with contextlib.suppress(Exception):
                await self.store.close()
            self._unlock()
            raise
        self.fleet.serve(self._serve_call)
        self.store.on_work = self.scheduler.wake
        self.started_at = time.time()
        await self.housekeeper.announce()  # registered before it claims (housekeeping.py)
        with contextlib.suppress(StoreUnavailableError):  # read again on each device poll
            await self.fleet_view.refresh()
        if recovered:
            log.info("requeued %d task(s) left running by a previous run of node %s",
                     recovered, self.name)
        log.info("devices: %s; CPU pool: %d slot(s)", self.provider_reason,
                 self.cpu.concurrency)
        log.info("presets: %s", ", ".join(self.registry.names()) or "(none)")
        self.supervisor.start_reaper()
        self.scheduler.start()
        self.movers.start()
        await self.fleet_leases.start()
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
        await self.drains.close()
        await self.scheduler.stop()
        await self.movers.stop()
        if self.drains.exiting:  # a drain to exit hands its leases back; a restart keeps them
            with contextlib.suppress(StoreUnavailableError):
                await self.fleet_leases.release_all("node_drained")
        await self.fleet_leases.stop()
        await self.supervisor.stop_all()
        # After the runtime: the node leaves the fleet once nothing it runs can be taken over.
        await self.housekeeper.stop()
        await self.fleet.close()
        await self.store.close()
        self.provider.close()
        self._unlock()

    def _unlock(self) -> None:
        if self._locked:
            for lock in self._gpu_locks:
                lock.release()
            self._lock.release()
            self._locked = False

    @property
    def draining(self) -> bool:
        return self.drains.draining

    def _on_capacity(self) -> None:
        self.scheduler.capacity_changed()  # first: room freed for an immediate task is kept
        self.scheduler.wake()
        self.movers.wake()
        self.drains.capacity_changed()
        self.leases.grant()

    async def _poll_devices(self) -> None:
        while True:
            await asyncio.sleep(DEVICE_POLL_S)
            with contextlib.suppress(Exception):
                self.admission.observe(await self.store.queue_stats())
            with contextlib.suppress(Exception):
                await self.check_devices()
            with contextlib.suppress(Exception):  # an unreachable store: the last reading
                await self.fleet_view.refresh()

    async def check_devices(self) -> None:
        """Read the devices now: the ledger and their health (a GPU lost or back) take it in."""
        snaps = await asyncio.to_thread(self.provider.snapshot)
        self.gpus = snaps
        self.ledger.observe(snaps)
        self.health.observe(snaps)

    # -- tasks -------------------------------------------------------------------------------

    def build_spec(self, *, preset: str | None, input: Any, device: str = "auto",
                   priority: int = Priority.NORMAL, timeout_s: float | None = None,
                   content_type: str | None = None, idempotency_key: str | None = None,
                   where: str = "", submitted_by: str | None = None,
                   fallback: bool | None = None, resolved: Any = None) -> TaskSpec:
        """One well-formed submit checked against what only the node knows: the registry and
        its routes, what a preset accepts, the router (scheduling/targets.py). ``resolved``:
        the input with its files resolved (api/task_inputs.py does it off the event loop)."""
        if resolved is None:
            resolved = self.files.resolve_input(input, where, submitted_by)
        found = target_preset(self.registry, preset, content_type, where)
        wish = device_wish(found, device, fallback)
        gpu_circuit = self.supervisor.circuits.get((found.name, GPU_LANE))
        elsewhere = self.fleet_view.gpu_totals()
        r = route(found, wish, self.ledger.gpu_totals_mb(), elsewhere,
                  gpu_unavailable=gpu_circuit is not None and gpu_circuit.is_open(),
                  devices_lost=self.ledger.all_lost and not any(elsewhere))
        return task_spec(found, wish, r, input, resolved, priority=priority,
                         timeout_s=timeout_s, content_type=content_type,
                         idempotency_key=idempotency_key, submitted_by=submitted_by)

    async def submit(self, spec: TaskSpec) -> tuple[Task, bool]:
        """Queue a task, or answer the one its idempotency key made; UnavailableError (503)
        while draining, TooManyRequestsError (429) when its preset's queue is full."""
        await self.intake.admit([spec], bulk=False)
        task, created = await self.store.submit(spec)
        if created:
            self.scheduler.wake()
            self.movers.wake()
            self.fallbacks.submitted([spec])
        return task, created

    async def submit_many(self, specs: list[TaskSpec]) -> list[tuple[Task, bool]]:
        """Queue many tasks in one transaction, all or none: refused whole (503, 429) when
        the new ones among them would not all be taken."""
        await self.intake.admit(specs, bulk=True)
        out = await self.store.submit_many(specs)
        self.scheduler.wake()
        self.movers.wake()
        self.fallbacks.submitted([s for s, (_t, created) in zip(specs, out, strict=True)
                                  if created])
        return out

    async def get(self, task_id: str) -> Task:
        return await self.wait(task_id, 0.0)

    async def wait(self, task_id: str, wait_s: float) -> Task:
        task = await wait_final(self.store, task_id, wait_s)
        if task is None:
            raise NotFoundError("unknown_task", f"no task with id {task_id!r}", field="id")
        return task

    async def wait_many(self, ids: Sequence[str], wait_s: float, every: bool = False
                        ) -> list[Task | None]:
        return await wait_final_many(self.store, ids, wait_s, every=every)

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
            refusal = await self.intake.queue_refusal([found.preset], bulk=False)
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

    def drain(self, *, exit: bool = False, grace_s: float | None = None) -> None:
        """Stop claiming work and refuse submits (503); with ``exit``, then exit (drain.py)."""
        self.drains.start(exit=exit, grace_s=grace_s)

    def resume(self) -> None:
        """Take and start tasks again after ``drain()`` (ConflictError once it exits)."""
        self.drains.resume()

    async def _serve_call(self, op: str, payload: dict[str, Any]) -> dict[str, Any]:
        """A call from another node (fleet.serve): dispatched by op to ``calls``."""
        handler = self.calls.get(op)
        if handler is None:
            raise ValidationError("unknown_op", f"node {self.name} serves no op {op!r}: use "
                                  f"one of {sorted(self.calls)}", field="op")
        return await handler(payload)

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
    # Served by FleetLeases: this node's LeaseManager for leases on its GPUs, the lease's own
    # node (a fleet call) for the others. Answers are the API's views, the token only in the
    # acquire's.

    async def acquire_lease(self, *, holder: str, vram_mb: int, gpus: int, device: int | None,
                            priority: int, ttl_s: float, preemptible: bool, grace_s: float,
                            wait_s: float, owner: str | None = None,
                            node: str | None = None) -> dict[str, Any]:
        """Grant a lease on this node's GPUs, or on ``node``'s (or on the live node that can
        serve it when this one cannot), now or within ``wait_s`` (LeaseTimeout after);
        refuse one no node can serve. The lease with its token."""
        req = LeaseRequest(holder, vram_mb, gpus, device, priority, ttl_s, preemptible, grace_s,
                           owner)
        return await self.fleet_leases.acquire(req, wait_s, node)

    async def lease(self, lease_id: str) -> dict[str, Any]:
        """A lease of any node (NotFoundError when unknown)."""
        return await self.fleet_leases.get(lease_id)

    def active_leases(self) -> list[Lease]:
        """This node's waiting and held leases."""
        return self.leases.active()

    async def fleet_active_leases(self) -> list[dict[str, Any]]:
        """Waiting and held leases of every node."""
        return await self.fleet_leases.active()

    async def renew_lease(self, lease_id: str, token: int) -> dict[str, Any]:
        return await self.fleet_leases.renew(lease_id, token)

    async def release_lease(self, lease_id: str, token: int) -> dict[str, Any]:
        return await self.fleet_leases.release(lease_id, token)

    def follow_lease(self, lease_id: str, after: int, quiet_s: float
                     ) -> AsyncIterator[list[dict[str, Any]]]:
        """The lease's events after number ``after`` in batches, an empty batch after
        ``quiet_s`` without one; ends once the lease is final (a preempted holder's stream
        stays open until its ``resume``)."""
        return self.fleet_leases.follow(lease_id, after, quiet_s)

    # -- views -------------------------------------------------------------------------------

    def presets_view(self) -> list[dict[str, Any]]:
        """Every preset with its circuit; ``env`` values hidden (any key reads this)."""
        return presets_view(self.registry, self.supervisor.circuits)

    def gpus_view(self) -> dict[str, Any]:
        return {"node": self.name, "provider": self.provider.name,
                "simulated": self.provider.simulated, "reason": self.provider_reason,
                "devices": devices_view(self.gpus, self.ledger),
                "cpu": {**self.cpu.to_json(), "in_use": self.ledger.cpu_used}}

    async def fleet_gpus_view(self) -> dict[str, Any]:
        """``GET /v1/gpus``: this node's view (its keys unchanged) plus ``nodes``: every live
        node's devices, CPU pool and what it runs."""
        return {**self.gpus_view(), "nodes": fleet_nodes_view(await self.live_nodes())}

    async def live_nodes(self) -> list[NodeInfo]:
        """Every live node of the fleet, this one as it stands now first; ``GET /v1/nodes``
        shows them with their heartbeat's age (fleet_view.nodes_view)."""
        others = [n for n in await self.fleet_view.refresh() if n.name != self.name]
        return [self.node_info(), *others]

    async def nodes_view(self) -> list[dict[str, Any]]:
        return nodes_view(await self.live_nodes())

    def node_info(self) -> NodeInfo:
        """This node as the fleet's registry holds it (its heartbeat writes this)."""
        return describe_node(self.name, self.settings.node_url, self.started_at,
                             draining=self.draining,
                             gpus=self.gpus, ledger=self.ledger, cpu=self.cpu.to_json(),
                             supervisor=self.supervisor, simulated=self.provider.simulated)

    def workers_view(self) -> list[dict[str, Any]]:
        return [w.to_json() for w in self.supervisor.workers.values()]

    async def status_view(self) -> dict[str, Any]:
        """The node at a glance: queues, workers, devices, fallbacks (scheduling/status.py)."""
        return await status_body(self, {"leases": self.leases.table_size(),
                                        "task_notifier": len(self.store.notifier)})
