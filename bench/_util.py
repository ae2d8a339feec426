"""Helpers the benchmarks share: ports, subprocess servers, readiness, statistics, output.

Every server a benchmark starts runs in its own process group (``start_new_session``), so
:meth:`Proc.stop` can end it together with whatever it spawned, and every start is paired with
a stop in a ``finally`` (see :class:`Procs`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

REPO = Path(__file__).resolve().parent.parent
"""The repository root: benchmarks run their subprocesses from here."""


# --- ports and readiness ---------------------------------------------------------------------


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_until(check: Callable[[], T | None], *, timeout: float, what: str,
               interval: float = 0.05, proc: Proc | None = None) -> T:
    """Call ``check`` until it returns something other than None/False, or fail after
    ``timeout`` seconds. Exceptions from ``check`` count as "not yet". When ``proc`` is given
    and it exits first, fail at once with its output tail."""
    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    while True:
        try:
            value = check()
            if value is not None and value is not False:
                return value
        except Exception as exc:  # not up yet
            last_exc = exc
        if proc is not None and proc.popen.poll() is not None:
            raise RuntimeError(f"{proc.name} exited with code {proc.popen.returncode} before "
                               f"{what}; output tail:\n{proc.tail()}")
        if time.monotonic() >= deadline:
            detail = f" (last error: {last_exc!r})" if last_exc else ""
            tail = f"\n{proc.name} output tail:\n{proc.tail()}" if proc is not None else ""
            raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}{detail}{tail}")
        time.sleep(interval)


# --- subprocesses ----------------------------------------------------------------------------


@dataclass
class Proc:
    """A subprocess server in its own process group, its output going to a log file."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    extra_pids: list[tuple[int, str]] = field(default_factory=list)
    """(pid, text its command line contains) of processes it started in process groups of
    their own, which a group kill misses; killed on stop if still alive and still theirs."""

    @property
    def pid(self) -> int:
        return self.popen.pid

    def tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no output)"
        return "\n".join(text.splitlines()[-lines:]) or "(no output)"

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM the group and wait up to ``grace`` s; then SIGKILL the group, and kill any
        ``extra_pids`` still alive."""
        if self.popen.poll() is None:
            _killpg(self.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(grace)
        # The leader may be gone with children of its group left behind: kill the group anyway.
        _killpg(self.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(5)
        for pid, marker in self.extra_pids:
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
            except OSError:
                continue  # gone
            if marker.encode() in cmdline:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)


def _killpg(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def start_proc(name: str, argv: Sequence[str], *, log_dir: Path, env: dict[str, str] | None = None,
               cwd: Path = REPO) -> Proc:
    """Start ``argv`` in a new session (its own process group), stdout+stderr to a log file."""
    log_path = log_dir / f"{name}.log"
    fh = open(log_path, "wb")  # noqa: SIM115 - the child owns it; closed below after fork
    try:
        popen = subprocess.Popen(list(argv), cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                                 stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    finally:
        fh.close()
    return Proc(name, popen, log_path)


class Procs:
    """Stops every registered process, last started first, however the block ends."""

    def __init__(self) -> None:
        self._procs: list[Proc] = []

    def add(self, proc: Proc) -> Proc:
        self._procs.append(proc)
        return proc

    def __enter__(self) -> Procs:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()

    def stop_all(self) -> None:
        while self._procs:
            proc = self._procs.pop()
            try:
                proc.stop()
            except Exception as err:  # keep stopping the others
                print(f"warning: stopping {proc.name} failed: {err!r}", file=sys.stderr)


def child_env(**extra: str) -> dict[str, str]:
    """This process's environment plus ``extra``, with the repository root importable."""
    env = dict(os.environ)
    path = env.get("PYTHONPATH")
    env["PYTHONPATH"] = f"{REPO}{os.pathsep}{path}" if path else str(REPO)
    env.update(extra)
    return env


# --- statistics ------------------------------------------------------------------------------


def percentile(values: Sequence[float], p: float) -> float:
    """The ``p``-th percentile (0-100) by linear interpolation between closest ranks."""
    if not values:
        return math.nan
    xs = sorted(values)
    k = (len(xs) - 1) * p / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def latency_summary(seconds: Sequence[float]) -> dict[str, float]:
    """p50/p90/p99/mean/min/max of round trips, in milliseconds."""
    ms = [s * 1000.0 for s in seconds]
    return {"n": len(ms), "p50_ms": percentile(ms, 50), "p90_ms": percentile(ms, 90),
            "p99_ms": percentile(ms, 99), "mean_ms": statistics.fmean(ms) if ms else math.nan,
            "min_ms": min(ms) if ms else math.nan, "max_ms": max(ms) if ms else math.nan}


def chunks(items: Sequence[T], size: int) -> Iterable[Sequence[T]]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


async def bulk_then_longpoll(
        client: Any, bodies: Sequence[dict[str, Any]], chunk: int, pollers: int,
        wait: float) -> tuple[list[dict[str, Any]], float, float]:
    """Method bulk+longpoll through a gpulane AsyncClient: one coroutine submits ``bodies`` in
    bulks of ``chunk`` (submit_many) while ``pollers`` coroutines await ``result(id, wait=)``
    for each id as its bulk is acknowledged; (the results, wall seconds, this process's CPU
    seconds)."""
    import asyncio

    results: list[dict[str, Any]] = []
    queue: asyncio.Queue[str | None] = asyncio.Queue()

    async def submitter() -> None:
        for part in chunks(bodies, chunk):
            for t in await client.submit_many(list(part)):
                queue.put_nowait(t["id"])
        for _ in range(pollers):
            queue.put_nowait(None)

    async def collector() -> None:
        while (tid := await queue.get()) is not None:
            results.append(await client.result(tid, wait=wait))

    t0, cpu0 = time.perf_counter(), time.process_time()
    await asyncio.gather(submitter(), *(collector() for _ in range(pollers)))
    return results, time.perf_counter() - t0, time.process_time() - cpu0


# --- noise: CPU used by others ---------------------------------------------------------------


_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _machine_cpu() -> tuple[float, float]:
    """(busy, steal) CPU seconds of the whole machine since boot, from /proc/stat."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    v = [int(x) for x in fields] + [0] * 10
    user, nice, system, steal = v[0], v[1], v[2], v[7]
    return (user + nice + system) / _TICK, steal / _TICK


def _tree_cpu(root: int) -> float:
    """CPU seconds used so far by ``root`` and its live descendants (children reaped by
    them included)."""
    stats: dict[int, tuple[int, float]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            rest = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        ppid = int(rest[1])
        cpu = sum(int(x) for x in rest[11:15]) / _TICK  # utime stime cutime cstime
        stats[int(entry.name)] = (ppid, cpu)
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    total, todo = 0.0, [root]
    while todo:
        pid = todo.pop()
        if pid in stats:
            total += stats[pid][1]
        todo.extend(children.get(pid, ()))
    return total


def proc_cpu_s(pids: Iterable[int]) -> float:
    """User + system CPU seconds used so far by each of ``pids`` itself (not its children),
    from /proc; a pid that is gone counts 0."""
    total = 0
    for pid in pids:
        try:
            rest = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        total += int(rest[11]) + int(rest[12])
    return total / _TICK


def tree_pids(root: int) -> list[int]:
    """``root`` and its live descendants (a server and the processes it forked)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, ()))
    return found


class CpuMeter:
    """How much CPU the rest of the machine used while a measurement ran.

    Benchmarks here share a small machine; CPU burnt by processes outside this benchmark's
    process tree (or stolen by the hypervisor) during a measurement makes it noisy. Linux
    only; elsewhere every figure is None.
    """

    def __init__(self) -> None:
        self.start = self._snap()

    @staticmethod
    def _snap() -> tuple[float, float, float, float] | None:
        try:
            busy, steal = _machine_cpu()
            return time.monotonic(), busy, steal, _tree_cpu(os.getpid())
        except (OSError, ValueError, IndexError):
            return None

    def stop(self) -> dict[str, float | None]:
        end = self._snap()
        if end is None or self.start is None:
            return {"other_cpu_s": None, "steal_s": None, "bench_cpu_s": None,
                    "other_cores": None}
        wall = max(end[0] - self.start[0], 1e-9)
        ours = end[3] - self.start[3]
        other = max(0.0, (end[1] - self.start[1]) - ours)
        return {"other_cpu_s": round(other, 3), "steal_s": round(end[2] - self.start[2], 3),
                "bench_cpu_s": round(ours, 3), "other_cores": round(other / wall, 3)}


# --- output ----------------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "cpu_count": os.cpu_count(),
        "python": sys.version.split()[0],
        "python_implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "machine": platform.machine(),
    }
    with contextlib.suppress(OSError, AttributeError):
        info["cpu_affinity"] = len(os.sched_getaffinity(0))
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
    return info


def git_info(paths: Sequence[str] = ("src",)) -> dict[str, Any]:
    """The commit measured, and which files under ``paths`` differ from it (a dirty tree)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True,
                              timeout=10, check=True).stdout.rstrip("\n")

    try:
        changed = [line[3:] for line in git("status", "--porcelain", "--", *paths).splitlines()]
        # Tells two runs of the same dirty tree apart from runs of different edits.
        digest = hashlib.sha256(git("diff", "HEAD", "--", *paths).encode())
        for name in sorted(changed):
            with contextlib.suppress(OSError):
                if (REPO / name).is_file():
                    digest.update(name.encode() + (REPO / name).read_bytes())
        return {"commit": git("rev-parse", "HEAD"), "dirty": bool(changed),
                "changed": changed, "tree_sha256": digest.hexdigest()[:16]}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None, "changed": [], "tree_sha256": None}


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Print a plain aligned text table (first column left, the rest right); return it."""
    cells = [[str(h) for h in headers], *[[_cell(c) for c in row] for row in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                         for i, (c, w) in enumerate(zip(row, widths, strict=True)))

    out = "\n".join([line(cells[0]), "  ".join("-" * w for w in widths),
                     *(line(r) for r in cells[1:])])
    print(out)
    return out


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "| " + " | ".join(headers) + " |"
    sep = "|" + "|".join(":---" if i == 0 else "---:" for i in range(len(headers))) + "|"
    body = ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join([head, sep, *body])


def _cell(value: Any) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.2f}"
    return str(value)


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")
    tmp.replace(path)


GPULANE_READY_TIMEOUT_S = 60.0
"""How long a benchmark waits for a fresh ``gpulane serve`` to answer /readyz."""


def start_gpulane(procs: Procs, data_dir: Path, log_dir: Path, *extra: str,
                  name: str = "gpulane") -> tuple[Proc, str]:
    """Start ``gpulane serve`` (2 simulated 24 GiB GPUs, then ``extra`` flags) on a free port;
    wait until ready."""
    import httpx

    port = free_port()
    exe = Path(sys.executable).with_name("gpulane")
    argv = [str(exe)] if exe.exists() else [sys.executable, "-m", "gpulane"]
    argv += ["serve", "--data-dir", str(data_dir), "--port", str(port),
             "--simulate-gpus", "2x24GiB", "--log-level", "warning", *extra]
    proc = procs.add(start_proc(name, argv, log_dir=log_dir, env=child_env()))
    url = f"http://127.0.0.1:{port}"
    wait_until(lambda: httpx.get(f"{url}/readyz", timeout=2.0).status_code == 200,
               timeout=GPULANE_READY_TIMEOUT_S, what="gpulane /readyz", proc=proc)
    return proc, url


def _terminated(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds through the finally blocks that stop servers


def stop_on_signals() -> None:
    """Turn SIGTERM (and SIGINT, which a shell ignores for background jobs) into SystemExit,
    so a benchmark that is stopped still runs the code that stops its servers."""
    signal.signal(signal.SIGTERM, _terminated)
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, _terminated)


def run_record(benchmark: str, script: str, argv: list[str] | None, started: float,
               load_start: list[float], *, code_paths: tuple[str, ...] | None = None,
               machine_extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """What every result JSON opens with: the command, when and how long, the code, the
    machine (with its load before and after)."""
    return {
        "benchmark": benchmark,
        "command": " ".join(["python", script, *(sys.argv[1:] if argv is None else argv)]),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "duration_s": round(time.time() - started, 1),
        "code": git_info(code_paths) if code_paths else git_info(),
        "machine": {**machine_info(), **(machine_extra or {}),
                    "load_avg_1_5_15_at_start": load_start,
                    "load_avg_1_5_15_at_end": list(os.getloadavg())},
    }
