"""Session worker: streams input["text"] back word by word as text_delta events.

Honours the cancel op between tokens: a cancelled task stops streaming at once.
"""

import json
import os
import select
import sys
import time

DELAY_S = float(os.environ.get("ECHO_DELAY_MS", "20")) / 1000


def emit(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def cancelled_now(cancelled: set[str]) -> None:
    """Read any ops waiting on stdin without blocking; remember cancels."""
    while select.select([sys.stdin], [], [], 0)[0]:
        line = sys.stdin.readline()
        if not line:
            return
        op = json.loads(line)
        if op.get("op") == "cancel":
            cancelled.add(op["task"])
        else:
            pending.append(op)


pending: list[dict] = []


def run(item: dict, cancelled: set[str]) -> None:
    task = item["task"]
    inp = item.get("input") or {}
    text = inp.get("text") if isinstance(inp, dict) else None
    if not isinstance(text, str):
        emit({"event": "finish", "task": task, "status": "failed",
              "error": {"kind": "bad_input", "message": "input.text must be a string"}})
        return
    words = text.split(" ")
    for i, word in enumerate(words):
        cancelled_now(cancelled)
        if task in cancelled:
            return
        emit({"event": "text_delta", "task": task, "delta": word + (" " if i < len(words) - 1
                                                                      else "")})
        emit({"event": "progress", "task": task, "done": i + 1, "total": len(words)})
        time.sleep(DELAY_S)
    emit({"event": "text", "task": task, "content": text})
    emit({"event": "finish", "task": task, "status": "completed"})


def main() -> None:
    emit({"event": "connection", "status": "connected", "protocol": 1})
    emit({"event": "worker", "status": "loading", "message": "warming up"})
    emit({"event": "worker", "status": "ready"})
    cancelled: set[str] = set()
    while True:
        if pending:
            op = pending.pop(0)
        else:
            line = sys.stdin.readline()
            if not line:
                break
            op = json.loads(line)
        if op.get("op") == "shutdown":
            break
        if op.get("op") == "cancel":
            cancelled.add(op["task"])
        elif op.get("op") == "run":
            for item in op["tasks"]:
                run(item, cancelled)


if __name__ == "__main__":
    main()
