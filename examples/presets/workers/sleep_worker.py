"""Session worker: sleeps input["ms"] milliseconds per task, then returns.

Written straight to the JSON-lines protocol (docs/protocol.md) with the standard library only,
so it starts fast and shows what the protocol asks of a worker.
"""

import json
import sys
import time


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
        out = []
        for item in op["tasks"]:
            inp = item.get("input") or {}
            ms = inp.get("ms", 0) if isinstance(inp, dict) else 0
            if not isinstance(ms, int | float) or ms < 0:
                out.append({"event": "finish", "task": item["task"], "status": "failed",
                            "error": {"kind": "bad_input",
                                      "message": f"input.ms={ms!r} must be a number >= 0"}})
                continue
            if ms:
                time.sleep(ms / 1000)
            out.append({"event": "result", "task": item["task"], "output": {"slept_ms": ms}})
            out.append({"event": "finish", "task": item["task"], "status": "completed"})
        emit_all(out)


if __name__ == "__main__":
    main()
