"""A test worker that does what its input says: ok, fail, die, hang, noise, flaky, stream.

Session mode by default (reads run ops on stdin); as a one-off (GPULANE_MODE=oneoff) it takes
its input from GPULANE_INPUT. BEHAVE_SILENT=1 makes it never say connected (start timeouts).
"""

import json
import os
import sys
import time


def emit(obj):
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def handle(task, inp):
    action = inp.get("action", "ok") if isinstance(inp, dict) else "ok"
    tid = {"task": task} if task else {}
    if action == "ok":
        emit({"event": "result", **tid, "output": {"echo": inp, "pid": os.getpid()}})
        emit({"event": "finish", **tid, "status": "completed"})
    elif action == "fail":
        emit({"event": "finish", **tid, "status": "failed",
              "error": {"kind": "bad_input", "message": "asked to fail"}})
    elif action == "die":
        print("dying as asked: segfault simulation", file=sys.stderr, flush=True)
        os._exit(3)
    elif action == "flaky":
        marker = inp["marker"]
        if not os.path.exists(marker):
            open(marker, "w").close()
            print("first attempt dies", file=sys.stderr, flush=True)
            os._exit(4)
        emit({"event": "result", **tid, "output": {"attempt": "second"}})
        emit({"event": "finish", **tid, "status": "completed"})
    elif action == "hang":
        time.sleep(3600)
    elif action == "noise":
        print("this line is not JSON", flush=True)
        emit({"event": "mystery", **tid, "x": 1})
        emit({"event": "progress", **tid, "done": 1, "total": 1})
        emit({"event": "result", **tid, "output": {"noisy": True}})
        emit({"event": "finish", **tid, "status": "completed"})
    elif action == "env":
        keys = ["MODEL_NAME", "MODEL_PATH", "GPU_DEVICE", "CUDA_VISIBLE_DEVICES",
                "GPULANE_DEVICE", "GPULANE_PRESET", "GPULANE_MODE", "EXTRA",
                "HIP_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES"]
        emit({"event": "result", **tid, "output": {k: os.environ.get(k) for k in keys}})
        emit({"event": "finish", **tid, "status": "completed"})
    elif action == "slow":
        time.sleep(inp.get("s", 0.2))
        emit({"event": "result", **tid, "output": {"slept": True}})
        emit({"event": "finish", **tid, "status": "completed"})


def main():
    if os.environ.get("BEHAVE_SILENT"):
        time.sleep(3600)
    emit({"event": "connection", "status": "connected", "protocol": 1})
    if os.environ.get("GPULANE_MODE") == "oneoff":
        handle(None, json.loads(os.environ.get("GPULANE_INPUT") or "{}"))
        return
    emit({"event": "worker", "status": "ready"})
    for line in sys.stdin:
        op = json.loads(line)
        if op["op"] == "shutdown":
            return
        if op["op"] == "run":
            for item in op["tasks"]:
                handle(item["task"], item["input"])


if __name__ == "__main__":
    main()
