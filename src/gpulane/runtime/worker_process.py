"""One worker process (or container) and the JSON-lines conversation with it.

This class knows the protocol and the process, nothing of tasks or stores: the parsed lines go
to ``on_messages`` (all complete lines of one read together, so a batch's results arrive as
one) and the exit to ``on_exit``; the pipeline and the supervisor decide what they mean.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import errno
import logging
import os
import shutil
import signal
import subprocess
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from gpulane.protocol import EventType, WorkerMessage, WorkerStatus, parse_line, shutdown_op
from gpulane.runtime.launchers import DeviceAssignment, LaunchSpec
from gpulane.runtime.spawn import die_with_parent

log = logging.getLogger("gpulane.worker")

STDOUT_LINE_LIMIT = 64 * 1024 * 1024
"""Longest stdout line a worker may write (a result carrying a big output), in bytes."""
READ_CHUNK_BYTES = 256 * 1024
"""How much of a worker's stdout is read at once, in bytes."""
STDIN_HIGH_WATER_BYTES = 1024 * 1024
"""Bytes written to a worker and not yet read by it above which the node watches them drain
(a big batch, or a worker that stopped reading)."""
STDIN_DRAIN_TIMEOUT_S = 60.0
"""A worker that leaves more than STDIN_HIGH_WATER_BYTES unread for this long is stuck (a
healthy one reads a run op as it parses it; a busy one is sent little but cancel ops): it is
killed, and its exit settles what it held."""
STDIN_CAP_BYTES = 64 * 1024 * 1024
"""A worker sent more while this many bytes still wait for it is stuck: killed at once, so the
node's buffer never holds more than this plus one op."""


class WorkerState(str, enum.Enum):
    STARTING = "starting"  # spawned, not yet ready
    READY = "ready"  # idle, warm
    BUSY = "busy"  # running a batch or a one-off task
    STOPPING = "stopping"
    EXITED = "exited"


class WorkerStartError(Exception):
    """The worker did not become ready: it timed out or exited first."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class WorkerProcess:
    """A child process speaking the worker protocol."""

    def __init__(self, worker_id: str, preset_name: str, device: DeviceAssignment,
                 spec: LaunchSpec, *, session: bool, stderr_tail_lines: int,
                 on_messages: Callable[[WorkerProcess, list[WorkerMessage]], Any],
                 on_exit: Callable[[WorkerProcess], Any]) -> None:
        self.id = worker_id
        self.preset_name = preset_name
        self.device = device
        self.spec = spec
        self.session = session
        self.state = WorkerState.STARTING
        self.status: str | None = None  # the worker's own status: loading, ready, ...
        self.stderr_tail: deque[str] = deque(maxlen=stderr_tail_lines)
        self.started_at = time.time()
        self.last_used = time.monotonic()
        self.returncode: int | None = None
        self.tasks_done = 0
        # It said (in its ready event) that it reads ops while a run is going and runs them
        # in order, so the node may send the next run before this one ends.
        self.pipelines = False
        self._on_messages = on_messages
        self._on_exit = on_exit
        self._proc: asyncio.subprocess.Process | None = None
        self._connected = asyncio.Event()
        self._ready = asyncio.Event()
        self._exited = asyncio.Event()
        self._readers: list[asyncio.Task[None]] = []
        self._spawning: asyncio.Future[None] | None = None  # set while spawn() runs
        self._drainer: asyncio.Task[None] | None = None  # watches a big stdin buffer drain

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def started(self) -> bool:
        """It said ready (a session worker) or connected (a one-off)."""
        return (self._ready if self.session else self._connected).is_set()

    @property
    def alive(self) -> bool:
        return self.state not in (WorkerState.EXITED, WorkerState.STOPPING)

    async def spawn(self) -> None:
        """Start the process in its own session, wrapped so that it dies with the node
        (runtime/spawn.py: no preexec_fn, which is unsafe while other threads run); raises
        OSError when the executable cannot be found, as an unwrapped spawn would."""
        argv = self.spec.argv
        if argv and shutil.which(argv[0], path=self.spec.env.get("PATH", os.defpath)) is None \
                and not os.access(os.path.join(self.spec.cwd or "", argv[0]), os.X_OK):
            raise FileNotFoundError(errno.ENOENT, "no such executable", argv[0])
        self._spawning = asyncio.get_running_loop().create_future()
        try:
            self._proc = await asyncio.create_subprocess_exec(
                *die_with_parent(argv), cwd=self.spec.cwd, env=self.spec.env,
                stdin=asyncio.subprocess.PIPE if self.session else asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                limit=STDOUT_LINE_LIMIT, start_new_session=True)
            self._readers = [
                asyncio.create_task(self._read_stdout(), name=f"{self.id}-stdout"),
                asyncio.create_task(self._read_stderr(), name=f"{self.id}-stderr")]
        finally:
            self._spawning.set_result(None)

    async def wait_connected(self, timeout_s: float) -> None:
        await self._wait_for(self._connected, timeout_s, "connected")

    async def wait_ready(self, timeout_s: float) -> None:
        await self._wait_for(self._ready, timeout_s, "ready")

    async def _wait_for(self, flag: asyncio.Event, timeout_s: float, what: str) -> None:
        waiter = asyncio.create_task(flag.wait())
        exited = asyncio.create_task(self._exited.wait())
        try:
            await asyncio.wait({waiter, exited}, timeout=timeout_s,
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
            exited.cancel()
        if flag.is_set():
            return
        if self._exited.is_set():
            raise WorkerStartError(
                "worker_died", f"worker exited with code {self.returncode} before it was "
                f"{what}; last stderr: {self.stderr_text() or '(none)'}")
        raise WorkerStartError(
            "start_timeout", f"worker did not say {what} within {timeout_s:g}s "
            f"(start_timeout_s); last stderr: {self.stderr_text() or '(none)'}")

    def stderr_text(self) -> str:
        return "\n".join(self.stderr_tail)

    def send(self, data: bytes) -> bool:
        """Write one protocol line to the worker's stdin; False if it is gone, or stuck (it
        left STDIN_CAP_BYTES unread: it is killed). Over STDIN_HIGH_WATER_BYTES unread, the
        buffer is watched until it drains (``_watch_drain``)."""
        proc = self._proc
        if proc is None or proc.stdin is None or proc.stdin.is_closing():
            return False
        stdin = proc.stdin
        unread = stdin.transport.get_write_buffer_size()
        if unread > STDIN_CAP_BYTES:
            log.warning("worker %s left %d bytes of its stdin unread; killing it as stuck",
                        self.id, unread)
            self.kill()
            return False
        try:
            stdin.write(data)
        except (BrokenPipeError, ConnectionResetError, RuntimeError):
            return False
        if self._drainer is None and \
                stdin.transport.get_write_buffer_size() > STDIN_HIGH_WATER_BYTES:
            self._drainer = asyncio.get_running_loop().create_task(
                self._watch_drain(stdin), name=f"{self.id}-stdin")
        return True

    async def _watch_drain(self, stdin: asyncio.StreamWriter) -> None:
        """Wait for the worker to read what it was sent; kill it if it does not in time."""
        try:
            await asyncio.wait_for(stdin.drain(), STDIN_DRAIN_TIMEOUT_S)
        except TimeoutError:
            log.warning("worker %s read none of %d bytes sent to it for %gs; killing it as "
                        "stuck", self.id, stdin.transport.get_write_buffer_size(),
                        STDIN_DRAIN_TIMEOUT_S)
            self.kill()
        except (ConnectionResetError, BrokenPipeError):
            pass  # it exited: its exit settles what it held
        finally:
            self._drainer = None

    async def stop(self, grace_s: float) -> None:
        """Ask a session worker to shut down, then terminate, then kill."""
        if self._proc is None and self._spawning is not None:
            # Being spawned right now: a stop that returned here would leave the process to
            # start after it, running on with nobody to stop it (a stopping node's leak).
            await asyncio.shield(self._spawning)
        if self._proc is None or self._exited.is_set():
            return
        self.state = WorkerState.STOPPING
        if self.session:
            self.send(shutdown_op())
            with contextlib.suppress(Exception):
                if self._proc.stdin is not None:
                    self._proc.stdin.close()
        else:
            self._signal(signal.SIGTERM)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._exited.wait(), grace_s)
            return
        self._signal(signal.SIGTERM)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._exited.wait(), grace_s)
            return
        self.kill()
        await self._exited.wait()

    def kill(self) -> None:
        """Kill the worker and everything it started (its own process group)."""
        if self.spec.kill_argv and self._proc is not None and self._proc.returncode is None:
            with contextlib.suppress(OSError):
                subprocess.Popen(self.spec.kill_argv, stdin=subprocess.DEVNULL,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                 start_new_session=True)
        self._signal(signal.SIGKILL)

    def _signal(self, sig: signal.Signals) -> None:
        if self._proc is None or self._proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._proc.pid, sig)

    async def wait_exited(self) -> None:
        await self._exited.wait()

    async def wait_handled(self, timeout_s: float) -> None:
        """Wait, up to ``timeout_s``, until its exit was handled (``on_exit`` ran to its end).
        ``stop`` returns once the process exited, before that: a stopping node that closed its
        store then would lose what ``on_exit`` writes (its runs put back in the queue)."""
        if not self._readers or asyncio.current_task() is self._readers[0]:
            return
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.shield(self._readers[0]), timeout_s)

    async def _read_stdout(self) -> None:
        """Read stdout in chunks and hand over every complete line of a chunk at once: a batch
        a worker writes in one go is then handled (and stored) as one."""
        assert self._proc is not None and self._proc.stdout is not None
        stdout = self._proc.stdout
        pending = bytearray()  # the start of a line whose newline has not come yet
        dropping = False  # the current line went over the limit: skip to its newline
        try:
            while True:
                chunk = await stdout.read(READ_CHUNK_BYTES)
                if not chunk:
                    break
                end = chunk.rfind(b"\n")
                if end < 0:
                    if not dropping:
                        pending += chunk
                        if len(pending) > STDOUT_LINE_LIMIT:
                            log.warning("worker %s wrote a stdout line over %d bytes; dropped",
                                        self.id, STDOUT_LINE_LIMIT)
                            pending.clear()
                            dropping = True
                    continue
                lines = (bytes(pending) + chunk[:end]).split(b"\n")
                if dropping:
                    lines = lines[1:]
                    dropping = False
                pending = bytearray(chunk[end + 1:])
                await self._deliver(lines)
            if pending and not dropping:
                await self._deliver([bytes(pending)])
        finally:
            await self._finish()

    async def _deliver(self, lines: list[bytes]) -> None:
        msgs = []
        for line in lines:
            if not line.strip():
                continue
            msg = parse_line(line)
            self._track(msg)
            msgs.append(msg)
        if not msgs:
            return
        try:
            result = self._on_messages(self, msgs)
            if asyncio.iscoroutine(result):
                await result
        except Exception:  # a handler bug must not stop the conversation
            log.exception("handling lines from worker %s failed", self.id)

    def _track(self, msg: WorkerMessage) -> None:
        if msg.type is EventType.CONNECTION:
            self._connected.set()
        elif msg.type is EventType.WORKER:
            self.status = str(msg.data.get("status"))
            if self.status == WorkerStatus.READY.value:
                self.pipelines = msg.data.get("pipeline") is True
                self._connected.set()
                self._ready.set()

    async def _read_stderr(self) -> None:
        assert self._proc is not None and self._proc.stderr is not None
        while True:
            try:
                line = await self._proc.stderr.readline()
            except ValueError:
                continue
            if not line:
                return
            text = line.decode("utf-8", "replace").rstrip()
            self.stderr_tail.append(text)
            log.debug("[%s] %s", self.id, text)

    async def _finish(self) -> None:
        assert self._proc is not None
        # stdout closed; the exit status follows soon after.
        self.returncode = await self._proc.wait()
        if len(self._readers) > 1:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(self._readers[1]), 1.0)
        self.state = WorkerState.EXITED
        if self._drainer is not None:
            self._drainer.cancel()
        self._exited.set()
        try:
            result = self._on_exit(self)
            if asyncio.iscoroutine(result):
                await result
        except Exception:
            log.exception("handling the exit of worker %s failed", self.id)

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "preset": self.preset_name, "device": self.device.name,
                "state": self.state.value, "status": self.status, "pid": self.pid,
                "pipelines": self.pipelines,
                "mode": "session" if self.session else "oneoff",
                "started_at": self.started_at, "tasks_done": self.tasks_done,
                "idle_s": round(time.monotonic() - self.last_used, 3),
                "returncode": self.returncode}
