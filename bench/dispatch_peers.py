"""The peers of bench/dispatch.py: Celery, Huey and Dramatiq, each on a private redis-server.

Each is started the way its own docs say (the app modules bench/celery_app.py, huey_app.py and
dramatiq_app.py hold the one no-op task and their settings), warmed, and measured with the
methods of bench/dispatch_methods.py through the calls its users make:

=========  ==========================  ===============================================
peer       A (submit, then wait)       B and T (one blocking call)
=========  ==========================  ===============================================
celery     ``delay`` / ``.get()``      ``apply_async((0,)).get()``
huey       ``sleep(0)`` / ``.get()``   ``sleep(0).get(blocking=True)``
dramatiq   ``send`` / ``get_result``   ``send(0).get_result(block=True)``
=========  ==========================  ===============================================

Server-side CPU is its worker processes (the consumer's process tree) and its redis-server.
"""

from __future__ import annotations

import importlib
import os
import sys
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

from bench._util import Proc, Procs, child_env, free_port, start_proc, wait_until
from bench.dispatch_methods import (
    EXPECTED_OUTPUT,
    ServerCpu,
    check_outputs,
    measured,
    method_a,
    method_b,
    method_t,
)

READY_TIMEOUT_S = 60.0
"""How long a redis-server or a peer's workers may take to answer after their start."""
RESULT_TIMEOUT_S = 120.0
"""The longest a peer's result is awaited before the method fails."""
WARM_TASKS = 200
"""Tasks run once before measuring, so every worker process has run some."""


def start_redis(procs: Procs, log_dir: Path, name: str) -> tuple[Proc, str]:
    """A private redis-server (no persistence) on a free port; its URL once it answers."""
    import redis

    port = free_port()
    proc = procs.add(start_proc(
        name, ["redis-server", "--port", str(port), "--bind", "127.0.0.1",
               "--save", "", "--appendonly", "no"], log_dir=log_dir))
    url = f"redis://127.0.0.1:{port}/0"

    def pong() -> bool:
        with redis.Redis.from_url(url, socket_timeout=1) as r:
            return bool(r.ping())

    wait_until(pong, timeout=READY_TIMEOUT_S, what=f"{name} PING", proc=proc)
    return proc, url


def import_app(module: str, redis_url: str) -> ModuleType:
    """Import a peer's app module with ``BENCH_REDIS_URL`` pointing at its private Redis
    (again in a later round: each round's Redis is a new one)."""
    os.environ["BENCH_REDIS_URL"] = redis_url
    mod = importlib.import_module(module)
    if redis_url != mod.REDIS_URL:
        mod = importlib.reload(mod)
    if redis_url != mod.REDIS_URL:
        raise RuntimeError(f"{module} was imported before BENCH_REDIS_URL was set")
    return mod


class Peer(ABC):
    """One peer system: started, then driven through plain callables."""

    name: str
    setup: str
    """How its server side runs, in words (for the JSON)."""
    methods: dict[str, str]
    """What each method calls, in words (for the JSON)."""

    def __init__(self) -> None:
        self.workers: Proc | None = None
        self.redis: Proc | None = None

    @property
    @abstractmethod
    def version(self) -> str: ...

    @abstractmethod
    def start(self, procs: Procs, log_dir: Path) -> None:
        """Start redis and the workers; return once a task round trip succeeds."""

    @abstractmethod
    def submit(self) -> Any:
        """Submit one no-op task; a handle for :meth:`wait`."""

    @abstractmethod
    def wait(self, handle: Any) -> Any:
        """The output of a submitted task, waiting for it."""

    def call(self) -> Any:
        """One blocking submit-and-wait (thread-safe); the output."""
        return self.wait(self.submit())

    def extras(self, n: int) -> dict[str, Callable[[], dict[str, Any]]]:
        """Further throughput methods this peer's users have (Celery's group)."""
        return {}

    @abstractmethod
    def close(self) -> None:
        """Release client-side resources before the servers stop."""

    def cpu(self) -> ServerCpu:
        assert self.workers is not None and self.redis is not None
        return ServerCpu.of_trees({"workers": self.workers.pid, "redis": self.redis.pid})


class CeleryPeer(Peer):
    name = "celery"
    setup = ("redis-server (broker + result backend, no persistence), celery worker "
             "--pool prefork --concurrency 2")
    methods = {"A": "sleep.delay(0) x N, then AsyncResult.get() on each in order",
               "B": "sleep.apply_async((0,)).get()",
               "T": "sleep.apply_async((0,)).get() from each thread",
               "group": "group(sleep.s(0) x N).apply_async().get() (Redis native join)"}

    @property
    def version(self) -> str:
        import celery
        return str(celery.__version__)

    def start(self, procs: Procs, log_dir: Path) -> None:
        self.redis, url = start_redis(procs, log_dir, "celery-redis")
        self.workers = procs.add(start_proc(
            "celery-worker",
            [sys.executable, "-m", "celery", "-A", "bench.celery_app", "worker", "--pool",
             "prefork", "--concurrency", "2", "--loglevel", "warning"],
            log_dir=log_dir, env=child_env(BENCH_REDIS_URL=url)))
        self.app = import_app("bench.celery_app", url)
        wait_until(lambda: self.app.app.control.ping(timeout=0.5) or None,
                   timeout=READY_TIMEOUT_S, what="a Celery worker to answer ping", interval=0.1,
                   proc=self.workers)

    def submit(self) -> Any:
        return self.app.sleep.delay(0)

    def wait(self, handle: Any) -> Any:
        return handle.get(timeout=RESULT_TIMEOUT_S)

    def extras(self, n: int) -> dict[str, Callable[[], dict[str, Any]]]:
        def group() -> dict[str, Any]:
            import time

            from celery import group as celery_group
            t0 = time.perf_counter()
            outputs = celery_group(self.app.sleep.s(0) for _ in range(n)).apply_async().get(
                timeout=RESULT_TIMEOUT_S)
            elapsed = time.perf_counter() - t0
            return {"elapsed_s": elapsed, "tasks_per_s": n / elapsed,
                    "check": check_outputs(outputs, n)}
        return {"group": group}

    def close(self) -> None:
        self.app.app.close()


class HueyPeer(Peer):
    name = "huey"
    setup = ("redis-server (queue + results, no persistence), huey_consumer "
             "bench.huey_app.huey -w 2 -k process; RedisHuey(results=True, notify_result=True)")
    methods = {"A": "sleep(0) x N (enqueue), then Result.get(blocking=True) on each in order",
               "B": "sleep(0).get(blocking=True)",
               "T": "sleep(0).get(blocking=True) from each thread"}

    @property
    def version(self) -> str:
        import huey
        return str(huey.__version__)

    def start(self, procs: Procs, log_dir: Path) -> None:
        self.redis, url = start_redis(procs, log_dir, "huey-redis")
        exe = Path(sys.executable).with_name("huey_consumer")
        self.workers = procs.add(start_proc(
            "huey-consumer", [str(exe), "bench.huey_app.huey", "-w", "2", "-k", "process"],
            log_dir=log_dir, env=child_env(BENCH_REDIS_URL=url)))
        self.app = import_app("bench.huey_app", url)
        wait_until(lambda: self.app.sleep(0).get(blocking=True, timeout=1) == EXPECTED_OUTPUT,
                   timeout=READY_TIMEOUT_S, what="the Huey consumer to run a task",
                   proc=self.workers)

    def submit(self) -> Any:
        return self.app.sleep(0)

    def wait(self, handle: Any) -> Any:
        return handle.get(blocking=True, timeout=RESULT_TIMEOUT_S)

    def close(self) -> None:
        self.app.huey.storage.conn.connection_pool.disconnect()


class DramatiqPeer(Peer):
    name = "dramatiq"
    setup = ("redis-server (broker + results, no persistence), dramatiq bench.dramatiq_app "
             "--processes 2 --threads 8; Results middleware on a RedisBackend")
    methods = {"A": "sleep.send(0) x N, then Message.get_result(block=True) on each in order",
               "B": "sleep.send(0).get_result(block=True)",
               "T": "sleep.send(0).get_result(block=True) from each thread"}

    @property
    def version(self) -> str:
        import dramatiq
        return str(dramatiq.__version__)

    def start(self, procs: Procs, log_dir: Path) -> None:
        self.redis, url = start_redis(procs, log_dir, "dramatiq-redis")
        exe = Path(sys.executable).with_name("dramatiq")
        self.workers = procs.add(start_proc(
            "dramatiq-workers",
            [str(exe), "bench.dramatiq_app", "--processes", "2", "--threads", "8"],
            log_dir=log_dir, env=child_env(BENCH_REDIS_URL=url)))
        self.app = import_app("bench.dramatiq_app", url)
        wait_until(lambda: self.app.sleep.send(0).get_result(block=True, timeout=1000)
                   == EXPECTED_OUTPUT, timeout=READY_TIMEOUT_S,
                   what="the Dramatiq workers to run a task", proc=self.workers)

    def submit(self) -> Any:
        return self.app.sleep.send(0)

    def wait(self, handle: Any) -> Any:
        return handle.get_result(block=True, timeout=int(RESULT_TIMEOUT_S * 1000))

    def close(self) -> None:
        self.app.broker.close()


PEERS: dict[str, type[Peer]] = {"celery": CeleryPeer, "huey": HueyPeer,
                                "dramatiq": DramatiqPeer}
"""Every peer, by the name --peers takes."""


def bench_peer(peer: Peer, procs: Procs, log_dir: Path, *, tasks: int, rtt: int,
               warmup: int, threads: int) -> dict[str, Any]:
    """Start ``peer``, warm it, measure A, B, T and its extras; its part of the JSON."""
    peer.start(procs, log_dir)
    print(f"{peer.name} {peer.version}: up; warming up", flush=True)
    for _ in range(warmup):
        peer.call()
    method_a(peer.submit, peer.wait, min(WARM_TASKS, tasks))  # every worker process busy once
    cpu = peer.cpu()
    out: dict[str, Any] = {"version": peer.version, "setup": peer.setup,
                           "methods": peer.methods}
    out["A"] = measured(f"{peer.name} A", lambda: method_a(peer.submit, peer.wait, tasks), cpu,
                        tasks=tasks)
    out["B"] = measured(f"{peer.name} B", lambda: method_b(peer.call, rtt), cpu, tasks=rtt)
    out["T"] = measured(f"{peer.name} T ({threads} threads)",
                        lambda: method_t(peer.call, tasks, threads), cpu, tasks=tasks)
    out["extras"] = {name: measured(f"{peer.name} {name}", fn, cpu, tasks=tasks)
                     for name, fn in peer.extras(tasks).items()}
    peer.close()
    return out
