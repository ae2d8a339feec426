"""The worker SDK's protocol loop: ops in on a thread, events out in whole batches."""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import queue
import sys
import threading
import traceback
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import IO, Any

from gpulane.protocol import ENV_INPUT, ENV_INPUT_FILE, ENV_MODE, ENV_TASK_ID, connection_event
from gpulane.worker._context import (
    Context,
    TaskError,
    dumps,
    error_kind,
    error_message,
    resolve_device,
)


class _Ops:
    """Reads ops from stdin on a thread, so a ``cancel`` is seen while ``handle`` runs.

    It reads the file descriptor itself (no buffered ``sys.stdin``), so a thread still blocked
    in a read cannot trip up the interpreter's shutdown.
    """

    def __init__(self, fd: int) -> None:
        self.queue: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._lock = threading.Lock()
        self._active: set[str] = set()  # tasks received and not yet finished
        self._cancelled: set[str] = set()
        self._fd = fd
        threading.Thread(target=self._read, name="gpulane-ops", daemon=True).start()

    def _lines(self) -> Iterator[bytes]:
        held: list[bytes] = []  # the start of a line still arriving
        while True:
            try:
                chunk = os.read(self._fd, 1 << 20)
            except OSError:
                chunk = b""
            if not chunk:
                rest = b"".join(held)
                if rest.strip():
                    yield rest
                return
            if b"\n" not in chunk:
                held.append(chunk)
                continue
            first, *middle, last = chunk.split(b"\n")
            yield b"".join([*held, first])
            yield from middle
            held = [last] if last else []

    def _read(self) -> None:
        for line in self._lines():
            if not line.strip():
                continue
            try:
                op = json.loads(line)
            except ValueError:
                print(f"gpulane.worker: ignored a stdin line that is not JSON: {line[:200]!r}",
                      file=sys.stderr, flush=True)
                continue
            if not isinstance(op, dict):
                continue
            if op.get("op") == "cancel":
                with self._lock:
                    if str(op.get("task")) in self._active:
                        self._cancelled.add(str(op.get("task")))
                continue
            if op.get("op") == "run":
                with self._lock:
                    self._active.update(str(t.get("task")) for t in op.get("tasks") or ()
                                        if isinstance(t, dict))
            self.queue.put(op)
        self.queue.put(None)  # stdin closed: as good as shutdown

    def is_cancelled(self, task: str) -> bool:
        with self._lock:
            return task in self._cancelled

    def done(self, tasks: Iterable[str]) -> None:
        with self._lock:
            for task in tasks:
                self._active.discard(task)
                self._cancelled.discard(task)


def _event(name: str, task: str | None, **fields: Any) -> dict[str, Any]:
    return {"event": name, **({"task": task} if task is not None else {}), **fields}


def _finish(task: str | None, exc: BaseException | None = None) -> str:
    if exc is None:
        return dumps(_event("finish", task, status="completed"))
    return dumps(_event("finish", task, status="failed",
                         error={"kind": error_kind(exc), "message": error_message(exc)}))


def _cancelled_error() -> TaskError:
    return TaskError("cancelled", "cancelled by request")


def _report(exc: BaseException, where: str) -> None:
    """A failure's traceback to stderr (one line for a deliberate TaskError)."""
    if isinstance(exc, TaskError) or exc.__traceback__ is None:
        print(f"gpulane.worker: {where}: {error_message(exc)}", file=sys.stderr, flush=True)
    else:
        print(f"gpulane.worker: {where}:\n" + "".join(traceback.format_exception(exc)),
              file=sys.stderr, end="", flush=True)
    if error_kind(exc) == "oom" and "torch" in sys.modules:
        with contextlib.suppress(Exception):  # give the cached blocks back for the next batch
            sys.modules["torch"].cuda.empty_cache()


@dataclass(slots=True)
class _Text:
    """A generator handler's joined text: sent as a ``text`` event, not a ``result``."""

    text: str


class Server:
    """One worker process: announce, load, then serve ops (session) or the one input."""

    def __init__(self, load: Callable[[Context], Any] | None, handle: Callable[..., Any],
                 batch: bool, env: Mapping[str, str]) -> None:
        self.load, self.handle, self.batch, self.env = load, handle, batch, env
        self.oneoff = env.get(ENV_MODE, "session") == "oneoff"
        self._lock = threading.Lock()
        self._out = self._claim_stdout()
        self.ops: _Ops | None = None

    @staticmethod
    def _claim_stdout() -> IO[bytes]:
        """Keep fd 1 for the protocol; point what prints to stdout (even C code) at stderr."""
        try:
            sys.stdout.flush()
            fd = sys.stdout.fileno()
            out = os.fdopen(os.dup(fd), "wb")
            os.dup2(sys.stderr.fileno(), fd)
            return out
        except (AttributeError, OSError, ValueError):  # no real stdout: write through it
            return sys.stdout.buffer

    def write(self, text: str) -> None:
        if text:
            with self._lock:
                self._out.write(text.encode())
                self._out.flush()

    def cancelled(self, task: str) -> bool:
        return self.ops is not None and self.ops.is_cancelled(task)

    def tid(self, task: str) -> str | None:
        """The task id as events carry it: none in a one-off (the node knows its task)."""
        return None if self.oneoff else task

    def run(self) -> int:
        env = self.env
        device, simulated, warning = resolve_device(env)
        ctx = Context(device=device, simulated=simulated, model_path=env.get("MODEL_PATH") or None,
                      model_name=env.get("MODEL_NAME", ""), preset=env.get("GPULANE_PRESET", ""),
                      mode="oneoff" if self.oneoff else "session",
                      gpulane_device=env.get("GPULANE_DEVICE", device),
                      _write=self.write, _cancelled=self.cancelled)
        loading = {"event": "worker", "status": "loading", "device": device}
        self.write(dumps(connection_event()) + dumps(
            {**loading, "simulated": True} if simulated else loading))
        if warning:
            ctx.warn(warning)
        try:
            ctx.model = self.load(ctx) if self.load is not None else None
        except BaseException as exc:  # whatever stops load() ends the worker
            _report(exc, "load() failed")
            self.write(dumps({"event": "worker", "status": "failed",
                               "message": f"load() failed: {error_message(exc)}"}))
            return 1
        # pipeline: ops are read on a thread and run in order, so the node may send the
        # next run while this one computes (the worker never waits on the node in between).
        self.write(dumps({"event": "worker", "status": "ready", "pipeline": True}))
        if self.oneoff:
            self._oneoff(ctx)
            return 0
        self.ops = _Ops(sys.stdin.fileno())
        while True:
            op = self.ops.queue.get()
            if op is None or op.get("op") == "shutdown":
                return 0
            if op.get("op") != "run":
                continue
            items = [(str(t.get("task")), t.get("input")) for t in op.get("tasks") or ()
                     if isinstance(t, dict)]
            try:
                if self.batch:
                    self._run_batch(ctx, items)
                else:
                    for task, inp in items:
                        self._run_one(ctx, task, inp)
            finally:
                self.ops.done(task for task, _ in items)

    def _oneoff(self, ctx: Context) -> None:
        task = self.env.get(ENV_TASK_ID, "")
        try:
            path = self.env.get(ENV_INPUT_FILE)
            if path:
                with open(path, encoding="utf-8") as f:
                    raw = f.read()
            else:
                raw = self.env.get(ENV_INPUT, "")
            inp = json.loads(raw) if raw.strip() else None
        except (OSError, ValueError) as exc:
            self.write(_finish(None, TaskError("bad_input", f"cannot read the input: {exc}")))
            return
        if self.batch:
            self._run_batch(ctx, [(task, inp)])
        else:
            self._run_one(ctx, task, inp)

    def _result(self, task: str, output: Any, reported: bool = False) -> str:
        """A task's closing lines; an exception (or an output that is not JSON) fails it."""
        tid = self.tid(task)
        if isinstance(output, BaseException):
            if not reported:
                _report(output, f"task {task or '(one-off)'} failed")
            return _finish(tid, output)
        try:
            if isinstance(output, _Text):
                line = dumps(_event("text", tid, content=output.text))
            else:
                line = dumps(_event("result", tid, output=output))
        except (TypeError, ValueError) as exc:
            return _finish(tid, TaskError("bad_output", f"the output is not JSON: {exc}"))
        return line + _finish(tid)

    def _run_batch(self, ctx: Context, items: list[tuple[str, Any]]) -> None:
        """handle(inputs) once for the batch's live tasks; all closing lines in one write."""
        closing: dict[str, str] = {}
        live = [(t, i) for t, i in items if not self.cancelled(t)]
        raised: BaseException | None = None
        if live:
            ctx.tasks = [t for t, _ in live]
            ctx.task = ctx.tasks[0] if len(live) == 1 else None
            try:
                outputs = self.handle([i for _, i in live], ctx)
                if isinstance(outputs, str | bytes | Mapping) or not isinstance(
                        outputs, Iterable):
                    raise TaskError("bad_output", f"handle returned a {type(outputs).__name__}"
                                    f" for {len(live)} inputs; return a list with one output"
                                    " per input")
                outputs = list(outputs)
                if len(outputs) != len(live):
                    raise TaskError("bad_output", f"handle returned {len(outputs)} outputs for "
                                    f"{len(live)} inputs; return one output per input")
            except Exception as exc:
                _report(exc, f"handle() failed for a batch of {len(live)}")
                outputs, raised = [exc] * len(live), exc
            finally:
                ctx.task, ctx.tasks = None, []
            for (task, _), output in zip(live, outputs, strict=True):
                if not self.cancelled(task):
                    closing[task] = self._result(task, output, reported=output is raised)
        self.write("".join(closing.get(task) or _finish(self.tid(task), _cancelled_error())
                           for task, _ in items))

    def _run_one(self, ctx: Context, task: str, inp: Any) -> None:
        """handle(input) for one task (a generator streams); its closing lines in one write."""
        if self.cancelled(task):
            self.write(_finish(self.tid(task), _cancelled_error()))
            return
        ctx.task, ctx.tasks = task, [task]
        reported = False
        try:
            output = self.handle(inp, ctx)
            if inspect.isgenerator(output):
                output = self._stream(ctx, task, output)
        except Exception as exc:
            _report(exc, f"handle() failed for task {task or '(one-off)'}")
            output, reported = exc, True
        finally:
            ctx.task, ctx.tasks = None, []
        if self.cancelled(task):
            self.write(_finish(self.tid(task), _cancelled_error()))
        else:
            self.write(self._result(task, output, reported=reported))

    def _stream(self, ctx: Context, task: str, gen: Any) -> Any:
        """Run a generator handler: str -> text_delta, dict -> event; its return -> output."""
        deltas: list[str] = []
        try:
            while True:
                if self.cancelled(task):
                    return None  # the caller closes the task as cancelled
                try:
                    item = next(gen)
                except StopIteration as stop:
                    if stop.value is not None:
                        return stop.value
                    return _Text("".join(deltas)) if deltas else None
                if isinstance(item, str):
                    deltas.append(item)
                    ctx.emit({"event": "text_delta", "delta": item})
                elif isinstance(item, Mapping):
                    ctx.emit({"event": "progress", **item})
                else:
                    raise TaskError("bad_output", f"the handler yielded a "
                                    f"{type(item).__name__}; yield str (text) or dict (event)")
        finally:
            gen.close()
