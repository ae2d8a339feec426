"""The single-call methods of bench/dispatch.py, the same code for every system measured.

* A: ``n`` submits one call at a time, then every result awaited in submission order.
* B: sequential submit-and-wait round trips, each timed.
* T: ``threads`` threads sharing ``n`` blocking submit-and-wait calls.

A system hands in plain callables (submit one, wait for one, or one blocking call); what they
return is the task's output, compared with the no-op's. Around each method the server side's
CPU is read from /proc (:class:`ServerCpu`): gpulane's node alone and its workers apart, a
peer's worker processes and its redis-server.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from bench._util import CpuMeter, latency_summary, proc_cpu_s, tree_pids

H = TypeVar("H")

EXPECTED_OUTPUT = {"slept_ms": 0}
"""What the no-op ``sleep(ms=0)`` returns on every system."""
NOISY_CORES = 0.1
"""CPU used by processes outside the benchmark, in cores, above which a figure is flagged."""


class ServerCpu:
    """CPU seconds of named groups of server processes, read from /proc around a method.

    Each group is a callable giving its pids when read (a server's process tree can change
    between methods: a worker restarted, a pool process replaced)."""

    def __init__(self, groups: dict[str, Callable[[], Sequence[int]]]) -> None:
        self.groups = groups

    @classmethod
    def of_trees(cls, roots: dict[str, int]) -> ServerCpu:
        """One group per process tree (a server and what it forked)."""
        return cls({name: (lambda pid=pid: tree_pids(pid)) for name, pid in roots.items()})

    def read(self) -> dict[str, tuple[list[int], float]]:
        out = {}
        for name, pids_of in self.groups.items():
            pids = list(pids_of())
            out[name] = (pids, proc_cpu_s(pids))
        return out

    def since(self, before: dict[str, tuple[list[int], float]]) -> dict[str, float]:
        """CPU seconds per group since ``before``, over the pids seen then (a process that
        started meanwhile is not counted; one that ended counts what it had)."""
        return {name: round(proc_cpu_s(pids) - cpu, 3) for name, (pids, cpu) in before.items()}


def measured(label: str, fn: Callable[[], dict[str, Any]], cpu: ServerCpu | None, *,
             tasks: int, requests: int | None = None) -> dict[str, Any]:
    """Run one method, print its figure, and add the server side's CPU (per group: seconds,
    ms per task and, where the method's HTTP requests are known, ms per request) and the
    machine's noise. A method that fails is recorded with its error, not raised: one peer's
    failure leaves the rest of the run standing."""
    print(f"  {label} ...", end=" ", flush=True)
    meter = CpuMeter()
    before = cpu.read() if cpu else None
    try:
        result = fn()
    except Exception as exc:
        print(f"FAILED: {exc!r}", flush=True)
        return {"error": repr(exc), "noise": meter.stop()}
    if cpu and before is not None:
        used = cpu.since(before)
        result["server_cpu_s"] = used
        result["server_cpu_ms_per_task"] = {k: v / tasks * 1000 for k, v in used.items()}
        if requests:
            result["requests"] = requests
            result["server_cpu_ms_per_request"] = {k: v / requests * 1000
                                                   for k, v in used.items()}
    result["noise"] = noise = meter.stop()
    if "tasks_per_s" in result:
        print(f"{result['tasks_per_s']:,.0f} tasks/s ({result['elapsed_s']:.2f} s)", flush=True)
    else:
        print(f"p50 {result['p50_ms']:.2f} ms, p99 {result['p99_ms']:.2f} ms", flush=True)
    check = result.get("check", {})
    if not check.get("ok", True):
        print(f"    WRONG RESULTS: {check}", flush=True)
    if (noise["other_cores"] or 0) > NOISY_CORES:
        print(f"    note: other processes used {noise['other_cores']:.2f} cores meanwhile; "
              "this figure is noisy", flush=True)
    return result


def check_outputs(outputs: Sequence[Any], n: int) -> dict[str, Any]:
    good = sum(1 for o in outputs if o == EXPECTED_OUTPUT)
    return {"count": len(outputs), "expected": n, "good": good,
            "ok": len(outputs) == n and good == n}


def method_a(submit: Callable[[], H], wait: Callable[[H], Any], n: int) -> dict[str, Any]:
    """``n`` submits, one call each, then each result awaited in submission order."""
    t0 = time.perf_counter()
    handles = [submit() for _ in range(n)]
    t_submitted = time.perf_counter()
    outputs = [wait(h) for h in handles]
    elapsed = time.perf_counter() - t0
    return {"elapsed_s": elapsed, "tasks_per_s": n / elapsed, "submit_s": t_submitted - t0,
            "submits_per_s": n / max(t_submitted - t0, 1e-9),
            "check": check_outputs(outputs, n)}


def method_b(call: Callable[[], Any], n: int) -> dict[str, Any]:
    """``n`` sequential blocking calls, each timed."""
    samples: list[float] = []
    outputs = []
    for _ in range(n):
        t0 = time.perf_counter()
        outputs.append(call())
        samples.append(time.perf_counter() - t0)
    return {**latency_summary(samples), "check": check_outputs(outputs, n)}


def method_t(call: Callable[[], Any], n: int, threads: int) -> dict[str, Any]:
    """``threads`` threads taking ``n`` blocking calls between them; tasks/s from the first
    call to the last answer. The first exception in any thread stops them all and is raised."""
    left = [n]
    lock = threading.Lock()
    outputs: list[Any] = []
    errors: list[BaseException] = []

    def work() -> None:
        while True:
            with lock:
                if left[0] <= 0 or errors:
                    return
                left[0] -= 1
            try:
                out = call()
            except Exception as exc:
                with lock:
                    errors.append(exc)
                return
            with lock:
                outputs.append(out)

    pool = [threading.Thread(target=work, daemon=True) for _ in range(threads)]
    t0 = time.perf_counter()
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    elapsed = time.perf_counter() - t0
    if errors:
        raise errors[0]
    return {"elapsed_s": elapsed, "tasks_per_s": n / elapsed, "threads": threads,
            "check": check_outputs(outputs, n)}
