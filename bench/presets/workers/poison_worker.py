"""Session worker: sleeps input["ms"] milliseconds per task, and exits at once, without a word
on stdout, when any task of its batch has ``"poison": true`` (what a segfaulting model does).

The standard library only, so it starts fast: the chaos soak starts hundreds of these.
"""

import json
import os
import sys
import time

POISON_EXIT_CODE = 3
"""Exit status of a worker that met a poison input (stands in for a crash)."""


def emit_all(lines: list[dict]) -> None:
    sys.stdout.write("".join(json.dumps(obj, separators=(",", ":")) + "\n" for obj in lines))
    sys.stdout.flush()


def main() -> None:
    emit_all([{"event": "connection", "status": "connected", "protocol": 1},
              {"event": "worker", "status": "ready"}])
    for line in sys.stdin:
        op = json.loads(line)
        if op.get("op") == "shutdown":
            break
        if op.get("op") != "run":
            continue
        inputs = [(item["task"], item.get("input") or {}) for item in op["tasks"]]
        for task, inp in inputs:
            if isinstance(inp, dict) and inp.get("poison"):
                sys.stderr.write(f"poison input in task {task}: crashing the worker\n")
                sys.stderr.flush()
                os._exit(POISON_EXIT_CODE)
        out = []
        for task, inp in inputs:
            ms = inp.get("ms", 0) if isinstance(inp, dict) else 0
            if not isinstance(ms, int | float) or ms < 0:
                out.append({"event": "finish", "task": task, "status": "failed",
                            "error": {"kind": "bad_input",
                                      "message": f"input.ms={ms!r} must be a number >= 0"}})
                continue
            if ms:
                time.sleep(ms / 1000)
            out.append({"event": "result", "task": task, "output": {"slept_ms": ms}})
            out.append({"event": "finish", "task": task, "status": "completed"})
        emit_all(out)


if __name__ == "__main__":
    main()
