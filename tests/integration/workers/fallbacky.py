"""A session test worker for the fallback tests: it tells GPU from CPU by GPULANE_DEVICE.

Each task's output names the device it ran on and its batch's size. Input: ``ms`` sleeps that
long per task on any device; ``gpu_ms`` only on a GPU, and only while the file ``until`` (if
given) does not exist (a long task that a lost GPU cuts short reruns fast); ``oom_on_gpu:
true`` fails the task with kind ``oom`` on a GPU (CUDA out of memory). FALLBACKY_BROKEN=PATH:
while that file exists, the worker dies while loading on a GPU (its start circuit opens); on
the CPU it starts as usual.
"""

import os
import sys
import time

from session_loop import serve

DEVICE = os.environ.get("GPULANE_DEVICE", "cpu")
ON_GPU = DEVICE.startswith("gpu")


def main():
    broken = os.environ.get("FALLBACKY_BROKEN")
    if ON_GPU and broken and os.path.exists(broken):
        sys.stderr.write("Traceback: load() raised RuntimeError: CUDA driver error\n")
        sys.exit(1)
    serve(run_batch)


def run_batch(tasks):
    lines = []
    for t in tasks:
        inp = t["input"] or {}
        if ON_GPU and inp.get("oom_on_gpu"):
            lines.append({"event": "finish", "task": t["task"], "status": "failed",
                          "error": {"kind": "oom", "message": "CUDA out of memory"}})
            continue
        released = inp.get("until") and os.path.exists(inp["until"])
        gpu_ms = inp.get("gpu_ms", 0) if ON_GPU and not released else 0
        time.sleep((inp.get("ms", 0) + gpu_ms) / 1000)
        lines.append({"event": "result", "task": t["task"],
                      "output": {"device": DEVICE, "batch_size": len(tasks)}})
        lines.append({"event": "finish", "task": t["task"], "status": "completed"})
    return lines


if __name__ == "__main__":
    main()
