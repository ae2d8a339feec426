"""gpulane.worker: small workers written with the SDK, run as subprocesses fed ops on stdin."""

from __future__ import annotations

import importlib.util
import json
import os
import queue
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import IO, Any

import pytest

from gpulane.worker import TaskError, error_kind

BATCH_WORKER = """
    from gpulane.worker import TaskError, serve

    def load(ctx):
        print("noise from load")  # print goes to stderr: stdout carries only the protocol
        return {"factor": 10}

    def handle(inputs, ctx):
        mode = inputs[0].get("mode") if isinstance(inputs[0], dict) else None
        if mode == "wrong_count":
            return inputs[:-1]
        if mode == "raise":
            exc = {"ValueError": ValueError("no good"), "KeyError": KeyError("text"),
                   "oom": RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"),
                   "cublas": RuntimeError("CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate"),
                   "RuntimeError": RuntimeError("boom"),
                   "TaskError": TaskError("too_big", "the input is too big")}
            raise exc[inputs[0]["exc"]]
        out = []
        for i, inp in enumerate(inputs):
            if inp.get("bad"):
                out.append(TaskError("bad_input", f"item {i} is bad"))
            elif inp.get("crash"):
                out.append(RuntimeError("item crashed"))
            elif inp.get("warn"):
                ctx.warn("careful", task=i)
                out.append({"warned": True})
            elif inp.get("unjson"):
                out.append({"value": object()})
            else:
                out.append({"y": inp["x"] * ctx.model["factor"], "batch": len(inputs),
                            "tasks": ctx.tasks})
        return out

    serve(load=load, handle=handle, batch=True)
"""


def write_worker(tmp_path: Path, body: str) -> Path:
    script = tmp_path / "worker.py"
    script.write_text(textwrap.dedent(body))
    return script


def worker_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("GPULANE_") and k not in ("GPU_DEVICE", "MODEL_PATH")}
    env.update({"MODEL_NAME": "t", "GPU_DEVICE": "cpu", "GPULANE_MODE": "session",
                "PYTHONUNBUFFERED": "1", **extra})
    return env


def run_worker(tmp_path: Path, body: str, ops: list[dict[str, Any]] | None = None,
               **env: str) -> tuple[list[dict[str, Any]], str, int]:
    """Run a worker to the end; every stdout line must be a JSON event."""
    script = write_worker(tmp_path, body)
    stdin = "".join(json.dumps(op) + "\n" for op in ops or [])
    proc = subprocess.run([sys.executable, str(script)], input=stdin, capture_output=True,
                          text=True, timeout=30, env=worker_env(**env))
    events = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    return events, proc.stderr, proc.returncode


def run_op(*items: tuple[str, Any]) -> dict[str, Any]:
    return {"op": "run", "tasks": [{"task": t, "input": i} for t, i in items]}


SHUTDOWN = {"op": "shutdown"}


def finishes(events: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for e in events:
        if e["event"] == "finish":
            assert e["task"] not in out, f"two finish events for {e['task']}"
            out[e["task"]] = e
    return out


def results(events: list[dict[str, Any]]) -> dict[str, Any]:
    return {e["task"]: e["output"] for e in events if e["event"] == "result"}


def test_announces_itself_then_serves_batches(tmp_path: Path) -> None:
    events, stderr, code = run_worker(tmp_path, BATCH_WORKER, [
        run_op(("a", {"x": 1}), ("b", {"x": 2})), run_op(("c", {"x": 3})), SHUTDOWN])
    assert code == 0, stderr
    assert events[0] == {"event": "connection", "status": "connected", "protocol": 1}
    assert events[1]["event"] == "worker" and events[1]["status"] == "loading"
    assert events[2] == {"event": "worker", "status": "ready", "pipeline": True}
    assert results(events) == {"a": {"y": 10, "batch": 2, "tasks": ["a", "b"]},
                               "b": {"y": 20, "batch": 2, "tasks": ["a", "b"]},
                               "c": {"y": 30, "batch": 1, "tasks": ["c"]}}
    assert all(f["status"] == "completed" for f in finishes(events).values())
    assert set(finishes(events)) == {"a", "b", "c"}
    assert "noise from load" in stderr


def test_wrong_output_count_fails_the_whole_batch_as_bad_output(tmp_path: Path) -> None:
    events, _, code = run_worker(tmp_path, BATCH_WORKER, [
        run_op(("a", {"mode": "wrong_count"}), ("b", {}), ("c", {})), SHUTDOWN])
    assert code == 0
    done = finishes(events)
    assert set(done) == {"a", "b", "c"} and not results(events)
    for f in done.values():
        assert f["status"] == "failed" and f["error"]["kind"] == "bad_output"
        assert "2 outputs for 3 inputs" in f["error"]["message"]


def test_an_exception_as_output_fails_only_its_task(tmp_path: Path) -> None:
    events, stderr, _ = run_worker(tmp_path, BATCH_WORKER, [
        run_op(("a", {"x": 1}), ("b", {"bad": True}), ("c", {"crash": True}),
               ("d", {"unjson": True}), ("e", {"x": 5})), SHUTDOWN])
    done = finishes(events)
    assert done["a"]["status"] == done["e"]["status"] == "completed"
    assert results(events)["e"]["y"] == 50
    assert done["b"]["error"] == {"kind": "bad_input", "message": "item 1 is bad"}
    assert done["c"]["error"] == {"kind": "internal", "message": "RuntimeError: item crashed"}
    assert done["d"]["error"]["kind"] == "bad_output"
    assert "b" not in results(events) and "c" not in results(events)
    assert "item crashed" in stderr  # a failed task leaves a line on stderr


@pytest.mark.parametrize(("exc", "kind", "text"), [
    ("ValueError", "bad_input", "ValueError: no good"),
    ("KeyError", "bad_input", "KeyError: 'text'"),
    ("oom", "oom", "CUDA out of memory"),
    ("cublas", "oom", "CUBLAS_STATUS_ALLOC_FAILED"),
    ("RuntimeError", "internal", "RuntimeError: boom"),
    ("TaskError", "too_big", "the input is too big"),
])
def test_handle_raising_fails_every_task_of_the_batch(tmp_path: Path, exc: str, kind: str,
                                                      text: str) -> None:
    events, stderr, code = run_worker(tmp_path, BATCH_WORKER, [
        run_op(("a", {"mode": "raise", "exc": exc}), ("b", {"x": 1})),
        run_op(("c", {"x": 1})), SHUTDOWN])
    assert code == 0
    done = finishes(events)
    for task in "ab":
        assert done[task]["status"] == "failed" and done[task]["error"]["kind"] == kind
        assert text in done[task]["error"]["message"]
    assert done["c"]["status"] == "completed"  # the worker lives on
    if exc != "TaskError":
        assert "Traceback (most recent call last)" in stderr


def test_warn_is_a_warning_event_of_that_task(tmp_path: Path) -> None:
    events, stderr, _ = run_worker(tmp_path, BATCH_WORKER, [
        run_op(("a", {"x": 1}), ("b", {"warn": True})), SHUTDOWN])
    warnings = [e for e in events if e["event"] == "warning"]
    assert warnings == [{"event": "warning", "task": "b", "message": "careful"}]
    assert finishes(events)["b"]["status"] == "completed"
    assert "careful" in stderr


STREAM_WORKER = """
    from gpulane.worker import serve

    def handle(inp, ctx):
        for word in inp["words"]:
            yield word
            yield {"done": 1}
        ctx.emit({"event": "progress", "note": "emitted"})
        if inp.get("result"):
            return {"words": len(inp["words"])}

    serve(handle=handle, batch=False)
"""


def test_a_generator_handler_streams_text(tmp_path: Path) -> None:
    events, _, code = run_worker(tmp_path, STREAM_WORKER, [
        run_op(("a", {"words": ["hello ", "world"]}), ("b", {"words": ["x"], "result": True}),
               ("c", {"nope": 1})), SHUTDOWN])
    assert code == 0
    a = [e for e in events if e.get("task") == "a"]
    assert [e["event"] for e in a] == ["text_delta", "progress", "text_delta", "progress",
                                       "progress", "text", "finish"]
    assert [e["delta"] for e in a if e["event"] == "text_delta"] == ["hello ", "world"]
    assert a[4]["note"] == "emitted" and a[5]["content"] == "hello world"
    assert results(events) == {"b": {"words": 1}}
    assert not [e for e in events if e.get("task") == "b" and e["event"] == "text"]
    assert finishes(events)["c"]["error"]["kind"] == "bad_input"


def test_load_raising_prints_the_traceback_and_exits_1(tmp_path: Path) -> None:
    events, stderr, code = run_worker(tmp_path, """
        from gpulane.worker import serve

        def load(ctx):
            raise FileNotFoundError("no weights in /models/x")

        serve(load=load, handle=lambda inputs, ctx: inputs)
    """, [run_op(("a", {}))])
    assert code == 1
    assert "Traceback (most recent call last)" in stderr and "no weights in /models/x" in stderr
    assert events[-1]["event"] == "worker" and events[-1]["status"] == "failed"
    assert "no weights" in events[-1]["message"]
    assert not any(e.get("status") == "ready" for e in events)


ONEOFF_WORKER = """
    from gpulane.worker import TaskError, serve

    def handle(inp, ctx):
        ctx.progress(done=1, total=1)
        if inp.get("fail"):
            raise TaskError("bad_input", "asked to fail")
        return {"got": inp, "task_seen": ctx.task}

    serve(handle=handle, batch=False)
"""


def test_oneoff_reads_its_input_from_the_environment(tmp_path: Path) -> None:
    events, stderr, code = run_worker(tmp_path, ONEOFF_WORKER, GPULANE_MODE="oneoff",
                                      GPULANE_TASK_ID="t1", GPULANE_INPUT='{"n": 1}')
    assert code == 0, stderr
    assert [e["event"] for e in events] == ["connection", "worker", "worker", "progress",
                                            "result", "finish"]
    assert all("task" not in e for e in events)
    assert events[-2]["output"] == {"got": {"n": 1}, "task_seen": "t1"}
    assert events[-1] == {"event": "finish", "status": "completed"}


def test_oneoff_input_file_and_failure_still_exits_0(tmp_path: Path) -> None:
    path = tmp_path / "input.json"
    path.write_text('{"fail": true}')
    events, _, code = run_worker(tmp_path, ONEOFF_WORKER, GPULANE_MODE="oneoff",
                                 GPULANE_INPUT_FILE=str(path))
    assert code == 0
    assert events[-1] == {"event": "finish", "status": "failed",
                          "error": {"kind": "bad_input", "message": "asked to fail"}}
    events, _, code = run_worker(tmp_path, ONEOFF_WORKER, GPULANE_MODE="oneoff",
                                 GPULANE_INPUT="{not json")
    assert code == 0 and events[-1]["error"]["kind"] == "bad_input"


DEVICE_WORKER = """
    import sys
    from gpulane.worker import serve

    def load(ctx):
        return {"device": ctx.device, "simulated": ctx.simulated, "torch": "torch" in sys.modules}

    serve(load=load, handle=lambda inputs, ctx: [ctx.model for _ in inputs])
"""


def test_a_simulated_gpu_means_the_cpu(tmp_path: Path) -> None:
    events, _, _ = run_worker(tmp_path, DEVICE_WORKER, [run_op(("a", None)), SHUTDOWN],
                              GPU_DEVICE="cuda:0", GPULANE_SIMULATED="1")
    assert results(events)["a"] == {"device": "cpu", "simulated": True, "torch": False}


def test_cuda_without_a_cuda_torch_falls_back_to_the_cpu_with_a_warning(
        tmp_path: Path) -> None:
    if importlib.util.find_spec("torch") is None:
        pytest.skip("torch is not installed")
    events, stderr, _ = run_worker(tmp_path, DEVICE_WORKER, [run_op(("a", None)), SHUTDOWN],
                                   GPU_DEVICE="cuda:0")
    warnings = [e for e in events if e["event"] == "warning"]
    if results(events)["a"]["device"] == "cuda:0":  # a machine with CUDA: nothing to say
        assert not warnings
        return
    assert results(events)["a"]["device"] == "cpu"
    assert warnings and "computing on the CPU" in stderr


READ_GUARD_S = 15.0
"""Failure guard for lines a worker should write: never the assertion."""


class Lines:
    """A worker's stdout as JSON events, read on a thread so that a wait can give up: a hung
    worker fails the test at the guard instead of blocking ``readline`` forever."""

    def __init__(self, stdout: IO[str]) -> None:
        self.seen: list[dict[str, Any]] = []
        self._lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._pump, args=(stdout,), daemon=True).start()

    def _pump(self, stdout: IO[str]) -> None:
        for line in stdout:
            self._lines.put(line)
        self._lines.put("")  # end of output

    def until(self, pred: Any) -> None:
        """Read events until one matches ``pred``."""
        deadline = time.monotonic() + READ_GUARD_S
        while True:
            try:
                line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"not seen in time; saw {self.seen}") from None
            assert line, f"worker stdout closed; saw {self.seen}"
            self.seen.append(json.loads(line))
            if pred(self.seen[-1]):
                return


def test_cancel_is_seen_while_handle_runs(tmp_path: Path) -> None:
    """A cancel reaches a queued task (b never starts) and a running stream (c stops) while
    handle runs. b would sleep an hour and c streams without end, so d's finish coming at all
    proves both cancels worked: nothing is timed. a holds the worker busy until the worker
    itself has seen b's cancel, so b is still queued when it arrives."""
    script = write_worker(tmp_path, """
        import itertools
        import time
        from gpulane.worker import serve

        def handle(inp, ctx):
            ctx.progress(started=True)
            if inp.get("stream"):
                def words():
                    for i in itertools.count():
                        time.sleep(0.01)
                        yield f"w{i} "
                return words()
            if "hold_until_cancelled" in inp:
                while not ctx.cancelled(inp["hold_until_cancelled"]):
                    time.sleep(0.005)
                return {"held": True}
            time.sleep(inp["s"])
            return {"slept": inp["s"]}

        serve(handle=handle, batch=False)
    """)
    proc = subprocess.Popen([sys.executable, str(script)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=worker_env())
    assert proc.stdin is not None and proc.stdout is not None
    try:
        out = Lines(proc.stdout)
        out.until(lambda e: e.get("status") == "ready")
        proc.stdin.write(json.dumps(run_op(("a", {"hold_until_cancelled": "b"}),
                                           ("b", {"s": 3600}), ("c", {"stream": True}),
                                           ("d", {"s": 0}))) + "\n")
        proc.stdin.flush()
        out.until(lambda e: e.get("task") == "a" and e["event"] == "progress")
        proc.stdin.write(json.dumps({"op": "cancel", "task": "b"}) + "\n")
        proc.stdin.flush()
        out.until(lambda e: e.get("task") == "c" and e["event"] == "text_delta")
        proc.stdin.write(json.dumps({"op": "cancel", "task": "c"}) + "\n")
        proc.stdin.flush()
        out.until(lambda e: e.get("task") == "d" and e["event"] == "finish")
        proc.stdin.write(json.dumps(SHUTDOWN) + "\n")
        proc.stdin.flush()
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
    seen = out.seen
    done = finishes(seen)
    assert done["a"]["status"] == done["d"]["status"] == "completed"
    for task in "bc":
        assert done[task]["status"] == "failed" and done[task]["error"]["kind"] == "cancelled"
    assert not [e for e in seen if e.get("task") == "b" and e["event"] == "progress"]
    assert set(results(seen)) == {"a", "d"}


def test_stdin_closing_ends_a_session_worker(tmp_path: Path) -> None:
    events, _, code = run_worker(tmp_path, BATCH_WORKER, [run_op(("a", {"x": 1}))])
    assert code == 0 and finishes(events)["a"]["status"] == "completed"


def test_error_kinds() -> None:
    class OutOfMemoryError(RuntimeError):  # as torch.cuda.OutOfMemoryError is named
        pass

    assert error_kind(TaskError("timeout_soon", "x")) == "timeout_soon"
    assert error_kind(OutOfMemoryError("whatever")) == "oom"
    assert error_kind(RuntimeError("cuDNN error: out of memory")) == "oom"
    assert error_kind(MemoryError()) == "oom"
    assert error_kind(TypeError("x")) == "bad_input"
    assert error_kind(OSError("x")) == "internal"


def test_a_generator_handler_needs_batch_false() -> None:
    from gpulane.worker import serve

    def gen(inputs: Any, ctx: Any) -> Any:
        yield "x"

    with pytest.raises(TypeError, match="batch=False"):
        serve(handle=gen, batch=True)
